#!/usr/bin/env bash
# The device checks in one run, for a lent NVIDIA machine (../.library/device/README.md): the
# CUDA tests (tests/test_gpu_paths.py) and issue 15's GPU bench, logs and figures into $OUT.
#
# That machine's python3 (3.12) has torch, torchvision, timm, pandas, scikit-learn and most of
# the rest; what the engine needs beyond them travels as wheels. Here, once, from the repo root:
#   echo /.whl/ >> .git/info/exclude && bash tests/benchmarks/gpu_check.sh --download
# then run there (carry: [".whl"]):  bash tests/benchmarks/gpu_check.sh
#
# The working tree with weights/ is 89 MB, over the 64 MiB a call carries, so the bundled
# classifier (51 MB; 46 MB as xz) cannot travel whole. Without it the bench runs untrained
# weights at the default sizes (speed only). With the bundled weights: move
# weights/classifier.safetensors and the OpenVINO files (CPU only) out of the tree, split the
# classifier in two ignored halves, and bring one per call to one warm machine (30 s idle):
#   call 1 (carry .whl, .gpu/classifier.part1):  PARTS=tests ... after copying the half to /tmp/cq
#   call 2 (carry .whl, .gpu/classifier.part2):  cat both halves > weights/classifier.safetensors,
#                                                then PARTS=bench BENCH_WEIGHTS=weights ...
# (the bench checks the joined file's sha256 against its card before it times anything).
# PARTS: some of tests, layout, profile, bench (default: tests,bench); PROFILE_N, PROFILE_BATCHES: the
# engine profile's photos and engine batch sizes (tests/benchmarks/cuda_engine_profile.py); BENCH_N,
# BENCH_BATCH: the bench's photos and engine batch (several, space-separated: one bench each, files
# ...-b<N>.json); BENCH_NAIVE_N: how many of them the naive loop times (default: all; it runs 6-8 images/s
# there, so a long run, BENCH_N=4096, wants BENCH_NAIVE_N=256 or so); BENCH_MODES: the bench's --modes
# (default torch:f32,torch,torch+ahead); BENCH_DECODERS: torchvision (nvJPEG, the default), pil, or
# both comma-separated (one bench each, files bench-<decoder>.json); BENCH_THREADS: decode-thread
# counts, space-separated, one bench each (files ...-t<N>.json; default: the engine's); LAYOUT_N:
# the layout check's photos (tests/benchmarks/cuda_detect.py). Without the
# classifier's file, BENCH_WEIGHTS=weights times the bundled models beside a stand-in classifier of
# the bundled configuration (speed only; its labels are not the bundled ones).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = --download ]; then
  # the versions uv.lock pins, so the device runs what the project tests
  mapfile -t WHEELS < <(python3 -c '
import tomllib
pins = {p["name"]: p["version"] for p in tomllib.load(open("uv.lock", "rb"))["package"]}
for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "pycocotools"):
    print(f"{name}=={pins[name]}")')
  mkdir -p .whl
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}"
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")' | tee "$OUT/versions.txt"
PARTS="${PARTS:-tests,bench}"
status=0
if [[ ",$PARTS," == *,tests,* ]]; then
  python3 -m pytest -p no:cacheprovider -o addopts="" -n 0 -ra -m gpu tests/test_gpu_paths.py 2>&1 | tee "$OUT/tests.log" || status=1
fi
if [[ ",$PARTS," == *,layout,* ]]; then  # the detector stage per weight layout and precision, profiled
  python3 -m tests.benchmarks.cuda_detect --weights weights --n "${LAYOUT_N:-128}" --out "$OUT/layout.json" 2>&1 |
    tee "$OUT/layout.log" || status=1
fi
if [[ ",$PARTS," == *,profile,* ]]; then  # the whole engine: detector forwards per batch size, torch.profiler
  python3 -m tests.benchmarks.cuda_engine_profile --weights "${BENCH_WEIGHTS:-weights}" --n "${PROFILE_N:-1024}" \
    --batches "${PROFILE_BATCHES:-64,256}" --out "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log" || status=1
fi
if [[ ",$PARTS," == *,bench,* ]]; then
  weights=()
  if [[ -n "${BENCH_WEIGHTS:-}" ]]; then
    # without the classifier's file (it cannot travel in one call): a stand-in of its card's configuration
    w=$(python3 -c 'import sys; from pathlib import Path; from tests.benchmarks.cuda_detect import stand_in_weights
print(stand_in_weights(Path(sys.argv[1]), Path("/tmp/cq-stand-in")))' "$BENCH_WEIGHTS")
    weights=(--weights "$w")
  fi
  BENCH_DECODERS="${BENCH_DECODERS:-torchvision}"
  # f32 first: the labels-differ counts are then bf16 + channels_last against f32, on the GPU
  naive=()
  [[ -n "${BENCH_NAIVE_N:-}" ]] && naive=(--naive-images "$BENCH_NAIVE_N")
  # one bench per decoder, the same seeded photos: nvJPEG at full size vs PIL's DCT-scaled decode on the host threads
  # and per decode-thread count (BENCH_THREADS, default: the engine's)
  # and per engine batch size (BENCH_BATCH, space-separated)
  for decoder in ${BENCH_DECODERS//,/ }; do
    for threads in ${BENCH_THREADS:-default}; do
      for batch in ${BENCH_BATCH:-64}; do
        suffix=$([[ "$BENCH_DECODERS" == *,* ]] && echo "-$decoder" || true)
        threading=()
        [[ "$threads" != default ]] && threading=(--decode-threads "$threads") && suffix="$suffix-t$threads"
        [[ "${BENCH_BATCH:-64}" == *" "* ]] && suffix="$suffix-b$batch"
        python3 -m pipelines.cli bench --device cuda --jpeg-decoder "$decoder" --n-images "${BENCH_N:-512}" \
          --batch-size "$batch" --modes "${BENCH_MODES:-torch:f32,torch,torch+ahead}" "${weights[@]}" \
          "${naive[@]}" "${threading[@]}" --out "$OUT/bench$suffix.json" 2>&1 | tail -n 20 |
          tee "$OUT/bench$suffix.log" || status=1
      done
    done
  done
fi
exit $status
