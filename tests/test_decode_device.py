"""The torchvision/nvJPEG decode path (run here on CPU): same checks, same orientation, same
pixels as the PIL path, and one bad JPEG in a batch costs only its own row."""

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipelines.engine.decode import DecodeError, Decoded, decode
from pipelines.engine.decode_device import apply_orientation, decode_on_device, ends_whole
from tests.qc_fixtures import fuzz_set


def _jpeg(array: np.ndarray, orientation: int = 1, quality: int = 95) -> bytes:
    im = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil_exif_transpose(orientation):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(im))
    got = apply_orientation(torch.from_numpy(stored).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape and (got == expected).all()


def test_every_fuzz_input_gets_the_pil_paths_verdict_in_order():
    cases = fuzz_set()
    with ThreadPoolExecutor(2) as pool:
        got = decode_on_device([b for b, _ in cases.values()], torch.device("cpu"), pool)
    assert len(got) == len(cases)
    for (name, (data, expected)), g in zip(cases.items(), got):
        if expected is None:
            assert isinstance(g, Decoded), (name, g)
            ref = decode(data)
            assert (g.width, g.height, g.sha256) == (ref.width, ref.height, ref.sha256), name
            assert g.image.shape == ref.image.shape and g.image.dtype == torch.uint8, name
        else:
            assert isinstance(g, DecodeError) and expected in g.reason, (name, g)


def test_a_bad_jpeg_in_the_batch_does_not_cost_the_good_ones_their_pixels():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))
    good = [_jpeg(smooth, o) for o in (1, 6, 3)]
    bad = good[0][: len(good[0]) // 3]
    with ThreadPoolExecutor(2) as pool:
        got = decode_on_device([good[0], bad, good[1], good[2]], torch.device("cpu"), pool)
    assert isinstance(got[1], DecodeError) and "truncated" in got[1].reason
    for data, g in zip(good, [got[0], got[2], got[3]]):
        ref = decode(data).image.int()
        assert g.image.shape == ref.shape
        assert (g.image.int() - ref).abs().float().mean() < 2.0  # two libjpeg builds, same picture


def test_a_jpeg_cut_short_goes_to_pil_and_one_with_bytes_after_its_end_is_still_read():
    """nvJPEG decoded a JPEG cut in half without an error on an H200 (grey rows, labelled
    non_regular): only streams that end with their end-of-image marker go to the device."""
    whole = _jpeg(np.full((64, 96, 3), 120, np.uint8))
    assert ends_whole(whole) and not ends_whole(whole[: len(whole) // 2])
    assert not ends_whole(whole + b"camera trailer") and not ends_whole(DecodeError("unreadable"))
    with ThreadPoolExecutor(1) as pool:
        cut, trailed = decode_on_device([whole[: len(whole) // 2], whole + b"camera trailer"], torch.device("cpu"),
                                        pool)
    with pytest.raises(DecodeError) as pil_verdict:
        decode(whole[: len(whole) // 2])
    assert isinstance(cut, DecodeError) and cut.reason == pil_verdict.value.reason
    assert isinstance(trailed, Decoded) and trailed.image.shape == decode(whole).image.shape


def test_downscales_to_the_size_pils_dct_scaled_decode_gives_and_keeps_the_full_size():
    """The size PIL's draft gives the same JPEG (half here, at least the long side asked for):
    resized to exactly that long side, one photo's scores moved between the two decoders."""
    data = _jpeg(np.full((300, 500, 3), 90, np.uint8), orientation=6)
    with ThreadPoolExecutor(1) as pool:
        (g,) = decode_on_device([data], torch.device("cpu"), pool, min_long_side=200)
    assert (g.width, g.height) == (300, 500)  # displayed (rotated) full size
    assert g.image.shape == decode(data, min_long_side=200).image.shape == (3, 250, 150)
    assert g.scale == pytest.approx((0.5, 0.5), abs=0.01)


def test_the_device_decoder_reduces_by_block_averages_as_every_other_format_is_reduced_on_the_cpu():
    """An antialiased bilinear resize was 0.88 grey levels from PIL's DCT-scaled decode on
    average where block averages are 0.24; on 534 real photos at 1600 px it flipped two labels
    and moved 19 boxes by more than 5 px against the PIL decoder (an audit)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (301, 401, 3), dtype=np.uint8)  # odd sizes: the last blocks are partial
    data = _jpeg(pixels, quality=100)
    with ThreadPoolExecutor(1) as pool:
        (g,) = decode_on_device([data], torch.device("cpu"), pool, min_long_side=200)
    reduced = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").reduce(2)).transpose(2, 0, 1)
    assert g.image.shape == reduced.shape == (3, 151, 201)
    assert np.abs(g.image.numpy().astype(int) - reduced).max() <= 2


def test_a_large_palette_with_alpha_photo_decodes_as_its_colours_not_black():
    """PA was reduced as raw palette indices: every pixel black, the photo no_cervix (an audit)."""
    from pipelines.engine.decode import DecodeLimits

    yy, xx = np.mgrid[0:1500, 0:2000]
    rgb = Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))
    pa = rgb.convert("P").convert("PA")
    buf = io.BytesIO()
    pa.save(buf, format="TIFF")
    got = decode(buf.getvalue(), DecodeLimits(), 640)
    want = decode(_tiff(pa.convert("RGB")), DecodeLimits(), 640)
    assert got.image.shape == want.image.shape and got.image.shape[-1] < 2000  # reduced
    assert abs(float(got.image.float().mean()) - float(want.image.float().mean())) < 2


def _tiff(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="TIFF")
    return buf.getvalue()


def test_a_tiffs_displayed_size_is_the_size_pillow_reports_for_it(tmp_path):
    """Pillow's TIFF reader turns the photo itself: turned again, its boxes were scaled."""
    from pipelines.data.images import displayed_size

    im = Image.new("RGB", (40, 20))
    exif = im.getexif()
    exif[0x0112] = 6
    for ext in ("tif", "jpg"):
        im.save(tmp_path / f"o6.{ext}", exif=exif)
        assert displayed_size(tmp_path / f"o6.{ext}") == (20, 40), ext
