"""Tiny untrained weights folders for engine tests (real architectures, small sizes)."""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.classifier import ClassifierConfig, RegularityClassifier
from models.colour import CropColour, CropColourConfig
from models.deep_sad import DeepSAD
from models.detector import DetectorConfig, build_detector
from models.io import ModelCard, load_card, save_weights
from models.presence import PresenceConfig, PresenceHead
from pipelines.engine.findings import SCORES_VERSION, FindingsCard
from pipelines.engine.presence import detect_with_features


_built: dict[tuple, tuple[Path, torch.Tensor]] = {}  # arguments -> (folder built, torch's generator after)


def tiny_weights(folder: Path, detector_threshold: float, score_thresh: float = 0.0,
                 presence_threshold: float | None = None, findings: dict[str, float] | None = None,
                 colour_threshold: float | None = None, colour_spread: float = 0.0,
                 sad_threshold: float = 1.0, cls_threshold: float = 0.5, detector_size: int = 96) -> Path:
    """Untrained models at tiny sizes; a presence head (stage 0) only when its threshold is given
    (its weights are zero, so every photo scores 0 against that threshold); a findings card
    only when its thresholds are given; a crop-colour scorer only when its threshold is given
    (zero weights: every crop scores 0.5 against it; `colour_spread` > 0 draws its weights from
    N(0, spread), seeded, so crops of different colours score on both sides of 0.5).

    The untrained stage-2 networks say yes to every crop at the default thresholds (Deep SAD
    distances 1.1-1.2 against 1.0, classifier probabilities 0.5008-0.5021 against 0.5): a test
    of a rule that combines them raises `sad_threshold` or `cls_threshold` (say 100 or 0.99)
    so that one of them says no, or every policy gives the same label. `detector_size`: the
    detector's input side (min and max).

    Built once per process for each set of arguments and copied after: a build took 1.0 s on
    the 2-core machine (initialising the networks, writing 109 MB with fsync), a copy 0.06 s,
    and most of the suite's 70-odd calls ask for the same few folders. The copy holds the bytes
    a build writes (seeded), and torch's global generator is left where a build leaves it: a
    build reseeds it, and tests draw from it after."""
    key = (detector_threshold, score_thresh, presence_threshold,
           None if findings is None else tuple(sorted(findings.items())), colour_threshold, colour_spread,
           sad_threshold, cls_threshold, detector_size)
    if key not in _built:
        built = Path(tempfile.mkdtemp(prefix="tiny-weights-", dir=_cache_root()))
        _build(built, detector_threshold, score_thresh, presence_threshold, findings, colour_threshold,
               colour_spread, sad_threshold, cls_threshold, detector_size)
        _built[key] = built, torch.get_rng_state()
    built, generator = _built[key]
    shutil.copytree(built, folder, dirs_exist_ok=True)
    torch.set_rng_state(generator)
    return folder


