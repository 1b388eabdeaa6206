"""Data, training, evaluation and the QC engine; imports models, never service.

Before anything here imports torch: the engine runs torch (GNU OpenMP threads) and OpenVINO
(its own threads) on the same cores, one after the other, many times a batch. libgomp's
idle threads spin 300,000 times after each parallel region before they sleep, which takes a
core from the OpenVINO inference that follows; told not to spin (`OMP_WAIT_POLICY=PASSIVE`)
they wake through the kernel for each of torch's small operations, which then take twice as
long. Its own count for oversubscribed processes, 1,000, keeps both: measured on the 300
real-mix photos, 2-core CPU, one engine process per run, alternating (`run_batched`, auto
runtime): default 64.0-65.1 images/s (detector 2.50-2.57 s, classify 0.55-0.56 s), passive
62.4-65.3 (crops 0.42-0.46 s, hash 0.20-0.21 s), 1,000 68.3-72.2 (detector 2.20-2.34 s, crops
0.34-0.35 s, classify 0.45-0.49 s); 10,000 and 30,000 were within the noise of it. libgomp
reads the variable when torch loads it, so it is set here, where the CLI, the service and
the benchmarks' processes import first; a value already in the environment wins. The cost
falls on torch-only work at two or more threads: 20 timm resnet18 training steps at 64 px,
five alternating runs, median 2.23 s against 2.15 s (the recipe trains at one thread, where
no team waits); a site that trains on many cores can export `GOMP_SPINCOUNT=300000`.
"""

import os

from pipelines.cpu_quota import quota_cpus, quota_threads

os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# A container's CPU quota (`docker run --cpus 2`) as torch's thread count, unless the
# environment or `cervixqc --threads` says otherwise: torch starts one thread per schedulable
# core whatever the quota, and the throttled threads ran the engine 1.6x slower
# (pipelines/cpu_quota.py). OMP_NUM_THREADS is read as torch loads; torch.set_num_threads
# where something loaded it first. Child processes (conversions, Ray workers) inherit it.
QUOTA_THREADS = quota_threads(quota_cpus())
if QUOTA_THREADS is not None and "OMP_NUM_THREADS" not in os.environ \
        and QUOTA_THREADS < len(os.sched_getaffinity(0)):
    os.environ["OMP_NUM_THREADS"] = str(QUOTA_THREADS)
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(QUOTA_THREADS)

# Triton compiles GPU kernels and nothing else; torchvision's ops import torch._dynamo, which
# imports it when installed (the registry's torch wheel ships it), and it alone is 71 MiB of
# every process's RSS (measured: torchvision imported with and without it, 664 vs 593 MiB).
# Without an NVIDIA driver it can run nothing, so such a host is treated as the CPU-only wheel
# treats every host: no triton (a None entry makes `import triton` fail and find_spec answer
# None, which torch reads as "not installed"; torch.compile on CPU does not use it).
# /proc/driver/nvidia is the Linux driver, /dev/dxg the GPU under WSL2.
if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/dxg")):
    import sys

    sys.modules.setdefault("triton", None)
