import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.engine.config import QCConfig
from pipelines.engine.qc import QCPipeline
from pipelines.engine.qc_result import Label
from tests.qc_fixtures import fuzz_set, jpeg_bytes, textured_scene, tiny_weights


@pytest.fixture(scope="module")
def always_cervix(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("w0"), detector_threshold=0.0)


@pytest.fixture(scope="module")
def never_cervix(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("w1"), detector_threshold=1.01)


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_every_fuzz_input_gets_its_own_row_in_order_and_the_batch_goes_on(always_cervix, decoder):
    qc = QCPipeline(always_cervix, QCConfig(jpeg_decoder=decoder))
    cases = fuzz_set()
    results = qc.run([b for b, _ in cases.values()], names=list(cases))
    assert [r.path for r in results] == list(cases)
    for (name, (_, expected)), r in zip(cases.items(), results):
        if expected is None:
            assert r.label in (Label.REGULAR, Label.NON_REGULAR), (name, r.error)
            assert r.cervix_box is not None and r.deep_sad_score is not None and r.resnest_prob is not None
            assert len(r.sha256) == 64
        else:
            assert r.label == Label.UNREADABLE and expected in r.error, (name, r.error)


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_exif_rotation_reports_the_displayed_size(always_cervix, decoder):
    cases = fuzz_set()
    r6, r8, plain = QCPipeline(always_cervix, QCConfig(jpeg_decoder=decoder)).run([cases["exif6.jpg"][0], cases["exif8.jpg"][0], cases["ok.jpg"][0]])
    assert (r6.width, r6.height) == (80, 120) and (r8.width, r8.height) == (80, 120)
    assert (plain.width, plain.height) == (120, 90)
    x1, y1, x2, y2 = r6.cervix_box
    assert 0 <= x1 < x2 <= 80 and 0 <= y1 < y2 <= 120


def test_no_box_above_the_cards_threshold_means_no_cervix(never_cervix):
    r = QCPipeline(never_cervix).run([fuzz_set()["ok.jpg"][0]])[0]
    assert r.label == Label.NO_CERVIX and r.cervix_box is None and r.error is None


def test_an_image_with_no_detection_at_all_is_no_cervix_even_at_threshold_zero(tmp_path):
    silent = tiny_weights(tmp_path, detector_threshold=0.0, score_thresh=0.999)  # detector returns nothing
    r = QCPipeline(silent).run([fuzz_set()["ok.jpg"][0]])[0]
    assert r.label == Label.NO_CERVIX and r.cervix_score == 0.0


def test_batched_results_equal_one_at_a_time(always_cervix):
    qc = QCPipeline(always_cervix)
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8) for i in range(4)]
    batched = qc.run(arrays)
    single = [qc.run([a])[0] for a in arrays]
    for b, s in zip(batched, single):
        assert b.label == s.label and b.cervix_box == pytest.approx(s.cervix_box, abs=0.2)
        assert b.resnest_prob == pytest.approx(s.resnest_prob, abs=1e-4)


def test_detector_chunks_sorted_by_aspect_give_each_image_its_own_detections(always_cervix):
    """Chunks are formed in aspect order, results come back in input order: every box lies
    inside its own image, which a mix-up of a tall and a wide image would break."""
    qc = QCPipeline(always_cervix, QCConfig(detector_batch=2))
    rng = np.random.default_rng(3)
    shapes = [(40, 200), (200, 40), (60, 180), (180, 60), (100, 100)]
    floats = [torch.from_numpy(rng.random((3, h, w), dtype=np.float32)) for h, w in shapes]
    dets, features = qc._detect(floats)
    assert features is None  # no presence head in this fixture: no FPN features are kept
    assert len(dets) == len(floats)
    for (h, w), det in zip(shapes, dets):
        assert len(det["boxes"]) > 0
        assert float(det["boxes"][:, 2].max()) <= w + 1e-3 and float(det["boxes"][:, 3].max()) <= h + 1e-3
    assert any(float(d["boxes"][:, 2].max()) > 60 for d in dets)  # boxes do reach past the narrow sides


