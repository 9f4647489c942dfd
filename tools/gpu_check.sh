#!/usr/bin/env bash
# The one-shot GPU check: install, record the environment, run the @gpu tests and the
# benchmarks, each under a timeout, and write JSON + logs + summary.{json,md} into OUT_DIR.
#
#   tools/gpu_check.sh OUT_DIR [--dry-run] [--wheels DIR] [--skip STAGE,...] [--bundle FILE]
#
# Stages (in order):  wheels install env gpu_tests seq_loglik dpo_1b dpo_tiny
#   wheels      find the megatron-core and liger-kernel wheels in --wheels (default .whl)
#   install     pip-install them and this project (--no-deps) into $GPU_CHECK_SITE
#   env         nvidia-smi, torch / triton / megatron-core / liger versions, TE importable   -> env.json
#   gpu_tests   python -m pytest -m gpu                                                       -> gpu_tests.xml
#   seq_loglik  tools/bench_seq_loglik.py, bf16, 16k tokens, d=4096, V=128256              -> seq_loglik_h200.json
#   dpo_1b      tools/bench_dpo.py: random 1.24 B Llama, seq 1024, bf16, + the memory planner -> dpo_1b.json
#   dpo_tiny    tools/bench_dpo.py --tiny (dry run only: the CPU stand-in for dpo_1b)      -> dpo_tiny.json
# Each stage logs to OUT_DIR/STAGE.log; a failed or timed-out stage is recorded and the
# next one runs.  Exit 0 when no stage failed, 1 otherwise, 2 on bad arguments.
#
# --dry-run runs the CPU-safe parts here (wheel discovery without installing, env,
# dpo_tiny with the planner) and marks every GPU stage "skipped (dry run)".
#
# The GPU machine has no network and no megatron-core / liger-kernel: download the wheels on
# a networked machine into .whl/ (ignored through .git/info/exclude, not .gitignore), then
# carry .whl with the run:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl megatron-core==0.16.1 liger-kernel
# On the device machine ($OUT takes back 8 files at most, hence the bundle):
#   bash tools/gpu_check.sh /tmp/gc --bundle $OUT/gpu_check.tgz; cp /tmp/gc/summary.* /tmp/gc/*.json $OUT/
# and commit its summary.json as benchmarks/gpu_check_h200.json (the README's GPU numbers cite it).
# Budget: the stage timeouts below add up to under 8 minutes.
set -euo pipefail

usage() {
    echo "usage: tools/gpu_check.sh OUT_DIR [--dry-run] [--wheels DIR] [--skip STAGE,...] [--bundle FILE]" >&2
}

STAGES="wheels install env gpu_tests seq_loglik dpo_1b dpo_tiny"
# Seconds per stage: 10 + 30 + 45 + 145 + 95 + 150 = 475 s at most on the GPU machine.  A dry
# run gets more: it runs on shared CPU machines (CI, developers'), where imports alone can take 30 s.
declare -A TIMEOUT=([wheels]=10 [install]=30 [env]=45 [gpu_tests]=145 [seq_loglik]=95 [dpo_1b]=150
                    [dpo_tiny]=300)

