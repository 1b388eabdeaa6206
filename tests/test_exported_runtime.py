"""The exported (OpenVINO) path against torch, on the same tiny weights and the same photos."""

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from models.exportable import DetectorConvolutions
from models.io import WeightsIntegrityError, load_weights, save_weights
from pipelines.cli import app
from pipelines.engine import openvino_runtime
from pipelines.engine.config import QCConfig, resolve_runtime
from pipelines.engine.detector import detect, load_detector
from pipelines.engine.qc import QCPipeline
from pipelines.engine.stage2 import load_stage2
from tests.qc_fixtures import tiny_weights
from tests.small_disk import small_tmpfs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny weights with the detector and Deep SAD exported at float32 weights (so any
    difference is the runtime's, not the weights' rounding)."""
    folder = tiny_weights(tmp_path_factory.mktemp("wx"), detector_threshold=0.0)
    r = CliRunner().invoke(app, ["export", "--weights", str(folder), "--no-fp16-weights"])
    assert r.exit_code == 0, r.output
    return folder


@pytest.fixture(scope="module")
def photos(tiny_dataset):
    paths = sorted((tiny_dataset.out_dir / "images").rglob("*.jpg"))[:6]
    return [p.read_bytes() for p in paths]


def _tensor(jpeg: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_exported_detector_convolutions_match_torch_within_1e4_at_f32(exported, photos):
    model, card = load_detector(exported / "detector.json")
    compiled = openvino_runtime.Compiled(openvino_runtime.load_exported(exported, "detector", card), precision="f32")
    images = [_tensor(b) for b in photos]
    batch, _ = model.transform(images)
    with torch.inference_mode():
        want = DetectorConvolutions(model)(batch.tensors)
    got = compiled(batch.tensors)
    worst = max(float((g - w).abs().max()) for g, w in zip(got, want))
    assert len(got) == len(want) and worst < 1e-4, worst
    # the same decoding after the convolutions: the top boxes agree to a tenth of a pixel
    dets_torch, _, _ = detect(model, images, torch.device("cpu"))
    dets_ov, _, _ = detect(model, images, torch.device("cpu"), compiled)
    for a, b in zip(dets_torch, dets_ov):
        assert torch.allclose(a["boxes"][0], b["boxes"][0], atol=0.1) and abs(a["scores"][0] - b["scores"][0]) < 1e-4


def test_engine_on_exported_files_labels_as_torch_and_says_what_ran(exported, photos):
    torch_qc = QCPipeline(exported, QCConfig(runtime="torch"))
    ov_qc = QCPipeline(exported, QCConfig(precision="f32"))  # auto: the folder carries detector and Deep SAD
    assert torch_qc.runtimes == dict.fromkeys(openvino_runtime.EXPORTABLE, "torch")
    assert ov_qc.runtimes["detector"] == ov_qc.runtimes["deep_sad"] == "openvino f32 (exported)"
    assert ov_qc.runtimes["classifier"] in ("openvino f32 (converted in a child process)", "openvino f32 (cached conversion)")
    a, b = torch_qc.run(photos), ov_qc.run(photos)
    assert [r.label for r in a] == [r.label for r in b]
    for x, y in zip(a, b):
        assert np.allclose(x.cervix_box, y.cervix_box, atol=0.2)
        assert abs(x.deep_sad_score - y.deep_sad_score) < 1e-3 and abs(x.resnest_prob - y.resnest_prob) < 1e-4


@pytest.fixture(scope="module")
def first_conversion(tmp_path_factory):
    """The tiny weights without exports, every model converted into a cache of its own: the
    one conversion of each that the caching tests copy from (one child process, 14-18 s on 2
    cores), also copied into the session's cache (conftest points `cache_root` there) so that
    later engines on tiny weights read it instead of converting again."""
    folder = tiny_weights(tmp_path_factory.mktemp("wc"), detector_threshold=0.0)
    cache = tmp_path_factory.mktemp("conversions")
    qc = QCPipeline(folder, QCConfig(runtime="openvino", precision="f32", openvino_cache=cache))
    shutil.copytree(cache, openvino_runtime.cache_root(), dirs_exist_ok=True)
    return folder, cache, qc


def test_openvino_runtime_on_a_folder_without_exports_converts_every_model_once_then_reads_the_cache(first_conversion, photos):
    folder, cache, qc = first_conversion
    assert set(qc.runtimes.values()) == {"openvino f32 (converted in a child process)"}
    assert qc.deep_sad is None and qc.classifier is None  # never built in torch
    want = QCPipeline(folder, QCConfig(runtime="torch")).run(photos[:3])
    got = qc.run(photos[:3])
    assert [r.label for r in want] == [r.label for r in got]
    assert all(abs(x.resnest_prob - y.resnest_prob) < 1e-4 for x, y in zip(want, got))
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["classifier", "deep_sad", "detector"]
    # a conversion of weights since replaced stayed for good; those in use are kept, however old
    month_ago = time.time() - 40 * 86400
    (cache / "classifier-00000000deadbeef-openvino2025.0.0-float32").mkdir()
    for conversion in cache.iterdir():
        os.utime(conversion, (month_ago, month_ago))
    again = QCPipeline(folder, QCConfig(runtime="openvino", precision="f32", openvino_cache=cache))
    assert set(again.runtimes.values()) == {"openvino f32 (cached conversion)"}
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["classifier", "deep_sad", "detector"]
    assert all(p.stat().st_mtime > month_ago + 86400 for p in cache.iterdir())  # touched by this start
    assert [r.resnest_prob for r in again.run(photos[:3])] == [r.resnest_prob for r in got]


def test_a_damaged_cached_conversion_is_converted_again(exported, first_conversion, tmp_path, photos):
    cache = tmp_path / "cache"
    shutil.copytree(first_conversion[1], cache)  # the same classifier (seeded weights), converted
    assert QCPipeline(exported, QCConfig(openvino_cache=cache)).runtimes["classifier"].endswith("(cached conversion)")
    (damaged,) = cache.glob("classifier-*/classifier.openvino.bin")
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\0\0\0\0")
    qc = QCPipeline(exported, QCConfig(openvino_cache=cache))
    assert qc.runtimes["classifier"].endswith("(converted in a child process)")
    assert QCPipeline(exported, QCConfig(openvino_cache=cache)).runtimes["classifier"].endswith("(cached conversion)")
    assert len(qc.run(photos[:2])) == 2


def test_float16_stored_weights_convert_to_float16_at_auto_and_to_float32_when_f32_is_asked(exported, tmp_path,
                                                                                            photos):
    """As the bundled classifier: stored float16, converted at load. At OpenVINO's own precision
    the conversion keeps float16 (less memory); `--precision f32` gets a float32 one, which
    scores as torch does."""
    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    state, card = load_weights(folder / "classifier.json")
    save_weights(state, folder / "classifier", card, dtype="float16")
    cache = tmp_path / "cache"
    torch_rows = QCPipeline(folder, QCConfig(runtime="torch")).run(photos[:3])
    for precision, dtype, tolerance in (("auto", "float16", 1e-2), ("f32", "float32", 1e-4)):
        qc = QCPipeline(folder, QCConfig(precision=precision, openvino_cache=cache))
        assert qc.runtimes["classifier"].endswith("(converted in a child process)")
        (converted,) = cache.glob(f"classifier-*-{dtype}")
        assert openvino_runtime.read_card(converted, "classifier").weights_compression == dtype
        rows = qc.run(photos[:3])
        assert all(abs(x.resnest_prob - y.resnest_prob) < tolerance for x, y in zip(rows, torch_rows))
    assert sorted(p.name.rsplit("-", 1)[1] for p in cache.iterdir()) == ["float16", "float32"]


def test_an_unwritable_cache_costs_a_conversion_not_the_start_and_leaves_no_files(exported, tmp_path, photos,
                                                                                 monkeypatch):
    """Nothing can be kept, so every start converts again (one start pins it: a second would
    only repeat the conversion, about 14 s); the work folder goes with the start."""
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    qc = QCPipeline(exported, QCConfig(openvino_cache=blocked / "cache"))
    assert qc.runtimes["classifier"].endswith("(converted in a child process)")
    assert blocked.is_file() and list(scratch.iterdir()) == []
    assert len(qc.run(photos[:2])) == 2


def test_a_full_cache_costs_a_conversion_in_a_temporary_folder_not_the_start(tmp_path, photos):
    """A cache on a full disk failed the conversion, and the error blamed the weights ("cannot
    convert to OpenVINO (RuntimeError: basic_ios::clear: iostream error)"): an audit."""
    weights = tiny_weights(tmp_path / "w", 0.0)
    with small_tmpfs(tmp_path / "cache", "256k") as cache:
        (cache / "filler").write_bytes(b"\0" * 250_000)
        qc = QCPipeline(weights, QCConfig(openvino_cache=cache, runtime="openvino"))
        assert all(r.endswith("(converted in a child process)") for r in qc.runtimes.values()), qc.runtimes
        assert [p.name for p in cache.iterdir()] == ["filler"] and len(qc.run(photos[:2])) == 2


def test_tampered_stage2_weights_are_refused_even_when_openvino_runs_an_export_of_them(exported, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    with (folder / "classifier.safetensors").open("r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(WeightsIntegrityError, match="does not match its card"):
        QCPipeline(folder, QCConfig(runtime="openvino"))


def test_an_engine_running_exported_models_does_not_import_timm(exported, first_conversion):
    """timm (and the hub client it brings) is 40 MB of RSS the exported path does not need. The
    tiny weights' classifier conversion is in the session's cache (`first_conversion`): on the
    bundled weights this test converted their ResNeSt50, 14 of its 32 s in the suite."""
    code = ("import sys; from pipelines.engine.qc import QCPipeline; from pipelines.engine.config import QCConfig; "
            f"qc = QCPipeline({str(exported)!r}, QCConfig(device='cpu', precision='f32')); "
            "print(sorted(set(qc.runtimes.values())), 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == (
        "['openvino f32 (cached conversion)', 'openvino f32 (exported)'] False"), out.stdout


def test_export_card_names_its_source_and_a_stale_or_altered_export_is_refused(exported, tmp_path):
    card = openvino_runtime.ExportCard.model_validate_json((exported / "detector.openvino.json").read_text())
    assert card.source_card == "detector.json" and card.weights_compression == "float32"
    assert set(card.parity) >= {"cls_logits", "bbox_regression"} and max(card.parity.values()) < 1e-4
    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    stale = card.model_copy(update={"source_sha256": "0" * 64})
    (folder / "detector.openvino.json").write_text(stale.model_dump_json())
    with pytest.raises(WeightsIntegrityError, match="exported from other weights"):
        QCPipeline(folder, QCConfig())
    (tmp_path / "x.jpg").write_bytes(b"never read: the weights are refused first")  # a name that exists
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "x.jpg"), "--weights", str(folder)])
    assert r.exit_code == 2 and "cervixqc export" in r.output
    (folder / "detector.openvino.json").write_text(card.model_dump_json())
    with (folder / "deep_sad.openvino.bin").open("r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(WeightsIntegrityError, match=r"not its card's .* run `cervixqc export --weights"):
        QCPipeline(folder, QCConfig())
    (folder / "deep_sad.openvino.bin").unlink()  # read "sha256 missing does not match" (an audit)
    with pytest.raises(WeightsIntegrityError, match=r"deep_sad.openvino.bin is missing; refusing to load: run"):
        QCPipeline(folder, QCConfig())
    # a card naming an intact copy as its .bin: that one was hashed, the damaged .bin beside the
    # .xml loaded (an audit)
    shutil.copy(exported / "deep_sad.openvino.bin", folder / "pristine.bin")
    (folder / "deep_sad.openvino.bin").write_bytes(b"\0" * 64)
    sad = openvino_runtime.ExportCard.model_validate_json((exported / "deep_sad.openvino.json").read_text())
    (folder / "deep_sad.openvino.json").write_text(sad.model_copy(update={"bin": "pristine.bin"}).model_dump_json())
    with pytest.raises(WeightsIntegrityError, match=r"names deep_sad.openvino.xml and pristine.bin for 'deep_sad'"):
        QCPipeline(folder, QCConfig())


def test_a_damaged_export_card_is_named_in_the_weights_folder_and_in_the_conversion_cache(exported, first_conversion,
                                                                                           tmp_path):
    """A card cut short was a bare pydantic error naming no file, and in the conversion cache
    it was never replaced: every start failed."""
    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    card = folder / "detector.openvino.json"
    card.write_text(card.read_text()[:40])
    with pytest.raises(WeightsIntegrityError, match=f"{card}: not a readable export card"):
        QCPipeline(folder, QCConfig())
    cache = tmp_path / "cache"  # the same error, which `converted` answers by converting again (as a damaged .bin)
    shutil.copytree(first_conversion[1], cache)
    (cached,) = cache.glob("classifier-*/classifier.openvino.json")
    cached.write_text('{"name": "class')
    with pytest.raises(WeightsIntegrityError, match="not a readable export card"):
        openvino_runtime.load_exported(cached.parent, "classifier", load_weights(exported / "classifier.json")[1])


def test_an_export_replaced_after_its_check_is_refused_not_read(exported, tmp_path, monkeypatch):
    """The export's files were hashed by name and read again by name: a .bin renamed over the
    checked one in between was compiled as if checked. The hash here is the real one; it
    renames an altered copy over the .bin the moment it has hashed it."""
    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    binf = folder / "deep_sad.openvino.bin"
    altered = bytearray(binf.read_bytes())
    altered[-1] ^= 0xFF
    (tmp_path / "altered.bin").write_bytes(altered)
    real_hash = openvino_runtime.sha256_file

    def hash_then_swap(path):
        digest = real_hash(path)
        if (tmp_path / "altered.bin").exists() and Path(path) == binf:
            os.replace(tmp_path / "altered.bin", binf)
        return digest

    monkeypatch.setattr(openvino_runtime, "sha256_file", hash_then_swap)
    card = load_weights(folder / "deep_sad.json")[1]
    with pytest.raises(WeightsIntegrityError, match="deep_sad.openvino.bin was replaced since it was checked"):
        openvino_runtime.load_exported(folder, "deep_sad", card)


def test_an_export_cut_short_leaves_the_folders_working_export_in_place(exported, tmp_path, monkeypatch):
    """Written in place, an export stopped during its parity check (Ctrl-C, a kill, a full
    disk) left the old card over new files, and every start refused the folder."""
    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    before = {p.name: p.read_bytes() for p in folder.glob("deep_sad.openvino.*")}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(openvino_runtime, "Compiled", interrupted)
    model, card = load_stage2(folder / "deep_sad.json")
    with pytest.raises(KeyboardInterrupt):
        openvino_runtime.export("deep_sad", model, card, folder, folder / "deep_sad.json")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.glob("deep_sad.openvino.*")} == before
    assert not list(folder.glob(".exporting-*"))
    assert QCPipeline(folder, QCConfig(precision="f32")).runtimes["deep_sad"] == "openvino f32 (exported)"


