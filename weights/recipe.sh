#!/usr/bin/env bash
# The project's default weights: real photos + hard negatives + synthetic scenes, trained from
# random init on a 2-core CPU (times in weights/README.md). Run from the repository root:
#
#   MIRRORS=/path/to/snapshots make weights        # or: MIRRORS=... bash weights/recipe.sh
#
# MIRRORS holds git snapshots of the public repositories listed in weights/data/*.csv, one per
# repository as MIRRORS/owner+name/repo (the search tool's fetch writes exactly that; `git clone
# --mirror URL MIRRORS/owner+name/repo` does too). The photos are copied out by sha256 into
# $DATA (git-ignored) and never enter the repository.
#
#  1. real photos (weights/data/realdata_train.csv: labels, case ids) and hard negatives
#     (weights/data/hard_negatives.csv: other organs) -> manifests; checked cervix boxes
#     (weights/data/real_boxes.json, made with propose-boxes + fix-boxes) matched by sha256
#  2. copies of one photo under two case ids put under one (cervixqc duplicates + split
#     --merge-duplicates), then a 5-fold split by case, rotation 0: test = fold 0, validation =
#     fold 1, training = the rest; the hard-negative repositories marked "heldout" are test
#     only, never trained on (this split is not the shipped weights': weights/README.md)
#  3. synthetic scenes from 4 generator sources (volume, no-cervix scenes); a 5th source is
#     generated apart for the no-regression check on synthetic data
#  4. detector: RetinaNet mobilenet_v3 @320 pretrained on the synthetic scenes, then trained on
#     real + hard negatives with synthetic scenes mixed in (hSDB's mix, 1 synthetic : 2 real);
#     then the shipped, narrower one (FPN and head 128 wide: 1.8x faster in OpenVINO) from that
#     one's backbone, on the same mix: 10 epochs for its new layers, then 8 more at a lower rate;
#     then the presence head (stage 0: colour histogram + the detector's own features) on the
#     real training photos + the synthetic training scenes (without them it called 93% of
#     synthetic cervixes no_cervix; each weighs 0.05 of a real photo), its threshold from real validation
#  5. Deep SAD and ResNeSt50 @32 on real crops (+ green/iodine synthesised from real regular
#     crops, + synthetic crops for volume), then the crop-colour scorer (the third vote of the
#     two_of_three policy) on the same crops; thresholds from validation, pooled over sources
#  6. evaluation: detector (val, test), the whole pipeline on real test photos and on the
#     held-out negatives, the colour-histogram baseline, the synthetic no-regression check
#  7. cards completed (data, licences, counts, the split's fingerprint, recipe, metrics)
#  8. the OpenVINO export, in the staging folder, then the findings' thresholds on its crops
#     (calibrate-findings); 9. everything copied into weights/ and checked
#
# The detector chain and the stage-2 chain run side by side with one thread each. Variables
# below may be overridden (smoke runs: see weights/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV=${UV:-$(command -v uv || echo .tools/bin/uv)}  # `make weights` passes the one `make install` set up
MIRRORS=${MIRRORS:?set MIRRORS to the folder of repository snapshots (see the top of weights/recipe.sh)}
# checked before anything below is removed: a mistyped or unmounted MIRRORS deleted the trained
# runs and their logs, then failed at the first step (an audit)
if [[ ! -d "$MIRRORS" || -z "$(ls -A "$MIRRORS" 2>/dev/null)" ]]; then
    echo "error: MIRRORS=$MIRRORS is no folder of repository snapshots (see the top of weights/recipe.sh);" \
         "nothing was removed" >&2
    exit 2
fi
# and it must hold the real photos' repositories: a folder of other things passed the check
# above, and the runs were deleted before the first step failed (an audit)
missing=$(python3 - "$MIRRORS" <<'PY'
import csv, pathlib, sys
mirrors = pathlib.Path(sys.argv[1])
with open("weights/data/realdata_train.csv", newline="") as f:
    repos = sorted({row["repo"] for row in csv.DictReader(f)})
base = [mirrors / r.replace("/", "+") / "repo" for r in repos]  # as extract-listed reads them
print(" ".join(r for r, b in zip(repos, base) if not ((b / ".git" / "HEAD").is_file() or (b / "HEAD").is_file())))
PY
)
if [[ -n "$missing" ]]; then
    echo "error: MIRRORS=$MIRRORS holds no snapshot of $missing (as owner+name/repo: see the top of" \
         "weights/recipe.sh); nothing was removed" >&2
    exit 2