def test_a_photo_the_models_cannot_take_costs_its_own_row_not_its_batch(always_cervix):
    """The decode checks turned off for slivers: the detector's resize fails on one, so the
    batch is judged photo by photo; where every photo fails alone, the batch's error stands."""
    from pipelines.engine.decode import DecodeLimits

    cases = fuzz_set()
    ok, sliver = cases["ok.jpg"][0], cases["sliver.png"][0]
    qc = QCPipeline(always_cervix, QCConfig(device="cpu", runtime="torch", limits=DecodeLimits(max_aspect=1e9)))
    rows = qc.run([ok, sliver, ok], names=["a.jpg", "sliver.png", "b.jpg"])
    assert [r.path for r in rows] == ["a.jpg", "sliver.png", "b.jpg"]
    assert rows[1].label == Label.UNREADABLE and "the models failed on this image (RuntimeError" in rows[1].error
    assert rows[0].label == rows[2].label == QCPipeline(always_cervix).run([ok])[0].label != Label.UNREADABLE
    with pytest.raises(RuntimeError, match="sizes should be greater than 0"):
        qc.run([sliver, sliver])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_a_fifo_or_an_oversized_file_in_a_folder_is_refused_before_it_is_read(always_cervix, tmp_path, decoder):
    """Reading a FIFO would block the engine for good; an oversized file was read whole first."""
    from pipelines.engine.decode import DecodeLimits

    os.mkfifo(tmp_path / "pipe.jpg")
    with open(tmp_path / "big.jpg", "wb") as f:  # sparse: 5 MB on paper, nothing on disk
        f.truncate(5_000_000)
    (tmp_path / "ok.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    qc = QCPipeline(always_cervix, QCConfig(jpeg_decoder=decoder, limits=DecodeLimits(max_bytes=1_000_000)))
    rows = qc.run([tmp_path / n for n in ("pipe.jpg", "big.jpg", "ok.jpg")])
    assert rows[0].label == Label.UNREADABLE and "not a regular file" in rows[0].error
    assert rows[1].label == Label.UNREADABLE and "file too large (5000000 bytes > 1000000)" in rows[1].error
    assert rows[2].label != Label.UNREADABLE


def test_the_detector_input_shape_is_known_before_the_detector_runs(always_cervix):
    from pipelines.engine.detector import padded_shape, resized_then_normalized

    transform = QCPipeline(always_cervix).detector.transform
    rng = np.random.default_rng(0)
    for h, w in [(80, 120), (120, 80), (9, 180), (1000, 750), (750, 1000)] + rng.integers(16, 1500, (60, 2)).tolist():
        batch = resized_then_normalized(transform, [torch.zeros(3, h, w)])
        assert padded_shape(transform, h, w) == tuple(batch.tensors.shape[-2:]), (h, w)


def test_a_photos_answer_does_not_depend_on_the_photos_batched_with_it(always_cervix):
    """A portrait photo alone and among landscape ones: same box, scores and label (padded to
    their shape, it got another box)."""
    portrait, landscape = jpeg_bytes(textured_scene(1, (200, 400))), jpeg_bytes(textured_scene(2, (400, 300)))
    qc = QCPipeline(always_cervix, QCConfig(device="cpu", runtime="torch"))
    alone = qc.run([portrait])[0]
    among = qc.run([landscape, portrait, landscape])[1]
    assert alone.cervix_box is not None
    for field in ("cervix_box", "cervix_score", "deep_sad_score", "resnest_prob", "label"):
        assert getattr(among, field) == getattr(alone, field), field


@pytest.mark.parametrize("says", ["resnest only", "deep_sad only"])
def test_policies_combine_the_two_models(tmp_path, says):
    """One model says yes and the other no (its threshold raised out of reach), so each policy
    has one right answer."""
    no = {"sad_threshold": 100.0} if says == "resnest only" else {"cls_threshold": 0.99}
    weights = tiny_weights(tmp_path, detector_threshold=0.0, **no)
    data = [fuzz_set()["ok.jpg"][0]]
    by = {p: QCPipeline(weights, QCConfig(policy=p)).run(data)[0].label for p in ("deep_sad", "resnest", "either", "both")}
    flags = {"deep_sad": says == "deep_sad only", "resnest": says == "resnest only", "either": True, "both": False}
    assert by == {p: Label.NON_REGULAR if f else Label.REGULAR for p, f in flags.items()}


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_predict_command_prints_json_records(always_cervix, tmp_path, decoder):
    cases = fuzz_set()
    for name in ("ok.jpg", "zero.jpg"):
        (tmp_path / name).write_bytes(cases[name][0])
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "ok.jpg"), str(tmp_path / "zero.jpg"),
                                 "--weights", str(always_cervix), "--json", "--jpeg-decoder", decoder])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["label"] for row in rows][1] == "unreadable" and rows[0]["sha256"]
    # printed batch by batch (predict *.jpg held every photo decoded at once): the same rows
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "ok.jpg"), str(tmp_path / "zero.jpg"), str(tmp_path / "ok.jpg"),
                                 "--weights", str(always_cervix), "--json", "--jpeg-decoder", decoder, "--batch-size", "1"])
    again = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and [(x["path"], x["label"]) for x in again] == [(x["path"], x["label"]) for x in rows + rows[:1]]


def test_predict_fails_when_not_one_image_could_be_read(always_cervix, tmp_path):
    """A script given one photo learned nothing from the exit status: 0 for an unreadable one.
    One readable photo among unreadable ones is an answer, as in `clean`: status 0."""
    cases = fuzz_set()
    for name in ("ok.jpg", "zero.jpg"):
        (tmp_path / name).write_bytes(cases[name][0])
    args = ["--weights", str(always_cervix), "--json"]
    bad = CliRunner().invoke(app, ["predict", str(tmp_path / "zero.jpg"), str(tmp_path / "gone.jpg"), *args])
    assert bad.exit_code == 1 and "2 of 2 images could not be read" in bad.stderr
    assert [json.loads(line)["label"] for line in bad.stdout.splitlines()] == ["unreadable", "unreadable"]
    mixed = CliRunner().invoke(app, ["predict", str(tmp_path / "zero.jpg"), str(tmp_path / "ok.jpg"), *args])
    assert mixed.exit_code == 0 and "1 of 2 images could not be read" in mixed.stderr

    # a name that is not UTF-8 (Latin-1 from an old Windows PC): --json crashed on its record
    latin1 = Path(os.fsdecode(bytes(tmp_path) + b"/Pe\xf1a.jpg"))
    latin1.write_bytes(cases["ok.jpg"][0])
    r = CliRunner().invoke(app, ["predict", str(latin1), str(tmp_path / "ok.jpg"), *args])
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and rows[0]["path"].endswith("/Pe\\xf1a.jpg") and len(rows) == 2, r.output


