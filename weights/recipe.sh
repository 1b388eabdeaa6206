#!/usr/bin/env bash
# The project's default weights, trained from random init on a 2-core CPU in about 40 minutes.
#
#   bash weights/recipe.sh          # from the repository root; no arguments
#
# 1. a seeded synthetic multi-source set (`cervixqc synth`) in .cache/weights-data/ (ignored by git)
# 2. a cross-source split by patient: train hospital,field,evanet / val archive / test teaching
# 3. RetinaNet mobilenet_v3_large FPN @320 (`train-detector`), tested on the held-out source
# 4. Deep SAD 32x32 and ResNeSt50 @32 on the ground-truth cervix crops (thresholds: max F1 on val),
#    tested on the held-out source, on ground-truth crops and on the shipped detector's crops
# 5. detector/deep_sad/classifier .safetensors + .json into weights/ (ResNeSt50 stored as float16,
#    up-cast to float32 on load), each card with recipe, data, test metrics and sha256.
#
# The two training chains (detector | Deep SAD then ResNeSt) run side by side: one thread each
# (OMP_NUM_THREADS=1; on a shared 2-core machine two OpenMP threads per process spin-wait and
# trained the detector 12x slower). The variables below may be overridden from the
# environment for a smoke run (with WEIGHTS_OUT pointing elsewhere); the defaults made weights/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV=${UV:-.tools/bin/uv}
DATA=${DATA:-.cache/weights-data}
RUNS=${RUNS:-.cache/weights-runs}
WEIGHTS_OUT=${WEIGHTS_OUT:-weights}
N=${N:-1200}                 # images
RATIO=${RATIO:-6}            # regular : non-regular
MAX_SIDE=${MAX_SIDE:-640}
SEED=${SEED:-11}
DET_EPOCHS=${DET_EPOCHS:-16}
DET_MAX_STEPS=${DET_MAX_STEPS:-}     # smoke runs only
SAD_EPOCHS=${SAD_EPOCHS:-100}        # paper: 150 + 150; val ROC-AUC plateaus early, CPU time goes to the detector
SAD_PRETRAIN=${SAD_PRETRAIN:-100}
RES_EPOCHS=${RES_EPOCHS:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} PYTHONUNBUFFERED=1

CQ=("$UV" run --locked --no-sync cervixqc)
PY=("$UV" run --locked --no-sync python)

rm -rf "$DATA" "$RUNS"
mkdir -p "$DATA" "$RUNS"
: >"$RUNS/commands.txt"
: >"$RUNS/timings.tsv"

# step NAME CMD...: run, log the command line, record its wall time
step() {
    local name=$1 t0 t1
    shift
    echo "+ $*" | tee -a "$RUNS/commands.txt"
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    printf '%s\t%.1f\n' "$name" "$(awk "BEGIN{print $t1 - $t0}")" >>"$RUNS/timings.tsv"
    echo "== $name: $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s"
}

# 1. data
step synth "${CQ[@]}" synth "$DATA" -n "$N" --ratio "$RATIO" --max-side "$MAX_SIDE" --seed "$SEED"
printf '{"n": %s, "ratio": %s, "max_side": %s, "seed": %s, "preset": "small (overridden by -n/--ratio/--max-side)"}\n' \
    "$N" "$RATIO" "$MAX_SIDE" "$SEED" >"$RUNS/synth.json"

# 2. cross-source split by patient, with COCO subsets xsrc_{train,val,test}.json
step split "${CQ[@]}" split "$DATA/manifest.csv" -o "$DATA/xsrc.csv" --coco "$DATA/coco.json" \
    --train-sources hospital,field,evanet --val-sources archive --test-sources teaching