fi
DATA=${DATA:-.cache/real-data}
RUNS=${RUNS:-.cache/real-runs}
WEIGHTS_OUT=${WEIGHTS_OUT:-weights}
FOLD=${FOLD:-0}
SYNTH_N=${SYNTH_N:-1200}
SYNTH_TEST_N=${SYNTH_TEST_N:-300}
PRE_EPOCHS=${PRE_EPOCHS:-8}          # detector pretraining on synthetic scenes
PRETRAINED_DETECTOR=${PRETRAINED_DETECTOR:-}  # or: a synthetic-only detector card to start from
DET_EPOCHS=${DET_EPOCHS:-12}         # then real + negatives + synthetic
NARROW_EPOCHS=${NARROW_EPOCHS:-10}   # then the narrow FPN/head from that backbone (new layers)
NARROW_TUNE_EPOCHS=${NARROW_TUNE_EPOCHS:-8}  # and once more from itself at a lower rate
FPN_CHANNELS=${FPN_CHANNELS:-128}
EXTRA_RATIO=${EXTRA_RATIO:-0.5}      # synthetic scenes per real photo in each detector epoch
DET_MAX_STEPS=${DET_MAX_STEPS:-}     # smoke runs only
SAD_EPOCHS=${SAD_EPOCHS:-100}
SAD_PRETRAIN=${SAD_PRETRAIN:-100}
RES_EPOCHS=${RES_EPOCHS:-100}
REUSE=${REUSE:-0}                    # 1: keep trained runs already in $RUNS (re-evaluate, re-export)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} PYTHONUNBUFFERED=1

CQ=("$UV" run --locked --no-sync cervixqc --threads 1)
PY=("$UV" run --locked --no-sync python)
mkdir -p "$DATA" "$RUNS"
[[ "$REUSE" == 1 ]] || rm -rf "$RUNS"/{det-synth,det-wide,det-narrow,det,presence,sad,res32,colour}
rm -rf "$RUNS"/{eval-*,weights,findings}
if [[ "$REUSE" != 1 ]]; then  # a reuse keeps the earlier commands and wall times of what it reuses
    : >"$RUNS/commands.txt"
    : >"$RUNS/timings.tsv"
fi

declare -A DONE=([detector_pretrain]="$RUNS/det-synth/detector.json" [detector_wide]="$RUNS/det-wide/detector.json"
                 [detector_narrow]="$RUNS/det-narrow/detector.json" [detector]="$RUNS/det/detector.json"
                 [presence]="$RUNS/presence/presence.json" [deep_sad]="$RUNS/sad/deep_sad.json"
                 [classifier]="$RUNS/res32/classifier.json" [colour]="$RUNS/colour/colour.json")
step() {  # step NAME CMD...: run, log the command line, record its wall time
    local name=$1 t0 t1
    shift
    if [[ "$REUSE" == 1 && -n "${DONE[$name]:-}" && -f "${DONE[$name]}" ]]; then
        # not logged: the cards list the command that made the run (kept from the earlier run),
        # not this one, which may ask for other epochs
        echo "== $name: reused ${DONE[$name]}"
        return
    fi
    echo "+ $*" | tee -a "$RUNS/commands.txt"
    # a run stopped before its card: trained again from the start (the train commands refuse
    # a folder that holds a run, unless told to --resume it)
    [[ -n "${DONE[$name]:-}" ]] && rm -rf "$(dirname "${DONE[$name]}")"
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    printf '%s\t%.1f\n' "$name" "$(awk "BEGIN{print $t1 - $t0}")" >>"$RUNS/timings.tsv"
    echo "== $name: $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s"
}

# 1. real photos and hard negatives
step extract "${CQ[@]}" extract-listed weights/data/realdata_train.csv --mirrors "$MIRRORS" -o "$DATA/real"
step extract_negatives "${CQ[@]}" extract-listed weights/data/hard_negatives.csv --mirrors "$MIRRORS" \
    -o "$DATA/negatives"
step import "${CQ[@]}" import-labels weights/data/realdata_train.csv --images "$DATA/real" \
    -o "$DATA/real/manifest.csv" --source-col case --source-sep : --sha256-col sha256 --kind-map unknown=skip
step import_negatives "${CQ[@]}" import-labels weights/data/hard_negatives.csv --images "$DATA/negatives" \
    -o "$DATA/negatives/manifest.csv" --kind no_cervix --patient-col file --source-col repo --sha256-col sha256
step merge "${CQ[@]}" merge-manifests "$DATA/real/manifest.csv" "$DATA/negatives/manifest.csv" -o "$DATA/all.csv"
step boxes "${CQ[@]}" match-boxes "$DATA/all.csv" --boxes weights/data/real_boxes.json -o "$DATA/all_boxes.json"