def test_the_default_decoder_is_nvjpeg_on_cuda_where_it_decodes_and_pil_elsewhere(always_cervix, caplog):
    from pipelines.engine.config import resolve_decoder
    from pipelines.engine.decode_device import decodes_on

    cuda = torch.device("cuda", 0)
    assert resolve_decoder("auto", cuda, device_decodes=lambda d: True) == "torchvision"
    with caplog.at_level("WARNING", logger="pipelines.engine.config"):
        assert resolve_decoder("auto", cuda, device_decodes=lambda d: False) == "pil"
    assert "could not decode a test JPEG on cuda:0" in caplog.text
    assert resolve_decoder("auto", torch.device("cpu")) == "pil"
    assert resolve_decoder("pil", cuda) == "pil"  # asked for, kept
    # the probe itself: torchvision decodes on the CPU; CUDA only where this machine has it
    assert decodes_on(torch.device("cpu")) and decodes_on(cuda) is torch.cuda.is_available()
    assert QCPipeline(always_cervix, QCConfig(device="cpu")).jpeg_decoder == "pil"


def test_the_gpu_profile_script_puts_every_photo_in_one_detector_forward_at_each_batch_size(always_cervix, tmp_path):
    """tests/benchmarks/cuda_engine_profile.py runs on a lent GPU only once a session: run here on
    the CPU so it cannot rot unseen."""
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.cuda_engine_profile", "--weights",
                           str(always_cervix), "--device", "cpu", "--n", "10", "--batches", "3,8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["engine_batch"] for r in rows] == [3, 8]
    for r in rows:
        assert sum(int(k) * v for k, v in r["forward_sizes"].items()) == r["photos"] == 10
        assert r["images_per_s"] > 0 and {"decode", "detect", "classify"} <= set(r["stage_seconds"])
    assert rows[0]["detector_forwards"] >= rows[1]["detector_forwards"]  # smaller engine batches: no fuller forwards


def test_an_unknown_jpeg_decoder_is_a_clear_error(always_cervix, tmp_path):
    r = CliRunner().invoke(app, ["clean", str(tmp_path), "-o", str(tmp_path / "out"), "--weights",
                                 str(always_cervix), "--jpeg-decoder", "nvjpeg"])
    assert r.exit_code == 2 and "must be auto, pil or torchvision" in r.output


def test_bench_runs_every_mode_on_the_same_files_and_reports_ratios_and_label_changes(always_cervix, tmp_path):
    from pipelines.evaluation.engine_bench import bench

    cases = fuzz_set()
    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(cases["ok.jpg"][0])
        paths.append(p)
    # torch twice, the second decoding ahead: an OpenVINO mode cost a conversion (20 s of the
    # suite) for runtime names that tests/test_exported_runtime.py pins down already
    r = bench(always_cervix, paths, batch_size=4, modes=(("torch", "auto", False), ("torch", "auto", True)))
    torch_run, ahead_run = r["batched"]
    assert r["naive"]["images"] == torch_run["images"] == ahead_run["images"] == 4
    assert ahead_run["speedup_vs_naive"] == pytest.approx(ahead_run["images_per_s"] / r["naive"]["images_per_s"])
    assert r["naive"]["peak_rss_mb"] > 0 and set(ahead_run["stage_seconds"]) >= {"decode", "detect"}
    assert torch_run["runtimes"]["detector"] == ahead_run["runtimes"]["detector"] == "torch"
    # decoding ahead changes when photos are read, never what they are labelled; findings' flags
    # too (a score moved across its threshold moves a photo into a quarantine folder). The first
    # batched mode is the reference: its own counts are 0 by construction
    assert ahead_run["labels_differing_from_first_batched"]["count"] == 0
    assert ahead_run["findings_differing_from_first_batched"]["count"] == 0


