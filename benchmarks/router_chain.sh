#!/usr/bin/env bash
# Issue 13's numbers on one backbone: every stage on the eight text domains.
#
#     benchmarks/router_chain.sh [RUN_ROOT]        # default runs/chain
#     MAX_MINUTES=60 benchmarks/router_chain.sh    # stop each training stage after 60 min
#
# Stages, in order; each is skipped when its output exists and resumed from its
# checkpoints when it was interrupted, so the chain can be run again and again (also
# across sessions) until it is through:
#   convert      sorted and compensated on the eight domains' calibration text
#   train        train-elastic over MLP *and* head widths on the eight domains
#   lut          the prefill 1x256 latency table of the trained backbone
#   dynamic      per-token routers taught by measured excess, shrunk toward what the
#                hidden state predicts (--shrink-toward hidden)
#   static       static routers taught by the same measurements (each op's mean excess).
#                Trained through the surrogate of Figure 3 they fell to the cheapest
#                sub-network on this backbone, on the eight domains mixed and on Wikipedia,
#                with either trust rule (squared error under 0.15, or half the variance
#                explained): the surrogate was trusted on few steps, and the latency loss
#                alone pulls the cost down (docs/ROUTERS.md)
#   benchmarks   Figure 13 (router_budgets.py), per token against per op
#                (measured_routers.py), token shares at 0.6 (Figure 9), dynamic against
#                static and capacity timing (dynamic_vs_static.py), profile-check of the
#                prefill table (some hours after profile) and of a decode table
# Alone on a 2-core CPU: convert 3-4 min, train about 16-20 s a step, lut 3 min, dynamic
# routers 42 min (measuring 6 blocks per domain: 37 min, 2026-12-05), static routers a
# minute or two, benchmarks about two hours.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/chain}
FX=${FX:-.venv/bin/flextron}
PY=${PY:-.venv/bin/python}
LIMIT=()
if [[ -n "${MAX_MINUTES:-}" ]]; then LIMIT=(--max-minutes "$MAX_MINUTES"); fi
mkdir -p "$R"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$R/chain.log"; }

finished() { [[ -f "$1/final/flextron.json" || -f "$1/final/routers.json" ]]; }

# a training stage: done when RUN/final exists; resumed when RUN holds checkpoints
train() {
    local run=$1; shift
    if finished "$run"; then
        log "skip $run (done)"; return 0
    fi
    local resume=()
    if [[ -d "$run/checkpoints" ]] && compgen -G "$run/checkpoints/*" >/dev/null; then
        resume=(--resume)
    fi
    log "run $* $run ${resume[*]:-}"
    local rc=0
    "$FX" "$@" "$run" "${resume[@]}" "${LIMIT[@]}" 2>&1 | tr '\r' '\n' | grep -v -E "[0-9]+%\|" \
        >>"$R/chain.log" || rc=${PIPESTATUS[0]}
    if [[ $rc != 0 ]]; then log "failed in $run (exit $rc; see $R/chain.log)"; exit 4; fi
    if ! finished "$run"; then
        log "stopped in $run (run the chain again to resume)"; exit 3
    fi
}

once() {  # a one-shot stage: skipped when its output file exists
    local out=$1; shift
    if [[ -e "$out" ]]; then log "skip $out"; return 0; fi
    log "run $*"
    "$@" >>"$R/chain.log" 2>&1 || { log "failed: $* (see $R/chain.log)"; exit 4; }
}

main() {  # one function, read whole before it runs: the file can be edited meanwhile
    once "$R/convert/flextron.json" "$FX" convert --calib-domains all --calib-samples 128 \
        --heldout-tokens 2048 --out "$R/convert"
    train "$R/train" train-elastic --elastic "$R/convert" --domains all --steps 240 --batch 4 \
        --seq 256 --samples 2 --sampler uniform --loss kd --lr 3e-4 --warmup 10 \
        --checkpoint-every 10 --eval-every 60 --eval-tokens 4096
    once "$R/lut.json" "$FX" profile "$R/train" --shapes 1x256 --threads 2 --json "$R/lut.json"
    train "$R/dynamic" train-routers --elastic "$R/train/final" --lut "$R/lut.json" \
        --mode dynamic --metric latency --signal measured --measure-blocks 6 --domains all \
        --shrink-toward hidden --token-weight 0 --steps 600 --batch 4 --seq 256 \
        --eval-tokens 4096 --checkpoint-every 200
    if [[ ! -e "$R/static/measured.pt" ]]; then  # the same measurements: nothing measured again
        mkdir -p "$R/static" && cp "$R/dynamic/measured.pt" "$R/static/measured.pt"
    fi
    train "$R/static" train-routers --elastic "$R/train/final" --lut "$R/lut.json" \
        --mode static --metric latency --signal measured --measure-blocks 6 --domains all \
        --steps 600 --batch 4 --seq 256 --eval-tokens 4096 --checkpoint-every 200
    once "$R/router_budgets.json" "$PY" benchmarks/router_budgets.py "$R/static" \
        --budgets 0.5,0.6,0.7,0.8 --blocks 8 --json "$R/router_budgets.json" \
        --plot "$R/router-budgets.png"
    once "$R/measured_routers.json" "$PY" benchmarks/measured_routers.py "$R/dynamic" \
        --tokens 1024 --json "$R/measured_routers.json"
    once "$R/shares_06.json" "$PY" benchmarks/token_shares.py "$R/dynamic" --budget 0.6 \
        --tokens 8192 --json "$R/shares_06.json" --plot "$R/shares_06.png"
    once "$R/dvs_mixed.json" "$PY" benchmarks/dynamic_vs_static.py "$R/static" "$R/dynamic" \
        --budgets 0.5,0.6,0.7,0.8 --blocks 32 --batch 4 --reps 0 --kinds static,dynamic \
        --domains all --recalibrate --calib-blocks 16 --json "$R/dvs_mixed.json"
    once "$R/dvs_capacity.json" "$PY" benchmarks/dynamic_vs_static.py "$R/static" "$R/dynamic" \
        --budgets 0.5,0.6,0.7,0.8 --blocks 32 --batch 4 --reps 5 --kinds capacity \
        --precision 0.02 --domains all --json "$R/dvs_capacity.json"
    once "$R/profile_check.json" "$FX" profile-check "$R/train" --lut "$R/lut.json" \
        --json "$R/profile_check.json" --plot "$R/profile_check.png"
    once "$R/lut_decode.json" "$FX" profile "$R/train" --mode decode --shapes 1x256 --threads 2 \
        --json "$R/lut_decode.json"
    once "$R/profile_check_decode.json" "$FX" profile-check "$R/train" \
        --lut "$R/lut_decode.json" --json "$R/profile_check_decode.json"
    log "chain done"
}

main; exit  # on one line: bash stops here even if the file was edited meanwhile
