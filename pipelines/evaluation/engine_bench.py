"""`cervixqc bench`: the batched engine against a naive per-image loop of the same models
(full decode, one image at a time: what a research script does), on the same files, in one
run. Each mode runs in its own process so its peak RSS is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from pipelines.presence import colour_histograms, detect_with_features
from pipelines.qc import JpegDecoder, QCConfig, QCPipeline


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def run_naive(weights: Path, paths: list[Path], device: str = "cpu") -> dict:
    # the models as a research script has them: loaded from the card, default layout, fp32
    qc = QCPipeline(weights, QCConfig(device=device, channels_last=False, bf16=False))
    dev = torch.device(device)
    stages = {"decode": 0.0, "presence": 0.0, "detect": 0.0, "crop": 0.0, "classify": 0.0}
    big = round(qc.cls_size * 8 / 7)
    t0 = time.perf_counter()
    for p in paths:
        t = time.perf_counter()
        im = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        x = TF.to_dtype(TF.pil_to_tensor(im), torch.float32, scale=True)
        stages["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        if qc.presence is None:
            det = {k: v.cpu() for k, v in qc.detector([x.to(dev)])[0].items()}
        else:  # the same decisions as the engine: stage 0 reads the detector's features
            (det,), feats = detect_with_features(qc.detector, [x], dev)
        stages["detect"] += time.perf_counter() - t
        confident = len(det["scores"]) > 0 and float(det["scores"].max()) >= qc.det_threshold
        if qc.presence is None and not confident:
            continue
        if qc.presence is not None:
            t = time.perf_counter()
            hist = colour_histograms([TF.pil_to_tensor(im)], qc.presence.cfg.hist_bins, qc.presence.cfg.hist_side)
            vouched = float(qc.presence(hist, feats)[0]) >= qc.presence_threshold
            stages["presence"] += time.perf_counter() - t
            if not vouched:
                continue
        t = time.perf_counter()
        box = det["boxes"][int(det["scores"].argmax())].tolist() if confident else [0, 0, im.width, im.height]
        crop = im.crop(tuple(box))
        c32 = TF.to_dtype(TF.pil_to_tensor(crop.resize((32, 32))), torch.float32, scale=True)[None]
        cbig = TF.to_dtype(TF.pil_to_tensor(crop.resize((big, big))), torch.float32, scale=True)[None]
        stages["crop"] += time.perf_counter() - t
        t = time.perf_counter()
        qc.deep_sad.score(c32.to(dev)).cpu()
        qc.classifier(TF.center_crop(cbig, [qc.cls_size, qc.cls_size]).to(dev))["logit"].cpu()
        stages["classify"] += time.perf_counter() - t
    seconds = time.perf_counter() - t0
    return {"mode": "naive", "device": device, "images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds,
            "stage_seconds": stages, "peak_rss_mb": _peak_rss_mb()}


def _run_in_batches(qc: QCPipeline, paths: list[Path], batch_size: int) -> dict[str, float]:
    """All of `paths` through the engine, `batch_size` at a time; seconds per stage, summed."""
    stages: dict[str, float] = {}
    for i in range(0, len(paths), batch_size):
        results = qc.run(paths[i : i + batch_size])
        for k, v in results[0].timings_ms.items():
            if k != "total":
                stages[k] = stages.get(k, 0.0) + v / 1000
    return stages


def run_batched(weights: Path, paths: list[Path], batch_size: int = 16, device: str = "cpu",
                jpeg_decoder: JpegDecoder = "pil") -> dict:
    qc = QCPipeline(weights, QCConfig(device=device, jpeg_decoder=jpeg_decoder))
    t0 = time.perf_counter()
    stages = _run_in_batches(qc, paths, batch_size)
    seconds = time.perf_counter() - t0
    qc.close()
    return {"mode": f"batched(b={batch_size})", "device": device, "jpeg_decoder": jpeg_decoder, "images": len(paths), "seconds": seconds,
            "images_per_s": len(paths) / seconds, "stage_seconds": stages, "peak_rss_mb": _peak_rss_mb()}


def detector_batch_ab(weights: Path, paths: list[Path], detector_batches: list[int], batch_size: int = 16,
                      device: str = "cpu", rounds: int = 3) -> dict:
    """The batched engine at several `detector_batch` values, alternating round by round in one
    process (so machine noise falls on all of them alike); median seconds per round."""
    engines = {b: QCPipeline(weights, QCConfig(device=device, detector_batch=b)) for b in detector_batches}
    for qc in engines.values():
        qc.run(paths[:4])  # warm-up
    times: dict[int, list[float]] = {b: [] for b in engines}
    for _ in range(rounds):
        for b, qc in engines.items():
            t0 = time.perf_counter()
            _run_in_batches(qc, paths, batch_size)
            times[b].append(time.perf_counter() - t0)
    for qc in engines.values():
        qc.close()
    median = {b: sorted(ts)[len(ts) // 2] for b, ts in times.items()}
    first = detector_batches[0]
    return {"rounds": rounds, "median_seconds": {str(b): m for b, m in median.items()},
            f"speedup_vs_detector_batch_{first}": {str(b): median[first] / m for b, m in median.items()}}


def bench(weights: Path, paths: list[Path], batch_size: int = 16, device: str = "cpu",
          jpeg_decoder: JpegDecoder = "pil") -> dict:
    """Both modes, each in a fresh process, on the same files and device; warm-up excluded by
    a first untimed pass over two images inside each process."""
    out = {}
    for mode in ("naive", "batched"):
        cmd = [sys.executable, "-m", "pipelines.evaluation.engine_bench", mode, str(weights), str(batch_size),
               device, jpeg_decoder, *map(str, paths)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench mode {mode} failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["speedup_batched_vs_naive"] = out["batched"]["images_per_s"] / out["naive"]["images_per_s"]
    return out


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    mode, w, b, dev, decoder, *files = sys.argv[1:]
    files_p = [Path(f) for f in files]
    fn = ((lambda ww, pp: run_naive(ww, pp, dev)) if mode == "naive"
          else (lambda ww, pp: run_batched(ww, pp, int(b), dev, decoder)))  # type: ignore[arg-type]
    fn(Path(w), files_p[:2])  # warm-up: first-call allocations and lazy inits
    print(json.dumps(fn(Path(w), files_p)))
