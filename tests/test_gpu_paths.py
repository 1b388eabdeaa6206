"""The CUDA paths, for a machine with an NVIDIA GPU: `pytest -n 0 -m gpu tests/test_gpu_paths.py`,
or `bash tests/benchmarks/gpu_check.sh` with the GPU bench in the same run. Skipped where torch
sees no GPU, so the 2-core CI never runs them. `CERVIXQC_TEST_DEVICE=cpu` runs the same checks
on the CPU (the device decoder is then torchvision's CPU decoder), which checks the tests
themselves where no GPU is lent: only the device differs.

The tiny weights here are untrained: their detector scores every anchor near its prior, so
which box wins is a near-tie that float rounding may flip between devices. These tests pin down
what must hold whatever box wins (every photo read, in order, with the CPU's sizes and hashes,
a box inside the photo and finite scores; bad inputs costing only their rows; training steps
under bf16 autocast); whether the device labels real photos as the CPU does is the bench's
`labels differing` count with the bundled weights (gpu_check.sh)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipelines.engine.config import QCConfig
from pipelines.engine.qc import QCPipeline
from pipelines.engine.qc_result import Label, QCResult
from tests.qc_fixtures import fuzz_set, jpeg_bytes, textured_scene, tiny_weights

DEVICE = os.environ.get("CERVIXQC_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                 reason="needs a CUDA device (CERVIXQC_TEST_DEVICE=cpu runs these on the CPU)")]

SIZES = [(640, 480), (480, 640), (1280, 960), (320, 320), (800, 600), (2048, 1536)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("w"), detector_threshold=0.0, colour_threshold=0.6)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [jpeg_bytes(textured_scene(seed, size)) for seed, size in enumerate(SIZES * 2)]


@pytest.fixture(scope="module")
def on_cpu(weights, photos) -> list[QCResult]:
    return QCPipeline(weights, QCConfig(device="cpu", runtime="torch")).run(photos)


def _engine(weights, **config) -> QCPipeline:
    """PIL's decoder unless a test names another: on CUDA the default is nvJPEG (`resolve_decoder`),
    whose pixels differ from PIL's by rounding, and these tests compare devices at one decoder."""
    return QCPipeline(weights, QCConfig(device=DEVICE, runtime="torch", **{"jpeg_decoder": "pil", **config}))


def _assert_reads_like(got: list[QCResult], want: list[QCResult]) -> None:
    assert [g.error for g in got] == [None] * len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.width, g.height, g.sha256, g.phash) == (w.width, w.height, w.sha256, w.phash), i
        x1, y1, x2, y2 = g.cervix_box
        assert 0 <= x1 < x2 <= g.width and 0 <= y1 < y2 <= g.height, (i, g.cervix_box)
        scores = [g.cervix_score, g.deep_sad_score, g.resnest_prob, g.colour_score]
        assert np.isfinite(scores).all(), (i, scores)
        assert g.label in (Label.REGULAR, Label.NON_REGULAR), i


@pytest.mark.parametrize("bf16, channels_last", [(False, False), (True, True)])
def test_the_engine_on_the_device_reads_every_photo_as_the_cpu_engine_does(weights, photos, on_cpu, bf16,
                                                                           channels_last):
    qc = _engine(weights, bf16=bf16, channels_last=channels_last)
    _assert_reads_like(qc.run(photos), on_cpu)


def test_on_cuda_the_detector_stays_nchw_while_the_stage2_models_go_nhwc(weights):
    """cuDNN built NHWC plans per new detector input shape: 20 s against 1.4 s for the first
    pass over 128 clinic photos on an H200 (tests/benchmarks/cuda_detect.py). On the CPU
    the detector keeps the NHWC layout it measured faster there."""
    def nhwc(model) -> bool:
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
        return conv.weight.is_contiguous(memory_format=torch.channels_last)

    qc = _engine(weights)
    assert nhwc(qc.detector) is not DEVICE.startswith("cuda")
    assert nhwc(qc.classifier)


def test_device_decode_reads_as_pil_decode_and_a_bad_jpeg_costs_only_its_row(weights):
    cases = fuzz_set()
    names = list(cases)
    pil = _engine(weights).run([b for b, _ in cases.values()], names=names)
    dev = _engine(weights, jpeg_decoder="torchvision").run([b for b, _ in cases.values()], names=names)
    assert [r.path for r in dev] == names
    for (name, (_, expected)), d, p in zip(cases.items(), dev, pil):
        if expected is None:
            assert d.label in (Label.REGULAR, Label.NON_REGULAR), (name, d.error)
            assert (d.width, d.height, d.sha256) == (p.width, p.height, p.sha256), name
        else:
            assert d.label == Label.UNREADABLE and expected in d.error, (name, d.error)


def test_decode_ahead_on_the_device_gives_the_rows_of_plain_runs(weights, photos):
    qc = _engine(weights, jpeg_decoder="torchvision", decode_ahead=True)
    batches = [(photos[i:i + 4], [f"p{j}" for j in range(i, i + 4)]) for i in range(0, len(photos), 4)]
    streamed = [r for results in qc.run_stream(batches) for r in results]
    plain = [r for items, names in batches for r in qc.run(items, names=names)]
    assert [(r.path, r.sha256, r.cervix_box) for r in streamed] == [(r.path, r.sha256, r.cervix_box) for r in plain]
    assert [r.deep_sad_score for r in streamed] == pytest.approx([r.deep_sad_score for r in plain], rel=1e-3)


def test_detector_training_steps_under_bf16_autocast_on_the_device(tmp_path):
    from models.detector import DetectorConfig
    from pipelines.data.synth import SizePolicy, SynthConfig, generate
    from pipelines.training.detector import DetectorTrainConfig, train_detector

    coco = generate(SynthConfig(n_images=8, seed=3, size=SizePolicy(max_side=128)), tmp_path / "data", workers=1).coco
    cfg = DetectorTrainConfig(train_coco=coco, val_coco=coco, out_dir=tmp_path / "run", workers=0, batch_size=4,
                              epochs=1, max_steps_per_epoch=2, warmup_iters=1, amp=True, progress=False,
                              model=DetectorConfig(backbone="resnet18", min_size=128, max_size=128))
    result, card = train_detector(cfg)
    assert np.isfinite(result.history[0]["train_loss"]) and card is not None and card.is_file()
