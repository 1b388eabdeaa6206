"""Service throughput against the engine's offline throughput, same machine, same images, one run.

    python -m tests.benchmarks.service_load [--weights weights] [--images DIR] [--n 64] [--clients 16,32]

1. offline: the QC engine in this process, batches of `max_batch_size`, over every image
   (after one untimed pass);
2. the service in its own uvicorn process, warmed by one untimed round of uploads; for each
   client count, that many concurrent clients each upload one image per request until all
   images are sent (twice over). Both warm-ups matter since the OpenVINO runtime prepares
   kernels once per new input shape (21-40 ms each: 1.6 s over the detector's batch sizes).
Prints images/s, p50/p99 latency per level and the ratio service / offline (the target is
>= 0.8 at 16 and 32 clients). Absolute images/s mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from service.settings import Settings
from tests.uvicorn_process import start_server


def _images(n: int, work: Path, source: Path | None) -> list[tuple[str, bytes]]:
    if source is None:
        from dataclasses import replace

        from pipelines.data.synth import PRESETS, generate

        preset = replace(PRESETS["small"], n_images=n, seed=3)
        source = generate(preset, work / "images").out_dir / "images"
    paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    return [(p.name, p.read_bytes()) for p in paths]


def offline(weights: Path, images: list[tuple[str, bytes]], batch: int) -> dict:
    from pipelines.engine.qc import QCPipeline

    qc = QCPipeline(weights)

    def one_pass() -> float:
        t = time.perf_counter()
        for i in range(0, len(images), batch):
            qc.run([d for _, d in images[i : i + batch]], [n for n, _ in images[i : i + batch]])
        return time.perf_counter() - t

    one_pass()  # warm-up: OpenVINO prepares kernels per new input shape, once (the service gets the same)
    took = one_pass()
    qc.close()
    return {"images": len(images), "seconds": round(took, 2), "images_per_s": round(len(images) / took, 2)}


async def _clients(url: str, key: str, images: list[tuple[str, bytes]], clients: int) -> dict:
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in images:
        queue.put_nowait(item)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            name, data = queue.get_nowait()
            t = time.perf_counter()
            r = await http.post("/v1/qc", files={"files": (name, data, "image/jpeg")})
            latencies.append(time.perf_counter() - t)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=600, limits=limits) as http:
        t = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        took = time.perf_counter() - t
    lat = np.array(latencies) * 1000
    return {"clients": clients, "images": len(images), "seconds": round(took, 2),
            "images_per_s": round(len(images) / took, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "statuses": statuses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None, help="default: untrained weights at default sizes")
    ap.add_argument("--images", type=Path, default=None, help="folder of images (default: synthesise `small`)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--clients", default="16,32")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=Settings.model_fields["max_wait_ms"].default,
                    help="default: the service's own default (CERVIXQC_MAX_WAIT_MS)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cervixqc-load-"))
    weights = args.weights
    if weights is None:
        from pipelines.evaluation.untrained import write_untrained_weights

        weights = write_untrained_weights(work / "weights")
    images = _images(args.n, work, args.images)
    result: dict = {"weights": str(weights), "offline": offline(weights, images, args.max_batch_size), "service": []}
    key = secrets.token_urlsafe(24)
    server = start_server(work / "server", weights, key, max_batch_size=args.max_batch_size,
                          max_wait_ms=args.max_wait_ms, max_queue=4 * args.n)
    try:
        levels = [int(c) for c in args.clients.split(",")]
        asyncio.run(_clients(server.url, key, images, levels[0]))  # warm-up, untimed, as offline's
        for clients in levels:
            level = asyncio.run(_clients(server.url, key, images + images, clients))
            level["ratio_to_offline"] = round(level["images_per_s"] / result["offline"]["images_per_s"], 2)
            result["service"].append(level)
    finally:
        server.kill()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