OUT_DIR="" DRY_RUN=0 WHEELS=".whl" SKIP="" BUNDLE=""
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --wheels) [[ $# -ge 2 ]] || { usage; exit 2; }; WHEELS="$2"; shift ;;
        --skip) [[ $# -ge 2 ]] || { usage; exit 2; }; SKIP="$2"; shift ;;
        --bundle) [[ $# -ge 2 ]] || { usage; exit 2; }; BUNDLE="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; usage; exit 2 ;;
        *) [[ -z "$OUT_DIR" ]] || { echo "error: one OUT_DIR only (got $OUT_DIR and $1)" >&2; usage; exit 2; }
           OUT_DIR="$1" ;;
    esac
    shift
done
[[ -n "$OUT_DIR" ]] || { usage; exit 2; }
((DRY_RUN == 0)) || TIMEOUT[env]=180
for s in ${SKIP//,/ }; do
    [[ " $STAGES " == *" $s "* ]] || { echo "error: --skip: unknown stage $s (stages: $STAGES)" >&2; exit 2; }
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
absolute() { [[ "$1" == /* ]] && printf '%s' "$1" || printf '%s/%s' "$PWD" "$1"; }  # before the cd below
[[ -z "$BUNDLE" ]] || BUNDLE="$(absolute "$BUNDLE")"
[[ "$WHEELS" != ".whl" ]] || WHEELS="$ROOT/.whl"  # the default lies in the repository, wherever we are called
WHEELS="$(absolute "$WHEELS")"
cd "$ROOT"
PY="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"
export PYTHONUNBUFFERED=1
# An earlier run's outputs in OUT_DIR would be read as this run's numbers.
rm -f "$OUT_DIR"/{summary.json,summary.md,env.json,gpu_tests.xml,seq_loglik_h200.json,dpo_1b.json,dpo_tiny.json} \
    "$OUT_DIR"/{plan_dpo_1b.json,plan_dpo_tiny.json} "$OUT_DIR"/*.log
: >"$OUT_DIR/stages.jsonl"

# One JSON line per stage; the reason is our own text, stripped of characters JSON would need escaped.
record() {  # STAGE STATUS RC SECONDS REASON
    local reason="${5//[\"\\]/}"
    reason="$(printf '%s' "$reason" | tr -d '\000-\037')"
    printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "reason": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$reason" >>"$OUT_DIR/stages.jsonl"
    echo "[gpu_check] $1: $2${5:+ ($5)}"
}

skipped_by_user() { [[ ",$SKIP," == *",$1,"* ]]; }

# run_stage STAGE COMMAND...: COMMAND under the stage's timeout, output in STAGE.log; never fails the script.
run_stage() {
    local stage="$1"; shift
    if skipped_by_user "$stage"; then record "$stage" skipped null 0 "--skip"; return 0; fi
    local start=$SECONDS rc=0 limit="${TIMEOUT[$stage]}"
    echo "[gpu_check] $stage: running (timeout ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$stage.log" 2>&1 || rc=$?
    local took=$((SECONDS - start))
    if ((rc == 0)); then
        record "$stage" ok 0 "$took" ""
    elif ((rc == 124 || rc == 137)); then
        record "$stage" failed "$rc" "$took" "timed out after ${limit} s, see $stage.log"
    else
        local last
        last="$(grep -v '^\s*$' "$OUT_DIR/$stage.log" | tail -n 1 | cut -c1-200 || true)"
        record "$stage" failed "$rc" "$took" "exit $rc, see $stage.log: $last"
    fi
}

skip_stage() { record "$1" skipped null 0 "$2"; }  # STAGE REASON

install_all() {  # wheels (no index, no deps) and this project, into $SITE
    set -euo pipefail
    mkdir -p "$SITE"
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if ((${#wheels[@]})); then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    fi
    # --no-deps: torch and the rest are the machine's own; the install maps kernels/ to fg_megatron_kernels
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$ROOT"; then
        echo "pip could not build the project (setuptools missing?): linking kernels/ as fg_megatron_kernels"
        ln -sfn "$ROOT/kernels" "$SITE/fg_megatron_kernels"
    fi
    PYTHONPATH="$ROOT:$SITE" "$PY" -c "import fg_megatron_kernels.seq_loglik, megatron.core; print('imports ok')"
}
export -f install_all
export PY SITE WHEELS ROOT

find_wheels() {
    shopt -s nullglob
    local megatron=("$WHEELS"/megatron_core-*.whl) liger=("$WHEELS"/liger_kernel-*.whl)
    ((${#megatron[@]} + ${#liger[@]})) && printf '%s\n' "${megatron[@]##*/}" "${liger[@]##*/}"
    ((${#megatron[@]} == 1)) || { echo "want one megatron_core wheel in $WHEELS, found ${#megatron[@]}"; return 1; }
    ((${#liger[@]} == 1)) || { echo "want one liger_kernel wheel in $WHEELS, found ${#liger[@]}"; return 1; }
}
export -f find_wheels

DRY="dry run"
if ((DRY_RUN)) && ! skipped_by_user wheels && ! find_wheels >"$OUT_DIR/wheels.log" 2>&1; then
    # a dry run may well be on a machine without the wheels (CI): a note, not a failure
    skip_stage wheels "$DRY: $(tail -n 1 "$OUT_DIR/wheels.log")"
else
    run_stage wheels bash -c find_wheels
fi
if ((DRY_RUN)); then
    skip_stage install "$DRY"
else
    run_stage install bash -c install_all
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
run_stage env "$PY" -m fg_megatron.bench.check env "$OUT_DIR"
if ((DRY_RUN)); then
    for s in gpu_tests seq_loglik dpo_1b; do skip_stage "$s" "$DRY"; done
    rm -rf "$WORK/dpo_tiny"
    run_stage dpo_tiny "$PY" tools/bench_dpo.py --tiny --workdir "$WORK/dpo_tiny" --out "$OUT_DIR/dpo_tiny.json" \
        --plan-json "$OUT_DIR/plan_dpo_tiny.json"
else
    run_stage gpu_tests "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT_DIR/gpu_tests.xml" tests
    run_stage seq_loglik "$PY" tools/bench_seq_loglik.py --tokens 16384 --hidden 4096 --vocab 128256 \
        --dtype bfloat16 --rounds 2 --out "$OUT_DIR/seq_loglik_h200.json"
    rm -rf "$WORK/dpo_1b"
    run_stage dpo_1b "$PY" tools/bench_dpo.py --workdir "$WORK/dpo_1b" --out "$OUT_DIR/dpo_1b.json" \
        --plan-json "$OUT_DIR/plan_dpo_1b.json"
    rm -rf "$WORK/dpo_1b"  # 2.5 GB of random weights
    skip_stage dpo_tiny "a GPU run measures dpo_1b instead"
fi

rc=0
"$PY" -m fg_megatron.bench.check summary "$OUT_DIR" || rc=$?
if [[ ! -s "$OUT_DIR/summary.md" ]]; then  # the summary itself broke: keep the raw stage lines
    { echo "# GPU check summary (raw: the summary step failed)"; cat "$OUT_DIR/stages.jsonl"; } >"$OUT_DIR/summary.md"
    rc=1
fi
if [[ -n "$BUNDLE" ]]; then
    mkdir -p "$(dirname "$BUNDLE")"
    tar -C "$(dirname "$OUT_DIR")" -czf "$BUNDLE" "$(basename "$OUT_DIR")" || rc=1
fi
exit "$rc"
