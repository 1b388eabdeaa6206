#!/usr/bin/env bash
# The device checks in one run, for a lent NVIDIA machine (../.library/device/README.md): the
# CUDA tests (tests/test_gpu_paths.py) and issue 15's GPU bench, logs and figures into $OUT.
#
# That machine's python3 (3.12) has torch, torchvision, timm, pandas, scikit-learn and most of
# the rest; what the engine needs beyond them travels as wheels. Here, once, from the repo root:
#   echo /.whl/ >> .git/info/exclude && bash tests/benchmarks/gpu_check.sh --download
# then run there (carry: [".whl"]):  bash tests/benchmarks/gpu_check.sh
#
# The bench runs untrained weights at the bundled sizes (speed only): the working tree with
# weights/ is 88 MB, over the 64 MiB a call carries, so the bundled classifier cannot travel
# whole. For the labels-differ count with the bundled weights, move weights/classifier.safetensors
# out of the tree for the call and bring it in two ignored halves over two calls to one warm
# machine (ignored files stay there between calls), joined with cat before `--weights weights`.
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
status=0
python3 -m pytest -p no:cacheprovider -o addopts="" -n 0 -ra -m gpu tests/test_gpu_paths.py 2>&1 | tee "$OUT/tests.log" || status=1
python3 -m pipelines.cli bench --device cuda --jpeg-decoder torchvision --n-images 512 --batch-size 64 \
  --out "$OUT/bench.json" 2>&1 | tail -n 20 | tee "$OUT/bench.log" || status=1
exit $status
