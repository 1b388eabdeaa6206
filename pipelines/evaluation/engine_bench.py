"""`cervixqc bench`: the batched engine against a naive per-image loop of the same models
(full decode, one image at a time: what a research script does), on the same files, in one
run. Each mode runs in its own process so its peak RSS is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from pipelines.engine.config import JpegDecoder, QCConfig, Runtime
from pipelines.engine.openvino_runtime import Precision
from pipelines.engine.presence import colour_histograms, detect_with_features
from pipelines.engine.qc import QCPipeline

PHONE_SIZES = ((4032, 3024), (3264, 2448), (1600, 1200))


def real_mix(source: Path, out: Path, per_folder: int = 90, phone_per_folder: int = 10, seed: int = 0) -> Path:
    """A bench set shaped like a site's archive from a folder of real photos: from each
    top-level subfolder (one per source), `per_folder` photos as they are, and
    `phone_per_folder` others re-encoded at phone sizes (1.9-12 MP, JPEG quality 90)."""
    import random

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    k = 0
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(folder.rglob("*.jpg"))
        rng.shuffle(files)
        for f in files[:per_folder]:
            (out / f"{folder.name[:16]}_{k:04d}.jpg").write_bytes(f.read_bytes())
            k += 1
        for j, f in enumerate(files[per_folder : per_folder + phone_per_folder]):
            with Image.open(f) as im:
                w, h = PHONE_SIZES[j % len(PHONE_SIZES)]
                w, h = (h, w) if im.height > im.width else (w, h)
                im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(out / f"phone_{folder.name[:16]}_{k:04d}.jpg",
                                                                              quality=90)
            k += 1
    if not k:  # an empty set was benched from a temporary folder gone by then (an audit)
        raise ValueError(f"--mix-from {source}: no .jpg photos in its subfolders (one subfolder per source)")
    return out


def _peak_memory(device: str) -> dict[str, float]:
    """Peak RSS of this process (one engine: each mode runs in a process of its own); on CUDA
    also the caching allocator's peaks: reserved is what the GPU must have free, allocated what
    the tensors took."""
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        peaks |= {"peak_gpu_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
                  "peak_gpu_allocated_mb": torch.cuda.max_memory_allocated() / 2**20}
    return peaks


def run_naive(weights: Path, paths: list[Path], device: str = "cpu", warmup: int = 2) -> dict:
    # the models as a research script has them: loaded from the card, default layout, fp32
    qc = QCPipeline(weights, QCConfig(device=device, channels_last=False, bf16=False, runtime="torch"))
    _naive_loop(qc, paths[:warmup], device)  # first-call allocations and lazy inits, untimed
    t0 = time.perf_counter()
    stages = _naive_loop(qc, paths, device)
    seconds = time.perf_counter() - t0
    return {"mode": "naive", "device": device, "images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds,
            "stage_seconds": stages, **_peak_memory(device)}


@torch.inference_mode()
def _naive_loop(qc: QCPipeline, paths: list[Path], device: str) -> dict[str, float]:
    dev = torch.device(device)
    stages = {"decode": 0.0, "presence": 0.0, "detect": 0.0, "crop": 0.0, "classify": 0.0}
    big = round(qc.cls_size * 8 / 7)
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
    return stages


def _run_in_batches(qc: QCPipeline, paths: list[Path], batch_size: int
                    ) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """All of `paths` through the engine's `run_stream`, `batch_size` at a time; seconds per
    stage, summed, path -> label, and path -> the findings it flags (quarantine folders too,
    where a site turns them on: a runtime that moves a blur score across its threshold moves
    a photo, though its label stays)."""
    stages: dict[str, float] = {}
    labels: dict[str, str] = {}
    flags: dict[str, str] = {}
    batches = [(paths[i : i + batch_size], None) for i in range(0, len(paths), batch_size)]
    for results in qc.run_stream(batches):
        for k, v in results[0].timings_ms.items():
            if k != "total":
                stages[k] = stages.get(k, 0.0) + v / 1000
        labels.update({r.path: r.label.value + (f":{r.kind}" if r.kind else "") for r in results})
        flags.update({r.path: ",".join(r.flags()) or "none" for r in results})
    return stages, labels, flags


def run_batched(weights: Path, paths: list[Path], batch_size: int = 16, device: str = "cpu",
                jpeg_decoder: JpegDecoder = "auto", runtime: Runtime = "torch", precision: Precision = "auto",
                overlap: bool = True, warmup: int = 2, decode_threads: int = QCConfig.decode_threads) -> dict:
    qc = QCPipeline(weights, QCConfig(device=device, jpeg_decoder=jpeg_decoder, runtime=runtime, precision=precision,
                                      decode_ahead=overlap, decode_threads=decode_threads))
    _run_in_batches(qc, paths[:warmup], batch_size)  # first-call allocations and lazy inits, untimed
    t0 = time.perf_counter()
    stages, labels, flags = _run_in_batches(qc, paths, batch_size)
    seconds = time.perf_counter() - t0
    qc.close()
    return {"mode": f"batched(b={batch_size}, {runtime}, precision {precision}, overlap {overlap})", "device": device,
            "jpeg_decoder": qc.jpeg_decoder, "decode_threads": qc.cfg.decode_threads, "runtimes": qc.runtimes,
            "images": len(paths), "seconds": seconds,
            "images_per_s": len(paths) / seconds, "stage_seconds": stages, **_peak_memory(device),
            "labels": labels, "flags": flags}


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


# (runtime, precision, overlap) of each batched mode; the first is the reference for labels
# "auto" is the engine's default runtime (OpenVINO on CPU when the weights folder carries an
# export, else torch), so its rows are what a site gets; "openvino" forces OpenVINO.
BATCHED_MODES = (("torch", "auto", False), ("torch", "auto", True), ("auto", "f32", False), ("auto", "auto", False),
                 ("auto", "auto", True))


def parse_mode(text: str) -> tuple[str, str, bool]:
    """"openvino:f32+ahead" -> ("openvino", "f32", True)."""
    spec, ahead = (text.strip()[: -len("+ahead")], True) if text.strip().endswith("+ahead") else (text.strip(), False)
    runtime, _, precision = spec.partition(":")
    if runtime not in ("torch", "auto", "openvino") or (precision or "auto") not in ("auto", "f32", "bf16"):
        raise ValueError(f"bench mode {text!r}: RUNTIME[:PRECISION][+ahead], runtime torch, auto or openvino, "
                         "precision auto, f32 or bf16")
    return runtime, precision or "auto", ahead


def usable(paths: list[Path]) -> tuple[list[Path], int]:
    """The files both loops can read, and how many were left out: the naive loop, as a
    research script, has no guard, and one truncated photo ended the whole bench."""
    from pipelines.engine.decode import DecodeError, decode, read_file

    kept = []
    for p in paths:
        try:
            decode(read_file(p), min_long_side=64)  # DCT-scaled: the whole stream read, little decoded
        except (DecodeError, OSError):
            continue
        kept.append(p)
    return kept, len(paths) - len(kept)


def naive_subset(paths: list[Path], n: int | None) -> list[Path]:
    """`n` of `paths` spread evenly through the list (all when `n` is None or not smaller), so
    their sizes mix as the whole set's do. The naive loop ran 6-8 images/s on an H200: 4,096
    photos would have taken it ten minutes of a fifteen-minute lease, for a rate that a few
    hundred give as well."""
    if n is None or n >= len(paths):
        return list(paths)
    return [paths[round(k * (len(paths) - 1) / max(1, n - 1))] for k in range(n)]


def bench(weights: Path, paths: list[Path], batch_size: int = 16, device: str = "cpu",
          jpeg_decoder: JpegDecoder = "auto", modes: tuple[tuple[str, str, bool], ...] = BATCHED_MODES,
          naive_images: int | None = None, decode_threads: int | None = None) -> dict:
    """The naive loop and each batched mode, each in a fresh process with one engine (so its
    peak RSS is that engine's), on the same files and device; the engine's first two files
    run once untimed first (warm-up). With `naive_images`, the naive loop times only that many
    of the files (`naive_subset`); the ratios are then of rates, images/s against images/s.
    `decode_threads` sets the batched engine's decode pool (default: `QCConfig`'s); the naive
    loop decodes inline.
    Labels of every batched mode are compared with the first one's (torch)."""
    naive: dict = {}
    batched: list[dict] = []
    runs = [("naive", "torch", "auto", False)] + [("batched", *m) for m in modes]
    # the children get this process's thread count (`cervixqc --threads`: they took every core)
    # and the paths through a file (a large folder's paths on argv passed the OS's limit)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with (tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="cervixqc-bench-paths-") as listing,
          tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="cervixqc-bench-naive-") as naive_listing):
        listing.write("".join(f"{p}\n" for p in paths))
        listing.flush()
        naive_listing.write("".join(f"{p}\n" for p in naive_subset(paths, naive_images)))
        naive_listing.flush()
        for kind, runtime, precision, overlap in runs:
            if kind == "batched" and runtime != "torch" and device != "cpu":
                continue
            cmd = [sys.executable, "-m", "pipelines.evaluation.engine_bench", kind, str(weights), str(batch_size),
                   device, jpeg_decoder, runtime, precision, str(int(overlap)),
                   str(decode_threads or QCConfig.decode_threads),
                   naive_listing.name if kind == "naive" else listing.name]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"bench mode {kind} {runtime} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if kind == "naive":
                naive = result
            else:
                batched.append(result)
    reference = batched[0]["labels"] if batched else {}
    reference_flags = batched[0]["flags"] if batched else {}
    for v in batched:
        v["speedup_vs_naive"] = v["images_per_s"] / naive["images_per_s"]
        v["labels_differing_from_first_batched"] = label_changes(reference, v.pop("labels"))
        v["findings_differing_from_first_batched"] = label_changes(reference_flags, v.pop("flags"))
    return {"naive": naive, "batched": batched}


def label_changes(reference: dict[str, str], labels: dict[str, str], examples: int = 10) -> dict:
    """How many files a mode labels otherwise than the reference mode, with the first few as
    'reference -> this'; a file the reference lacks counts as changed."""
    differ = {p: f"{reference.get(p)} -> {lab}" for p, lab in labels.items() if reference.get(p) != lab}
    return {"count": len(differ), "examples": dict(list(differ.items())[:examples])}


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    mode, w, b, dev, decoder, runtime_, precision_, overlap_, threads_, listing_ = sys.argv[1:]
    files_p = [Path(f) for f in Path(listing_).read_text().splitlines() if f]
    fn = ((lambda ww, pp: run_naive(ww, pp, dev)) if mode == "naive"
          else (lambda ww, pp: run_batched(ww, pp, int(b), dev, decoder, runtime_, precision_,  # type: ignore[arg-type]
                                           overlap_ == "1", decode_threads=int(threads_))))
    print(json.dumps(fn(Path(w), files_p)))  # one engine per process, warmed up on its first two files