def test_f32_passes_over_an_export_stored_float16_for_a_float32_conversion(exported, first_conversion, tmp_path):
    """The export default rounds float32 weights to float16: at f32, which promises torch's
    labels, the bundled export moved Deep SAD's distance by 1e-3 (a float32 conversion: 1e-6)."""
    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    r = CliRunner().invoke(app, ["export", "--weights", str(folder), "--models", "deep_sad"])  # float16 weights
    assert r.exit_code == 0, r.output
    assert openvino_runtime.read_card(folder, "deep_sad").weights_compression == "float16"
    cache = tmp_path / "cache"
    shutil.copytree(first_conversion[1], cache)
    f32 = QCPipeline(folder, QCConfig(precision="f32", openvino_cache=cache))
    assert f32.runtimes["deep_sad"] == "openvino f32 (cached conversion)"
    assert f32.runtimes["detector"] == "openvino f32 (exported)"  # stored float32: as torch's
    assert QCPipeline(folder, QCConfig(openvino_cache=cache)).runtimes["deep_sad"].endswith("(exported)")


def test_weights_openvino_cannot_convert_are_named_not_a_traceback(exported, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    for f in folder.glob("*.openvino.*"):
        f.unlink()
    state, card = load_weights(folder / "classifier.json")
    save_weights(state, folder / "classifier", card.model_copy(update={"config": card.config | {"arch": "resnest26d"}}))
    (tmp_path / "x.jpg").write_bytes(b"never read: the weights are refused first")  # a name that exists
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "x.jpg"), "--weights", str(folder), "--runtime", "openvino"],
                           env={"CERVIXQC_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 2 and "classifier.json: cannot convert to OpenVINO" in r.output, r.output


def test_runtime_choice_auto_torch_and_openvino_on_cuda(exported, tmp_path):
    assert resolve_runtime("auto", torch.device("cpu"), exported) == "openvino"
    assert resolve_runtime("auto", torch.device("cpu"), tmp_path) == "torch"  # nothing exported there
    assert resolve_runtime("auto", torch.device("cuda"), exported) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_runtime("openvino", torch.device("cuda"), exported)


def test_export_command_refuses_unknown_models_and_missing_cards(exported, tmp_path):
    r = CliRunner().invoke(app, ["export", "--weights", str(exported), "--models", "detector,presence"])
    assert r.exit_code == 2 and "--models must name" in r.output
    r = CliRunner().invoke(app, ["export", "--weights", str(tmp_path)])
    assert r.exit_code == 2 and "no detector.json" in r.output
    (tmp_path / "a-file").write_text("")
    r = CliRunner().invoke(app, ["export", "--weights", str(exported), "--out", str(tmp_path / "a-file")])
    assert r.exit_code == 2 and "--out" in r.output and "Traceback" not in r.output
    folder = tmp_path / "w"  # a card its builder cannot take: was a traceback (size mismatch)
    shutil.copytree(exported, folder)
    state, card = load_weights(folder / "detector.json")
    save_weights(state, folder / "detector", card.model_copy(update={"config": card.config | {"fpn_channels": 64}}))
    r = CliRunner().invoke(app, ["export", "--weights", str(folder), "--models", "detector"])
    assert r.exit_code == 2 and "detector.json: cannot load it" in r.output, r.output
    # a damaged second model: refused before the first is written (it was exported, then exit 2: an audit)
    fresh = tmp_path / "fresh"
    shutil.copytree(exported, fresh, ignore=shutil.ignore_patterns("*.openvino.*"))
    data = bytearray((fresh / "deep_sad.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (fresh / "deep_sad.safetensors").write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["export", "--weights", str(fresh), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "deep_sad.safetensors" in r.output, r.output
    assert not list(fresh.glob("*.openvino.*")) and not (tmp_path / "out").exists()
    # -o naming a folder of other weights: its exports were replaced by ones it then refused, exit 0 (an audit)
    other = tmp_path / "other"
    shutil.copytree(exported, other)
    state, card = load_weights(other / "deep_sad.json")
    save_weights({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other / "deep_sad", card)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    r = CliRunner().invoke(app, ["export", "--weights", str(exported), "--models", "deep_sad", "-o", str(other)])
    assert r.exit_code == 2 and "holds another deep_sad model" in r.output, r.output
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_an_export_stopped_between_its_renames_leaves_a_folder_that_loads_and_a_killed_ones_work_goes(
        exported, tmp_path, monkeypatch):
    """Stopped after the new .bin was renamed in, the old card stood over it and every start
    refused the folder; a killed export's work folder stayed in the weights folder for good
    (an audit)."""
    from pipelines.engine.weights_folder import check_weights

    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    killed = folder / ".exporting-killed"
    killed.mkdir()
    (killed / "detector.openvino.bin").write_bytes(b"half a model")
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    model, card = load_detector(folder / "detector.json")
    real_replace = os.replace

    def full_disk_at_the_xml(src, dst):
        if str(dst).endswith("detector.openvino.xml"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk_at_the_xml)
    with pytest.raises(OSError):
        openvino_runtime.export("detector", model, card, folder, folder / "detector.json")  # f16: another .bin
    monkeypatch.undo()
    check_weights(folder)  # not refused: no card, so no export; the engine converts the detector itself
    assert not (folder / "detector.openvino.json").exists() and not killed.exists()
    assert not list(folder.glob(".exporting-*"))


def test_openvino_conversion_cannot_send_telemetry():
    """openvino-telemetry sends conversion statistics unless opted out; the lock leaves it out
    (pyproject's override) so OpenVINO's converter falls back to its no-op stub."""
    import importlib.util

    from openvino.tools.ovc import telemetry_utils

    assert importlib.util.find_spec("openvino_telemetry") is None
    assert telemetry_utils.tm.__name__.endswith("telemetry_stub")


@pytest.fixture(scope="module")
def int8(tmp_path_factory, tiny_dataset, exported):
    """The tiny weights with the detector exported at INT8, calibrated on the synthetic photos
    of a manifest's train rows."""
    folder = tmp_path_factory.mktemp("w8")
    for f in exported.iterdir():
        shutil.copy(f, folder / f.name)
    manifest = tiny_dataset.out_dir / "manifest.csv"
    r = CliRunner().invoke(app, ["export", "--weights", str(folder), "--int8-calibration", str(manifest),
                                 "--int8-photos", "8"])
    assert r.exit_code == 0, r.output
    return folder, r.output


def test_int8_export_quantizes_the_detector_and_says_how_on_its_card(int8):
    import openvino as ov

    folder, output = int8
    card = openvino_runtime.read_card(folder, "detector")
    assert card.quantization.startswith("int8:") and "8 photos of manifest.csv" in card.quantization
    assert "calibration: 8 photos" in output.replace("INT8 calibration", "calibration")
    ops = {op.get_type_name() for op in ov.Core().read_model(folder / card.xml).get_ops()}
    assert "FakeQuantize" in ops
    assert openvino_runtime.read_card(folder, "deep_sad").quantization == ""  # the detector alone
    # the card's sha256s cover the quantized files: an altered .bin is refused like any export
    model_card = load_detector(folder / "detector.json")[1]
    assert openvino_runtime.load_exported(folder, "detector", model_card) is not None


def test_the_int8_detector_runs_at_auto_precision_and_f32_asks_for_the_float_model(int8, first_conversion, photos, tmp_path):
    folder, _ = int8
    cache = tmp_path / "cache"
    shutil.copytree(first_conversion[1], cache)  # float conversions of the same seeded weights
    auto = QCPipeline(folder, QCConfig(device="cpu", openvino_cache=cache))
    assert auto.runtimes["detector"].startswith("openvino int8+") and "(exported)" in auto.runtimes["detector"]
    f32 = QCPipeline(folder, QCConfig(device="cpu", precision="f32", openvino_cache=cache))
    assert f32.runtimes["detector"] == "openvino f32 (cached conversion)"  # the float model, not the INT8 export
    want = QCPipeline(folder, QCConfig(device="cpu", runtime="torch")).run(photos)
    # every photo is boxed by these weights, so boxes and scores can be held, not only labels
    assert all(r.cervix_box is not None for r in want)
    for t, f in zip(want, f32.run(photos)):  # f32: the float model, as torch
        assert np.allclose(f.cervix_box, t.cervix_box, atol=0.2) and abs(f.cervix_score - t.cervix_score) < 1e-4
        assert f.label == t.label
    for t, q in zip(want, auto.run(photos)):  # INT8: near torch, inside the photo
        x1, y1, x2, y2 = q.cervix_box
        assert 0 <= x1 < x2 <= q.width and 0 <= y1 < y2 <= q.height
        assert abs(q.cervix_score - t.cervix_score) < 0.01


def test_int8_calibration_needs_train_rows_and_the_detector(exported, tmp_path, tiny_dataset):
    import pandas as pd

    manifest = pd.read_csv(tiny_dataset.out_dir / "manifest.csv", keep_default_na=False)
    manifest["path"] = [str(tiny_dataset.out_dir / p) for p in manifest["path"]]
    manifest["split"] = "test"
    manifest.to_csv(tmp_path / "m.csv", index=False)
    r = CliRunner().invoke(app, ["export", "--weights", str(exported), "--out", str(tmp_path / "o"),
                                 "--int8-calibration", str(tmp_path / "m.csv")])
    assert r.exit_code == 2 and "no train rows" in r.output
    assert not (tmp_path / "o").exists()  # made for the check, and left empty by the refusal (an audit)
    r = CliRunner().invoke(app, ["export", "--weights", str(exported), "--models", "deep_sad",
                                 "--int8-calibration", str(tmp_path / "m.csv")])
    assert r.exit_code == 2 and "quantizes the detector" in r.output


def test_int8_calibration_counts_the_photos_it_read_not_those_it_drew(exported, tmp_path, tiny_dataset, capsys):
    """One readable photo and three damaged ones were "4 photos" on the card and in the output
    (an audit): the card says what the quantization was calibrated on."""
    from pipelines.commands.engine import _int8_detector

    folder = tmp_path / "calibration"
    folder.mkdir()
    for photo in sorted((tiny_dataset.out_dir / "images").rglob("*.jpg"))[:3]:
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.jpg").write_bytes(b"not a photo")
    _, described = _int8_detector(exported, folder, 160)
    out = capsys.readouterr().out
    assert "INT8 calibration: 3 photos of calibration (1 of the 4 drawn could not be read)" in out, out
    assert "3 photos of calibration" in described, described


@pytest.mark.timeout(120)
def test_a_conversion_child_dies_with_its_parent():
    """A service SIGKILLed during its start left the conversion child converting for a minute
    beside the next start's own. The child arms `die_with_parent` first thing; here a parent
    that started such a child is killed, and the child must go with it."""
    child = ("import os, sys, time; from pipelines.engine.openvino_runtime import PARENT_PID, die_with_parent; "
             "die_with_parent(int(os.environ[PARENT_PID])); print(os.getpid(), flush=True); time.sleep(90)")
    parent = ("import os, subprocess, sys, time; from pipelines.engine.openvino_runtime import PARENT_PID; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}], env={{**os.environ, PARENT_PID: str(os.getpid())}}); "
              "time.sleep(90)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())  # the child's, printed once it is armed
        os.kill(pid, 0)
        proc.kill()
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and _alive(pid):
            time.sleep(0.1)
        assert not _alive(pid), "the conversion child outlived its parent"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie (reaped by nobody yet in a container) is dead
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_damaged_export_is_refused_at_a_precision_that_passes_it_over(exported, tmp_path):
    """At f32 an export rounded to float16 is passed over for a conversion of the safetensors:
    a damaged one then ran, exit 0, on a folder the default precision and `serve` refused."""
    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    card = openvino_runtime.ExportCard.model_validate_json((folder / "deep_sad.openvino.json").read_text())
    (folder / "deep_sad.openvino.json").write_text(card.model_copy(update={"weights_compression": "float16"})
                                                   .model_dump_json())
    with (folder / "deep_sad.openvino.bin").open("r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(WeightsIntegrityError, match=r"deep_sad.openvino.bin .*not its card's"):
        QCPipeline(folder, QCConfig(precision="f32", openvino_cache=tmp_path / "cache"))