def test_the_naive_loop_can_time_a_spread_subset_and_the_ratio_is_of_rates(always_cervix, tmp_path):
    """A long GPU run: the naive loop on 4,096 photos would have taken ten minutes of a lease."""
    from pipelines.evaluation.engine_bench import naive_subset

    names = [Path(f"{i}.jpg") for i in range(10)]
    assert naive_subset(names, 4) == [names[0], names[3], names[6], names[9]]
    assert naive_subset(names, 1) == names[:1] and naive_subset(names, None) == naive_subset(names, 12) == names
    ok = fuzz_set()["ok.jpg"][0]
    for i in range(5):
        (tmp_path / f"img{i}.jpg").write_bytes(ok)
    r = CliRunner().invoke(app, ["bench", "--images", str(tmp_path), "--weights", str(always_cervix), "--modes",
                                 "torch", "--batch-size", "5", "--naive-images", "2", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    naive, batched = result["naive"], result["batched"][0]
    assert naive["images"] == 2 and batched["images"] == 5
    assert batched["speedup_vs_naive"] == pytest.approx(batched["images_per_s"] / naive["images_per_s"])
    assert "(on 2 of the 5 photos)" in r.stderr


def test_the_bench_counts_every_label_a_mode_changes():
    from pipelines.evaluation.engine_bench import label_changes

    reference = {"a.jpg": "regular", "b.jpg": "non_regular", "c.jpg": "no_cervix"}
    assert label_changes(reference, dict(reference)) == {"count": 0, "examples": {}}
    changed = label_changes(reference, {"a.jpg": "non_regular", "b.jpg": "non_regular", "c.jpg": "regular",
                                        "d.jpg": "regular"}, examples=2)
    assert changed == {"count": 3, "examples": {"a.jpg": "regular -> non_regular", "c.jpg": "no_cervix -> regular"}}


def test_detector_batch_comparison_times_every_size_against_the_first(always_cervix, tmp_path):
    from pipelines.evaluation.engine_bench import detector_batch_ab

    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(fuzz_set()["ok.jpg"][0])
        paths.append(p)
    r = detector_batch_ab(always_cervix, paths, [1, 3], batch_size=3, rounds=1)
    assert set(r["median_seconds"]) == {"1", "3"} and all(v > 0 for v in r["median_seconds"].values())
    assert r["speedup_vs_detector_batch_1"]["1"] == 1.0
    bad = CliRunner().invoke(app, ["bench", "--weights", str(always_cervix), "--detector-batches", "1,0"])
    assert bad.exit_code == 2 and "positive integers" in bad.output


def test_decode_ahead_gives_the_results_of_run_and_reads_at_most_one_batch_ahead(always_cervix, tiny_dataset):
    photos = sorted((tiny_dataset.out_dir / "images").rglob("*.jpg"))[:6]
    pulled = []

    def batches():
        for i in range(0, 6, 2):
            pulled.append(i)
            yield photos[i : i + 2], [f"p{i}", f"p{i + 1}"]

    qc = QCPipeline(always_cervix, QCConfig(decode_ahead=True))
    stream = qc.run_stream(batches())
    first = next(stream)
    assert len(pulled) == 2  # the batch being returned and the one decoding behind it
    streamed = first + [r for batch in stream for r in batch]
    plain = [r for i in range(0, 6, 2) for r in qc.run(photos[i : i + 2], names=[f"p{i}", f"p{i + 1}"])]
    assert [(r.path, r.label, r.sha256) for r in streamed] == [(r.path, r.label, r.sha256) for r in plain]
    assert all(np.allclose(a.cervix_box, b.cervix_box) for a, b in zip(streamed, plain))
    assert streamed[0].timings_ms["decode"] > 0 and streamed[0].timings_ms["total"] >= streamed[0].timings_ms["decode"]


def test_decode_ahead_yields_the_batch_in_hand_before_raising_for_the_next_one(always_cervix, tiny_dataset):
    """Batch n+1 is read before batch n is yielded; a refused batch n+1 (or a caller's reader
    raising) was raised first, and batch n's decoded rows never reached the caller (an audit)."""
    photos = sorted((tiny_dataset.out_dir / "images").rglob("*.jpg"))[:2]

    def refused_next():
        yield photos, ["a", "b"]
        yield photos, ["c"]

    def reader_fails():
        yield photos, ["a", "b"]
        raise OSError("the share went away")

    qc = QCPipeline(always_cervix, QCConfig(decode_ahead=True))
    try:
        for batches, error, match in ((refused_next, ValueError, "names: 1 for 2 items"),
                                      (reader_fails, OSError, "the share went away")):
            got = []
            with pytest.raises(error, match=match):
                for results in qc.run_stream(batches()):
                    got.append([r.path for r in results])
            assert got == [["a", "b"]]
    finally:
        qc.close()


def test_decode_ahead_judges_each_array_batch_on_its_own_pixels_when_the_caller_refills_one_buffer(
        always_cervix, tiny_dataset):
    """A frame reader refills one buffer per batch: the engine shared it, and with decode ahead
    batch n was judged on batch n+1's pixels under batch n's sha256 (an audit)."""
    from PIL import Image

    frames = [np.array(Image.open(p).convert("RGB").resize((96, 80)))
              for p in sorted((tiny_dataset.out_dir / "images").rglob("*.jpg"))[:3]]
    buffer = np.empty_like(frames[0])

    def batches():
        for i, frame in enumerate(frames):
            buffer[...] = frame
            yield [buffer], [f"f{i}"]

    qc = QCPipeline(always_cervix, QCConfig(decode_ahead=True))
    streamed = [r for batch in qc.run_stream(batches()) for r in batch]
    alone = [qc.run([frame], names=[f"f{i}"])[0] for i, frame in enumerate(frames)]
    assert [(r.path, r.sha256, r.deep_sad_score) for r in streamed] == [(r.path, r.sha256, r.deep_sad_score)
                                                                        for r in alone]


def test_the_device_decoder_reads_a_bytearray_and_gives_a_non_input_its_own_row(always_cervix):
    """The PIL path took bytearray and memoryview; on the device path they, and an int, failed
    the whole batch with a TypeError (an audit)."""
    jpeg = fuzz_set()["ok.jpg"][0]
    qc = QCPipeline(always_cervix, QCConfig(jpeg_decoder="torchvision"))
    results = qc.run([bytearray(jpeg), 123, memoryview(jpeg), jpeg])
    assert [r.label for r in results] == [results[3].label, Label.UNREADABLE, results[3].label, results[3].label]
    assert results[0].sha256 == results[2].sha256 == results[3].sha256 and "not an input" in results[1].error


def test_the_torch_runtime_runs_detectors_other_than_retinanet(tmp_path, tiny_dataset):
    from models.detector import DetectorConfig, build_detector
    from models.io import ModelCard, save_weights

    folder = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    cfg = DetectorConfig(arch="fcos", backbone="resnet18", min_size=96, max_size=96, score_thresh=0.0)
    save_weights(build_detector(cfg).state_dict(), folder / "detector",
                 ModelCard(name="detector", architecture="fcos_resnet18_fpn", config=cfg.as_dict(), input_size=[96, 96],
                           classes=["cervix"], thresholds={"score": 0.0}))
    qc = QCPipeline(folder, QCConfig())
    assert qc.runtimes["detector"] == "torch"
    results = qc.run(sorted((tiny_dataset.out_dir / "images").rglob("*.jpg"))[:3])
    assert all(r.label in (Label.REGULAR, Label.NON_REGULAR) and r.cervix_box for r in results), results


@pytest.mark.parametrize("fmt,mode", [("TIFF", "RGB"), ("PNG", "P"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("PNG", "I;16")])
def test_a_turned_photo_of_every_format_reports_its_displayed_size_small_or_full(fmt, mode):
    """Pillow's TIFF reader turns as it loads: turned again, a TIFF's size was swapped and its
    box scaled by (4/3, 3/4). The other formats are turned after they are reduced now."""
    import io

    from PIL import Image

    from pipelines.engine.decode import decode

    stored = Image.fromarray(np.asarray(textured_scene(4).resize((300, 400))))  # as a phone turned 90° stores it
    if mode == "I;16":
        stored = Image.fromarray((np.asarray(stored.convert("L"), np.uint16) * 257))
    elif mode != "RGB":
        stored = stored.convert(mode)
    if mode == "P":
        stored.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, fmt, exif=exif)
    for target in (None, 100):
        d = decode(buf.getvalue(), min_long_side=target)
        assert (d.width, d.height) == (400, 300), (fmt, mode, target)
        assert d.image.shape[2] > d.image.shape[1], (fmt, mode, target)  # the pixels turned once, too



def _with_app1(jpeg: bytes, tiff: bytes) -> bytes:
    """`jpeg` with an EXIF segment of our own bytes (Pillow writes only well-formed ones)."""
    import struct

    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_a_text_orientation_turns_neither_the_size_nor_the_pixels_on_either_decoder():
    """A text "6" in the Orientation tag turned the reported size but not the pixels on the
    PIL decoder (a box scaled 1.33 x 0.75) and both on the device decoder (another box and
    score): every decoder now turns by the one reading of the header, and a text value is no
    turn, as `ImageOps.exif_transpose` has it. A LONG 6 is a turn like a SHORT 6."""
    import struct
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.engine.decode import decode, read_header
    from pipelines.engine.decode_device import decode_on_device

    plain = jpeg_bytes(textured_scene(6, (400, 300)), 95)
    ifd = b"II*\x00" + struct.pack("<IH", 8, 1)
    text = _with_app1(plain, ifd + struct.pack("<HHII", 0x0112, 2, 2, 0x36) + bytes(4))  # ASCII "6"
    long6 = _with_app1(plain, ifd + struct.pack("<HHII", 0x0112, 4, 1, 6) + bytes(4))
    with ThreadPoolExecutor(1) as pool:
        for data, turned in ((text, False), (long6, True)):
            size = (300, 400) if turned else (400, 300)
            assert read_header(data).display_size == size
            (on_device,) = decode_on_device([data], torch.device("cpu"), pool)
            for d in (decode(data), on_device):
                assert (d.width, d.height) == size
                assert tuple(d.image.shape[1:]) == size[::-1]
                assert d.scale == pytest.approx((1.0, 1.0))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_a_pngs_exif_behind_its_pixels_is_read_without_decoding_them():
    """Pillow reaches an eXIf chunk behind the pixel data only by decoding the whole image: a
    100 MP PNG's header read took as long as its decode, and `decode` decoded it before taking
    its one-at-a-time turn for costly photos (two at once, +830 MiB against +470; an audit).
    Here the pixel data is damaged: only a read of the chunk headers finds the turn."""
    import io

    from PIL import Image

    from pipelines.engine.decode import DecodeError, decode, read_header

    buf = io.BytesIO()
    Image.fromarray(np.asarray(textured_scene(7, (300, 400)))).save(buf, "PNG")  # stored as a phone turned 90°
    data = buf.getvalue()
    end = data.rindex(b"IEND") - 4
    exif = Image.Exif()
    exif[0x0112] = 6
    whole = data[:end] + _png_chunk(b"eXIf", exif.tobytes()) + data[end:]
    idat = whole.index(b"IDAT") + 4
    damaged = whole[:idat] + bytes(200) + whole[idat + 200:]
    assert read_header(damaged).orientation == 6 and read_header(damaged).display_size == (400, 300)
    with pytest.raises(DecodeError):
        decode(damaged)
    d = decode(whole)
    assert (d.width, d.height) == (400, 300) and tuple(d.image.shape[1:]) == (300, 400)


def test_an_arithmetic_coded_jpeg_decodes_and_other_unsupported_files_say_what_they_are(tmp_path):
    """Pillow fails on an arithmetic-coded JPEG past its read buffer (64 KB): the row said
    "truncated or corrupt" of a file every viewer shows. A 12-bit JPEG and a DICOM export
    were "not an image"."""
    import shutil

    from pipelines.engine.decode import DecodeError, decode

    assert shutil.which("jpegtran"), "make test installs libjpeg-turbo-progs (Makefile, browser)"
    plain = jpeg_bytes(textured_scene(5, (640, 480)), 95)
    (tmp_path / "plain.jpg").write_bytes(plain)
    subprocess.run(["jpegtran", "-arithmetic", "-outfile", str(tmp_path / "arith.jpg"), str(tmp_path / "plain.jpg")],
                   check=True)
    arith = (tmp_path / "arith.jpg").read_bytes()
    assert len(arith) > 65536 and arith[:2] == b"\xff\xd8"
    for target in (None, 200):
        a, p = decode(arith, min_long_side=target), decode(plain, min_long_side=target)
        assert (a.width, a.height) == (640, 480) and max(a.image.shape[1:]) >= (target or 640)
        small = torch.nn.functional.interpolate(a.image[None].float(), size=tuple(p.image.shape[1:]), mode="area")
        assert (small[0] - p.image.float()).abs().mean() < 12  # the same picture
    with pytest.raises(DecodeError, match="truncated or corrupt"):  # a damaged one still says so
        decode(arith[: len(arith) // 2])
    twelve = bytearray(jpeg_bytes(textured_scene(5, (64, 48))))
    twelve[twelve.find(b"\xff\xc0") + 4] = 12
    with pytest.raises(DecodeError, match="12-bit JPEG: not supported"):
        decode(bytes(twelve))
    with pytest.raises(DecodeError, match="DICOM file: not supported"):
        decode(bytes(128) + b"DICM" + bytes(300))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n%%EndComments\nshowpage\n%%EOF\n"
    with pytest.raises(DecodeError, match="EPS .PostScript. file: not supported"):  # "truncated or corrupt" before
        decode(eps)


@pytest.mark.parametrize("size", [(2500, 1875), (1279, 960), (3000, 4000)])
def test_the_same_pixels_reach_the_models_at_one_size_whatever_the_file_format_or_decoder(size):
    """A PNG was reduced by long // 640 (2500 px to 833) where its JPEG is drafted by a power of
    two (1250), and the device decoder resized to exactly 640: one photo got another crop,
    other scores and, near the detector's threshold, another label by its file format alone."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from pipelines.engine.decode import decode
    from pipelines.engine.decode_device import decode_on_device

    jpeg = jpeg_bytes(textured_scene(1, size), 95)
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, "PNG")  # the JPEG's own pixels, lossless
    a, b = decode(jpeg, min_long_side=640), decode(png.getvalue(), min_long_side=640)
    with ThreadPoolExecutor(1) as pool:
        (c,) = decode_on_device([jpeg], torch.device("cpu"), pool, min_long_side=640)
    assert a.image.shape == b.image.shape == c.image.shape and max(a.image.shape[1:]) >= 640
    for other in (b, c):
        assert (a.image.float() - other.image.float()).abs().mean() < 1.5


def test_a_large_png_is_reduced_before_it_is_turned_and_made_rgb(tmp_path):
    """Each of those was a full-size copy: a 100 MP RGBA PNG of 418 KB took 2.3 GB more to
    decode (4 in a batch: 5.4 GB). Measured in a child process, whose peak is its own."""
    from PIL import Image

    Image.new("RGBA", (8000, 5000), (96, 48, 48, 128)).save(tmp_path / "big.png")
    code = ("import resource; from pipelines.engine.decode import decode; "
            "b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"d = decode(open({str(tmp_path / 'big.png')!r}, 'rb').read(), min_long_side=640); "
            "print(d.image.shape[1], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - b) // 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    height, extra_mb = int(out[0]), int(out[1])
    assert height == 625 and extra_mb < 350, extra_mb  # the RGBA frame itself is 160 MB; it was 516 MB more


def test_large_photos_decoded_together_cost_about_one_of_them_and_are_given_back(tmp_path):
    """16-bit grey was shifted as uint32 with a copy per step (a 100 MP TIFF took 1.3 GB more),
    the engine's two decode threads took two such photos at once (a service under 32 clients
    peaked at 4.6 GB), and glibc kept the freed copies for the process. Now shifted in place,
    one costly photo decodes at a time, and the memory goes back after it. Measured in a child
    process, whose peak is its own."""
    import numpy as np
    from PIL import Image

    w, h = 8000, 5000  # 40 MP: 80 MB as 16 bits, 160 MB as uint32
    grey = ((np.arange(w)[None] // 8 + np.arange(h)[:, None] // 8) % 4096 * 16).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.tif", compression="tiff_adobe_deflate")
    ramp = (grey >> 8).astype(np.uint8)
    Image.fromarray(np.stack([ramp, ramp[::-1], ramp[:, ::-1]], -1)).save(tmp_path / "c.png", compress_level=1)
    code = ("import resource; from concurrent.futures import ThreadPoolExecutor; "
            "from pipelines.engine.decode import decode; "
            "rss = lambda: int([x for x in open('/proc/self/status') if x.startswith('VmRSS')][0].split()[1]); "
            f"tif, png = (open(f, 'rb').read() for f in ({str(tmp_path / 'g.tif')!r}, {str(tmp_path / 'c.png')!r})); "
            "b, r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss(); "
            "pool = ThreadPoolExecutor(2); "
            "d = [x for _ in range(2) for x in pool.map(lambda x: decode(x, min_long_side=640), [tif, png, tif])]; "
            "print(d[0].image.shape[1], int(d[0].image.float().mean()), "
            "(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - b) // 1024, (rss() - r) // 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    height, mean, extra_mb, kept_mb = int(out[0]), int(out[1]), int(out[2]), int(out[3])
    # the brightest pixel (4095 << 4) sets the shift, as before: grey levels 0-255 span the photo
    assert height == 625 and 95 <= mean <= 107  # 101, as before
    assert extra_mb < 500, extra_mb  # 393-398 MB; 710-1,078 before
    assert kept_mb < 80, kept_mb  # 34 MB; 221 before


def test_large_photos_of_every_format_decode_at_the_size_the_engine_needs(tmp_path):
    """Only JPEGs were decoded small: a phone's MPO "JPEG" came out at 16x the pixels, and a
    10000x10000 PNG was turned to floats at full size (3.5 GB of RSS)."""
    import io

    from PIL import Image

    from pipelines.engine.decode import DecodeError, decode, read_file

    scene = Image.fromarray(np.asarray(textured_scene(3).resize((2400, 1600))))
    for fmt, extra in (("JPEG", {}), ("MPO", {"save_all": True, "append_images": [scene.resize((240, 160))]}),
                       ("PNG", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        scene.save(buf, fmt, **extra)
        d = decode(buf.getvalue(), min_long_side=320)
        assert (d.width, d.height) == (2400, 1600), fmt
        assert 320 <= d.image.shape[2] < 640 and d.image.shape[1] == pytest.approx(d.image.shape[2] * 2 / 3, abs=1), fmt
        if fmt != "MPO":
            assert decode(buf.getvalue()).image.shape[1:] == (1600, 2400), fmt  # without a target: full size
    with pytest.raises(DecodeError, match="a folder, not a file"):
        read_file(tmp_path)
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # an iPhone photo's first box
    with pytest.raises(DecodeError, match="HEIC/HEIF photo: not supported, convert it to JPEG"):
        decode(heic)


def test_a_misspelt_or_absent_device_is_named_not_blamed_on_the_weights(always_cervix, tmp_path):
    (tmp_path / "ok.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    cases = [("gpu", "'gpu' is not a device")] + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")])
    for device, message in cases:
        for command in (["predict", str(tmp_path / "ok.jpg")], ["bench", "--images", str(tmp_path)]):
            r = CliRunner().invoke(app, [*command, "--weights", str(always_cervix), "--device", device])
            assert r.exit_code == 2 and message in r.output and "detector.json" not in r.output, (command, r.output)


def test_bench_takes_every_readable_photo_of_a_folder_leaves_out_the_rest_and_its_temp_files(always_cervix, tmp_path,
                                                                                           monkeypatch):
    """Only `*.jpg` was taken (an empty or PNG folder ended in ZeroDivisionError), one truncated
    photo crashed the naive loop with a traceback, and every run left its temp folder behind."""
    import io
    import tempfile

    from PIL import Image

    from pipelines.evaluation.engine_bench import usable

    photos, spill = tmp_path / "photos", tmp_path / "tmp"
    photos.mkdir()
    spill.mkdir()
    ok = fuzz_set()["ok.jpg"][0]
    (photos / "a.JPG").write_bytes(ok)
    buf = io.BytesIO()
    Image.open(io.BytesIO(ok)).save(buf, "PNG")
    (photos / "b.png").write_bytes(buf.getvalue())
    (photos / "cut.jpg").write_bytes(ok[: len(ok) // 2])
    (photos / "scan.dat").write_text("not a photo")  # (a .txt is a note, skipped before this check: list_inputs)
    kept, left_out = usable(sorted(photos.iterdir()))
    assert [p.name for p in kept] == ["a.JPG", "b.png"] and left_out == 2
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    (photos / "a.JPG").unlink()
    (photos / "b.png").unlink()
    r = CliRunner().invoke(app, ["bench", "--images", str(photos), "--weights", str(always_cervix)])
    assert r.exit_code == 2 and "no readable photos" in r.output and "2 files" in r.output
    assert list(spill.iterdir()) == []  # its temp folder went with the run, failed or not


def test_bench_refuses_damaged_weights_in_one_line_before_any_mode_runs(always_cervix, tmp_path):
    """Each mode's process failed on them in turn: a traceback and exit 1, after the modes
    before it had run, and an empty -o folder left (an audit)."""
    import shutil

    damaged = tmp_path / "w"
    shutil.copytree(always_cervix, damaged)
    data = bytearray((damaged / "deep_sad.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "deep_sad.safetensors").write_bytes(bytes(data))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "ok.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    r = CliRunner().invoke(app, ["bench", "--images", str(tmp_path / "photos"), "--weights", str(damaged),
                                 "--device", "cpu", "-o", str(tmp_path / "new" / "bench.json")])
    assert r.exit_code == 2 and "does not match" in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


def test_a_stage2_card_under_the_other_models_name_is_refused_before_any_photo(always_cervix, tmp_path):
    """The classifier's card as deep_sad.json ran the classifier as Deep SAD, unsaid (exit 0);
    Deep SAD's as classifier.json was a 104-line traceback on the first photo."""
    import shutil

    from models.io import WeightsIntegrityError
    from pipelines.engine.weights_folder import check_weights

    (tmp_path / "p.jpg").write_bytes(jpeg_bytes(textured_scene(0)))
    for role, other in (("deep_sad", "classifier"), ("classifier", "deep_sad")):
        swapped = tmp_path / f"w-{role}"
        shutil.copytree(always_cervix, swapped)
        shutil.copy(swapped / f"{other}.json", swapped / f"{role}.json")
        message = f"{role}.json: holds the card of the '{other}' model, not of '{role}'"
        with pytest.raises(WeightsIntegrityError, match=message):
            check_weights(swapped, exports=False)
        with pytest.raises(WeightsIntegrityError, match=message):
            QCPipeline(swapped, QCConfig(runtime="torch"))
        r = CliRunner().invoke(app, ["predict", "--weights", str(swapped), "--runtime", "torch", str(tmp_path / "p.jpg")])
        assert r.exit_code == 2 and message in r.output, r.output


def test_a_batch_with_names_of_another_length_or_one_path_alone_is_refused_before_decoding(always_cervix):
    """3 photos with 1 name gave 1 result (logged as a model failure); a path alone was
    labelled one character at a time."""
    qc = QCPipeline(always_cervix, QCConfig(runtime="torch"))
    photo = jpeg_bytes(textured_scene(0))
    try:
        with pytest.raises(ValueError, match="names: 1 for 3 items"):
            qc.run([photo, photo, photo], names=["a"])
        with pytest.raises(ValueError, match="names: 1 for 2 items"):
            list(qc.run_stream([([photo, photo], ["a"])]))
        for alone in ("x.jpg", Path("x.jpg"), photo):
            with pytest.raises(TypeError, match="pass \\[item\\]"):
                qc.run(alone)
        assert [r.path for r in qc.run([photo, photo], names=["a", "b"])] == ["a", "b"]
    finally:
        qc.close()
    with pytest.raises(RuntimeError, match="this QCPipeline was closed"):  # was the thread pool's words
        qc.run([photo])
    with QCPipeline(always_cervix, QCConfig(runtime="torch")) as again:
        assert len(again.run([photo])) == 1
    assert again.closed


def test_an_array_of_a_size_no_file_may_have_and_an_item_of_another_type_become_unreadable_rows(always_cervix):
    """Arrays skipped the decoder's limits: a 1x1000 sliver failed its whole batch, an empty one
    divided by zero; an int among the items failed the batch's good photo too."""
    qc = QCPipeline(always_cervix, QCConfig(runtime="torch"))
    photo = jpeg_bytes(textured_scene(0))
    try:
        rows = qc.run([np.zeros((1, 1000, 3), np.uint8), np.zeros((0, 0, 3), np.uint8), 123, photo])
    finally:
        qc.close()
    assert [r.label.value for r in rows][:3] == ["unreadable"] * 3 and rows[3].label.value != "unreadable"
    assert "image too small (1000x1)" in rows[0].error and "not an input the engine reads (int)" in rows[2].error


@pytest.mark.parametrize("setting", [{"runtime": "tensorrt"}, {"jpeg_decoder": "nvjpeg"}, {"precision": "fp16"},
                                     {"detector_batch": -1}, {"detector_batch": 0}, {"decode_threads": 0},
                                     {"policy": "majority"}, {"crop_margin": -0.1}])
def test_an_engine_setting_the_engine_does_not_have_is_refused_by_name(setting):
    """tensorrt ran as auto, nvjpeg as torchvision, -1 failed at the first batch and fp16 in
    OpenVINO's own words."""
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"QCConfig.{name}: "):
        QCConfig(**setting)