@functools.cache
def _cache_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="cervixqc-tiny-weights-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _build(folder: Path, detector_threshold: float, score_thresh: float, presence_threshold: float | None,
           findings: dict[str, float] | None, colour_threshold: float | None, colour_spread: float,
           sad_threshold: float, cls_threshold: float, detector_size: int) -> None:
    if findings is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "findings.json").write_text(FindingsCard(thresholds=findings,
                                                           scores_version=SCORES_VERSION).model_dump_json())
    torch.manual_seed(0)
    det_cfg = DetectorConfig(backbone="resnet18", min_size=detector_size, max_size=detector_size,
                             score_thresh=score_thresh)
    detector = build_detector(det_cfg)
    det_card = save_weights(detector.state_dict(), folder / "detector",
                            ModelCard(name="detector", architecture="retinanet_resnet18_fpn", config=det_cfg.as_dict(),
                                      input_size=[detector_size] * 2, classes=["cervix"],
                                      thresholds={"score": detector_threshold}))
    if presence_threshold is not None:
        _, feats = detect_with_features(detector.eval(), [torch.rand(3, 60, 80)], torch.device("cpu"))
        cfg = PresenceConfig(feature_dim=feats.shape[1])
        save_weights(PresenceHead(cfg).state_dict(), folder / "presence",
                     ModelCard(name="presence", architecture="presence_linear_heads",
                               config={**cfg.as_dict(), "detector_sha256": load_card(det_card).sha256},
                               classes=["no_cervix", "cervix"], thresholds={"score": presence_threshold}))
    sad = DeepSAD()
    sad.c.fill_(0.1)
    save_weights(sad.state_dict(), folder / "deep_sad",
                 ModelCard(name="deep_sad", architecture="lenet32_deep_sad", config={"rep_dim": 128},
                           input_size=[32, 32], thresholds={"distance": sad_threshold}))
    cls_cfg = ClassifierConfig(arch="resnest14d", input_size=32)
    save_weights(RegularityClassifier(cls_cfg).state_dict(), folder / "classifier",
                 ModelCard(name="classifier", architecture="resnest14d", config=cls_cfg.as_dict(),
                           input_size=[32, 32], classes=["regular", "green", "iodine"],
                           thresholds={"probability": cls_threshold}))
    if colour_threshold is not None:
        colour = CropColour(CropColourConfig())
        if colour_spread:
            colour.weight.normal_(0.0, colour_spread, generator=torch.Generator().manual_seed(1))
        save_weights(colour.state_dict(), folder / "colour",
                     ModelCard(name="colour", architecture="crop_colour_logistic", config=CropColourConfig().as_dict(),
                               input_size=[32, 32], classes=["regular", "non_regular"],
                               thresholds={"probability": colour_threshold}))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.new("RGB", (120, 80), (200, 80, 80)), "JPEG", exif=exif.tobytes())


def fuzz_set() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected error fragment or None when it must be processed)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    jpeg = _save(photo, "JPEG")
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0))]
    tiff = io.BytesIO()
    frames[0].save(tiff, "TIFF", save_all=True, append_images=frames[1:])
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    return {
        "zero.jpg": (b"", "empty file"),
        "random.jpg": (rng.bytes(5000), "not an image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated or corrupt"),
        "text.jpg": (b"patient notes, not a picture\n" * 20, "not an image"),
        # in whole pixels: rounded to MP, 10001x10000 read "100 MP > 100 MP" (an audit)
        "bomb.png": (_save(Image.new("1", (20000, 20000)), "PNG"), "too many pixels (20000x20000 = 400,000,000 > "),
        # a readable sliver: resized for the detector, its short side was 0 px, and the batch failed
        "sliver.png": (_save(Image.new("RGB", (6000, 16), (200, 80, 80)), "PNG"), "aspect ratio too extreme"),
        "tiny.png": (_save(Image.new("RGB", (15, 15), (200, 80, 80)), "PNG"), "image too small"),  # a thumbnail's icon
        "sixteen_bit.png": (_save(Image.fromarray((rng.integers(0, 65535, (64, 80))).astype(np.uint16)), "PNG"), None),
        "cmyk.jpg": (_save(photo.convert("CMYK"), "JPEG"), None),
        "gray.jpg": (_save(photo.convert("L"), "JPEG"), None),
        "palette.png": (_save(palette, "PNG"), None),
        "exif6.jpg": (_exif(6), None),
        "exif8.jpg": (_exif(8), None),
        "multi.tiff": (tiff.getvalue(), None),
        "multi.gif": (gif.getvalue(), None),
        "ok.jpg": (jpeg, None),
    }


def textured_scene(seed: int, size=(640, 480)) -> Image.Image:
    """Texture at three scales (tissue, vessels, speckle): something for keypoints to hold."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size[1], size[0], 3), np.float32)
    for cells, weight in (((6, 8), 0.5), ((30, 40), 0.3), ((120, 160), 0.2)):
        low = rng.integers(0, 256, (*cells, 3), dtype=np.uint8)
        out += weight * np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BICUBIC), np.float32)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def cropped_copy(img: Image.Image) -> Image.Image:
    """10% off the left and top, 5% off the right, then shrunk by a third and turned 3 degrees."""
    w, h = img.size
    c = img.crop((int(0.10 * w), int(0.10 * h), int(0.95 * w), h))
    return c.resize((c.width * 2 // 3, c.height * 2 // 3), Image.Resampling.LANCZOS).rotate(3, Image.Resampling.BICUBIC)
