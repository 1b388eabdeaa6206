"""`cervixqc bench-detector`: detector inference images/s at several batch sizes and training
images/s, measured in one run on the same decoded images (ratios are what these shared,
noisy machines can support; absolute numbers only mean something on a GPU)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from models.detector import DetectorConfig, build_detector
from pipelines.data.coco import load_coco
from pipelines.data.detection import CocoDetection
from pipelines.data.presets import detection_eval


def _rounds(fn, rounds: int) -> float:
    """Median seconds of `rounds` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_detector(cfg: DetectorConfig, coco_path: Path, n_images: int = 32, batch_sizes: Sequence[int] = (1, 16),
                   train_batch: int = 8, rounds: int = 3, device: str = "cpu") -> dict:
    dev = torch.device(device)
    ds = CocoDetection(load_coco(coco_path), coco_path.parent, detection_eval(), 2 * cfg.max_size)
    samples = [ds[i] for i in range(min(n_images, len(ds)))]
    images = [im.to(dev) for im, _ in samples]
    model = build_detector(cfg).to(dev)
    result: dict = {"device": str(dev), "config": cfg.as_dict(), "n_images": len(images), "threads": torch.get_num_threads()}
    model.eval()
    for b in batch_sizes:
        def run(b=b):
            with torch.inference_mode():
                for i in range(0, len(images), b):
                    model(images[i : i + b])
        result[f"infer_b{b}_images_per_s"] = len(images) / _rounds(run, rounds)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = samples[:train_batch]

    def step():
        losses = model([im.to(dev) for im, _ in batch],
                       [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for _, t in batch])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()

    result["train_images_per_s"] = len(batch) / _rounds(step, rounds)
    if len(batch_sizes) > 1:
        base = result[f"infer_b{batch_sizes[0]}_images_per_s"]
        for b in batch_sizes[1:]:
            result[f"infer_b{b}_vs_b{batch_sizes[0]}"] = result[f"infer_b{b}_images_per_s"] / base
    return result