# 2. case-level folds; held-out negative repositories are test only. Copies of one photo filed
# under two case ids (the listed photos hold 14 byte-identical groups, 13 across two ids) are
# put under one id first, so no copy sits in training while another is tested. The keys used
# (sha256, whole-photo hash) do not depend on the weights that compute them.
HELD=$("${PY[@]}" -c "import csv,sys; print(','.join(sorted({r['repo'] for r in csv.DictReader(open(sys.argv[1])) if r['role'] == 'heldout'})))" weights/data/hard_negatives.csv)
step duplicates "${CQ[@]}" duplicates "$DATA/all.csv" --weights weights -o "$DATA/duplicates.csv"
step split "${CQ[@]}" split "$DATA/all.csv" -o "$DATA/split.csv" --coco "$DATA/all_boxes.json" \
    --folds 5 --fold "$FOLD" --test-sources "$HELD" --duplicates "$DATA/duplicates.csv" --merge-duplicates

# 3. synthetic scenes: four sources for training, the fifth apart for the no-regression check
step synth "${CQ[@]}" synth "$DATA/synth" -n "$SYNTH_N" --ratio 4 --no-cervix-fraction 0.15 --max-side 640 \
    --seed 13 --sources hospital,field,evanet,archive
step synth_split "${CQ[@]}" split "$DATA/synth/manifest.csv" -o "$DATA/synth/xsrc.csv" \
    --coco "$DATA/synth/coco.json" --train-sources hospital,field,evanet --val-sources archive
step synth_test "${CQ[@]}" synth "$DATA/synth-test" -n "$SYNTH_TEST_N" --ratio 4 --no-cervix-fraction 0.1 \
    --max-side 640 --seed 99 --sources teaching

det_extra=()
[[ -n "$DET_MAX_STEPS" ]] && det_extra=(--max-steps "$DET_MAX_STEPS")
DET=(--arch retinanet --backbone mobilenet_v3_large --size 320 --batch-size 8 --workers 1 --seed 0)
(   # 4. detector: synthetic pretraining, then real + negatives + synthetic; then stage 0 on it
    # The pretraining is only an initialisation: any synthetic-only detector of the same
    # architecture will do (the shipped weights started from the previous bundled one, `git show
    # 69028d6:weights/detector.json`); the fine-tuned card records its sha256 (init_from_sha256).
    INIT=${PRETRAINED_DETECTOR:-$RUNS/det-synth/detector.json}
    [[ -n "$PRETRAINED_DETECTOR" ]] ||
        step detector_pretrain "${CQ[@]}" train-detector "$DATA/synth/xsrc_train.json" "$DATA/synth/xsrc_val.json" \
            -o "$RUNS/det-synth" "${DET[@]}" --epochs "$PRE_EPOCHS" --lr 1e-3 "${det_extra[@]}"
    MIX=(--extra-coco "$DATA/synth/xsrc_train.json" --extra-ratio "$EXTRA_RATIO" "${det_extra[@]}")
    step detector_wide "${CQ[@]}" train-detector "$DATA/split_train.json" "$DATA/split_val.json" -o "$RUNS/det-wide" \
        "${DET[@]}" --epochs "$DET_EPOCHS" --lr 5e-4 --init-from "$INIT" "${MIX[@]}"
    step detector_narrow "${CQ[@]}" train-detector "$DATA/split_train.json" "$DATA/split_val.json" \
        -o "$RUNS/det-narrow" "${DET[@]}" --fpn-channels "$FPN_CHANNELS" --epochs "$NARROW_EPOCHS" --lr 1e-3 \
        --init-from "$RUNS/det-wide/detector.json" "${MIX[@]}"
    step detector "${CQ[@]}" train-detector "$DATA/split_train.json" "$DATA/split_val.json" -o "$RUNS/det" \
        "${DET[@]}" --fpn-channels "$FPN_CHANNELS" --epochs "$NARROW_TUNE_EPOCHS" --lr 3e-4 --seed 1 \
        --init-from "$RUNS/det-narrow/detector.json" "${MIX[@]}"
    step presence "${CQ[@]}" train-presence "$DATA/split.csv" --detector "$RUNS/det/detector.json" \
        -o "$RUNS/presence" --extra-manifest "$DATA/synth/xsrc.csv"
) >"$RUNS/detector.log" 2>&1 &
det_pid=$!
(   # 5. stage 2 on real crops, synthetic crops for volume, thresholds from real validation
    EXTRA=(--extra-manifest "$DATA/synth/xsrc.csv" --extra-coco "$DATA/synth/coco.json" --synthesise 0.2)
    step deep_sad "${CQ[@]}" train-deep-sad "$DATA/split.csv" --coco "$DATA/all_boxes.json" -o "$RUNS/sad" \
        --epochs "$SAD_EPOCHS" --pretrain-epochs "$SAD_PRETRAIN" "${EXTRA[@]}"
    step classifier "${CQ[@]}" train-resnest "$DATA/split.csv" --coco "$DATA/all_boxes.json" -o "$RUNS/res32" \
        --size 32 --epochs "$RES_EPOCHS" "${EXTRA[@]}"
    step colour "${CQ[@]}" train-colour "$DATA/split.csv" --coco "$DATA/all_boxes.json" -o "$RUNS/colour" \
        --extra-manifest "$DATA/synth/xsrc.csv" --extra-coco "$DATA/synth/coco.json"
    step baseline "${CQ[@]}" baseline-colour "$DATA/split.csv" -o "$RUNS/eval-baseline"
) >"$RUNS/stage2.log" 2>&1 &
s2_pid=$!
rc=0
wait "$det_pid" || rc=$?
wait "$s2_pid" || rc=$?
grep -hE '^(\+ |== )' "$RUNS/detector.log" "$RUNS/stage2.log" || true
if [[ $rc -ne 0 ]]; then
    echo "training failed (rc $rc): see $RUNS/detector.log and $RUNS/stage2.log; REUSE=1 keeps the runs that" \
         "finished when you run it again" >&2
    tail -20 "$RUNS/detector.log" "$RUNS/stage2.log" >&2
    exit "$rc"