# 3 + 4. training: detector alongside stage 2
det_extra=()
[[ -n "$DET_MAX_STEPS" ]] && det_extra=(--max-steps "$DET_MAX_STEPS")
(
    step detector "${CQ[@]}" train-detector "$DATA/xsrc_train.json" "$DATA/xsrc_val.json" -o "$RUNS/det" \
        --arch retinanet --backbone mobilenet_v3_large --size 320 --epochs "$DET_EPOCHS" --lr 1e-3 \
        --batch-size 8 --workers 1 --seed 0 "${det_extra[@]}"
) >"$RUNS/detector.log" 2>&1 &
det_pid=$!
(
    step deep_sad "${CQ[@]}" train-deep-sad "$DATA/xsrc.csv" --coco "$DATA/coco.json" -o "$RUNS/sad" \
        --epochs "$SAD_EPOCHS" --pretrain-epochs "$SAD_PRETRAIN"
    step classifier "${CQ[@]}" train-resnest "$DATA/xsrc.csv" --coco "$DATA/coco.json" -o "$RUNS/res32" \
        --size 32 --epochs "$RES_EPOCHS" --synthesise 0.2
) >"$RUNS/stage2.log" 2>&1 &
s2_pid=$!
rc=0
wait "$det_pid" || rc=$?
wait "$s2_pid" || rc=$?
grep -E '^(\+ |== )' "$RUNS/detector.log" "$RUNS/stage2.log" || true
if [[ $rc -ne 0 ]]; then
    echo "training failed (rc $rc): see $RUNS/detector.log and $RUNS/stage2.log" >&2
    tail -20 "$RUNS/detector.log" "$RUNS/stage2.log" >&2
    exit "$rc"
fi

# 5a. verified copies with recipe + data on the cards, staged; the classifier stored as float16
STAGE="$RUNS/weights"
step export "${PY[@]}" weights/finalize.py export "$RUNS" "$DATA" "$STAGE"

# 4 (tests), on exactly the staged files: held-out source teaching
step eval_detector "${CQ[@]}" eval-detector "$STAGE/detector.json" "$DATA/xsrc_test.json" -o "$RUNS/eval-det" \
    --manifest "$DATA/xsrc.csv"
step eval_deep_sad "${CQ[@]}" eval "$STAGE/deep_sad.json" "$DATA/xsrc.csv" --coco "$DATA/coco.json" \
    --split test -o "$RUNS/eval-s2"
step eval_classifier "${CQ[@]}" eval "$STAGE/classifier.json" "$DATA/xsrc.csv" --coco "$DATA/coco.json" \
    --split test -o "$RUNS/eval-s2"
# the same on the crops the engine sees: the shipped detector's top box
"${PY[@]}" weights/finalize.py test-manifest "$DATA/xsrc.csv" "$DATA/xsrc_testonly.csv"
step detect "${CQ[@]}" detect "$STAGE/detector.json" "$DATA/xsrc_testonly.csv" -o "$DATA/det_boxes_test.json"
# (extra figures: `cervixqc eval` crashes when the detector found no box at all, so not fatal)
step eval_deep_sad_detcrops "${CQ[@]}" eval "$STAGE/deep_sad.json" "$DATA/xsrc.csv" \
    --coco "$DATA/det_boxes_test.json" --split test -o "$RUNS/eval-s2-detcrops" \
    || echo "WARNING: Deep SAD on detector crops failed; the card gets ground-truth-crop metrics only" >&2
step eval_classifier_detcrops "${CQ[@]}" eval "$STAGE/classifier.json" "$DATA/xsrc.csv" \
    --coco "$DATA/det_boxes_test.json" --split test -o "$RUNS/eval-s2-detcrops" \
    || echo "WARNING: ResNeSt on detector crops failed; the card gets ground-truth-crop metrics only" >&2

# 5b. test metrics into the cards (JSON only: the sha256 keeps matching), then publish
"${PY[@]}" weights/finalize.py metrics "$RUNS" "$STAGE"
mkdir -p "$WEIGHTS_OUT"
for stem in detector deep_sad classifier; do
    cp "$STAGE/$stem.safetensors" "$STAGE/$stem.json" "$WEIGHTS_OUT/"
done
"${PY[@]}" -c "
import sys
from models.io import load_weights
for s in ('detector', 'deep_sad', 'classifier'):
    load_weights(sys.argv[1] + '/' + s + '.json')
print('sha256 verified for the three models in', sys.argv[1])" "$WEIGHTS_OUT"
du -ch "$WEIGHTS_OUT"/*.safetensors "$WEIGHTS_OUT"/*.json | tail -1
cat "$RUNS/timings.tsv"