fi

# 7a. verified copies with recipe + data on the cards, staged (classifier stored as float16)
STAGE="$RUNS/weights"
step export "${PY[@]}" weights/finalize.py export "$RUNS" "$DATA" "$STAGE"

# 6. evaluation of exactly the staged files
CQ2=("$UV" run --locked --no-sync cervixqc --threads 2)
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
# The default stage-2 policy is chosen on the validation run (finalize.py policy) before the
# test run, which then reports the policy the weights ship with.
for split in val test; do
    step "eval_detector_$split" "${CQ2[@]}" eval-detector "$STAGE/detector.json" "$DATA/split_$split.json" \
        -o "$RUNS/eval-det-$split" --manifest "$DATA/split.csv"
    step "eval_pipeline_$split" "${CQ2[@]}" eval-pipeline "$DATA/split.csv" --split "$split" --weights "$STAGE" \
        -o "$RUNS/eval-pipeline-$split"
    if [[ "$split" == val ]]; then
        "${PY[@]}" weights/finalize.py policy "$RUNS/eval-pipeline-val/pipeline_metrics.json" "$STAGE"
    fi
done
step eval_synthetic_detector "${CQ2[@]}" eval-detector "$STAGE/detector.json" "$DATA/synth-test/coco.json" \
    -o "$RUNS/eval-synth-det"
step eval_synthetic_pipeline "${CQ2[@]}" eval-pipeline "$DATA/synth-test/manifest.csv" --weights "$STAGE" \
    -o "$RUNS/eval-synth-pipeline"

# 7b. metrics into the cards (JSON only: the sha256 keeps matching)
"${PY[@]}" weights/finalize.py metrics "$RUNS" "$STAGE"
# 8. the OpenVINO export the engine runs on CPUs (detector + Deep SAD), made in the staging folder:
#    exported after the copy, a failed export left new models beside stale exports in weights/,
#    which the engine refuses on a CPU (and the next run's duplicates step loads that engine)
step openvino_export "${CQ2[@]}" export --weights "$STAGE"
# 8b. the quality findings' thresholds, on these weights' crops (a retrained detector moves them)
#     of this split's real cervix photos (calibrate-findings leaves the negatives out), through
#     the runtime a site's CPU runs: train + val choose, test reports. weights/ kept the
#     previous detector's card before (an audit)
step findings "${CQ2[@]}" calibrate-findings "$DATA/split.csv" -o "$RUNS/findings" --weights "$STAGE"
cp "$RUNS/findings/findings.json" "$STAGE/"
# 9. publish: every file of the staged folder, then checked where it landed
mkdir -p "$WEIGHTS_OUT"
for stem in presence detector deep_sad classifier colour; do
    cp "$STAGE/$stem.safetensors" "$STAGE/$stem.json" "$WEIGHTS_OUT/"
done
cp "$STAGE"/*.openvino.* "$STAGE/findings.json" "$WEIGHTS_OUT/"
"${PY[@]}" -c "
import sys
from pathlib import Path
from models.io import load_weights
from pipelines.engine.weights_folder import check_weights
for s in ('presence', 'detector', 'deep_sad', 'classifier', 'colour'):
    load_weights(sys.argv[1] + '/' + s + '.json')
check_weights(Path(sys.argv[1]))  # the exports too, made from these very files, and the findings card read
print('sha256 verified for the five models and their exports in', sys.argv[1])" "$WEIGHTS_OUT"
du -ch "$WEIGHTS_OUT"/*.safetensors "$WEIGHTS_OUT"/*.json "$WEIGHTS_OUT"/*.openvino.* | tail -1
cat "$RUNS/timings.tsv"
