#!/usr/bin/env bash
# Device side of one training leg: every step a relay session runs through the device tool.
# Run from the repository root; see scripts/gpu/README.md for the sequence of calls.
#
#   bash scripts/gpu/leg.sh setup [PART...]    install carried wheels, verify + unpack corpus parts
#   bash scripts/gpu/leg.sh unpack PART...     verify + unpack more parts
#   bash scripts/gpu/leg.sh bench SECONDS      GPU throughput numbers (benchmarks/bench.py) into $OUT
#   bash scripts/gpu/leg.sh start [TRAIN ARGS] start training detached (setsid nohup)
#   bash scripts/gpu/leg.sh poll SECONDS       wait up to SECONDS (less if training ends), then put
#                                              the newest snapshot's pieces and the logs into $OUT
#
# Environment: LEG_DIR (default /tmp/leg), CORPUS_DIR (/tmp/corpus), OUT (set by the device
# tool), LEG_PYTHON (python3), LEG_PRESET (small), LEG_MINUTES (19), LEG_BATCH (32),
# LEG_WORKERS (12), LEG_INIT (checkpoint to start from; empty: fresh), LEG_START_STEP (0).
set -euo pipefail
LEG=${LEG_DIR:-/tmp/leg}
CORPUS=${CORPUS_DIR:-/tmp/corpus}
OUT=${OUT:-$LEG/out}
SITE=$LEG/site
PY=${LEG_PYTHON:-python3}
mkdir -p "$LEG" "$OUT"
export PYTHONPATH="$SITE:$LEG/code${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cmd=${1:?usage: leg.sh setup|unpack|bench|start|poll ...}
shift

unpack() {
    for part in "$@"; do
        "$PY" -m music2latent2.training.corpus unpack "$part" --into "$CORPUS"
    done
}

case $cmd in
setup)
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    fi
    # A private copy of the code: the working tree is re-sent by every call, the run must not see it move.
    rm -rf "$LEG/code" && mkdir -p "$LEG/code" && cp -r music2latent2 benchmarks "$LEG/code/"
    "$PY" -c "import soundfile, soxr, torch; print('soundfile', soundfile.__version__, 'soxr', soxr.__version__,
'torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
    unpack "$@"
    ;;
unpack)
    unpack "$@"
    ;;
bench)
    seconds=${1:-150}
    timeout "$seconds" "$PY" "$LEG/code/benchmarks/bench.py" --devices cuda --no-v1 --presets small paper \
        --long-seconds 60 --short-count 32 --short-seconds 10 --memory-presets --max-batch-size 32 \
        --modes autoregressive parallel --out "$OUT/BENCH_GPU.md" 2>&1 | tee "$OUT/bench_log.txt" \
        || echo "bench stopped (status $?)"
    ;;
start)
    data=()
    for spec in music:0.6 midi:0.15 speech:0.15 real:0.1; do
        [ -d "$CORPUS/${spec%%:*}" ] && data+=("$CORPUS/$spec")
    done
    [ ${#data[@]} -gt 0 ] || { echo "no corpus under $CORPUS"; exit 1; }
    init=()
    [ -n "${LEG_INIT:-}" ] && init=(--init-from "$LEG_INIT" --start-step "${LEG_START_STEP:-0}")
    rm -rf "$LEG/run"
    (cd "$LEG" && setsid nohup "$PY" -m music2latent2.training train --data "${data[@]}" "${init[@]}" \
        --preset "${LEG_PRESET:-small}" --batch-size "${LEG_BATCH:-32}" --lr 2e-4 --warmup 500 --ema 0.999 \
        --delta-start 1 --delta-end 0.01 --latent-penalty 1 --max-minutes "${LEG_MINUTES:-19}" \
        --snapshot-minutes "${LEG_SNAPSHOT_MINUTES:-4}" --save-every 100000000 --eval-every 100000000 \
        --log-every 100 --workers "${LEG_WORKERS:-12}" --cache-gb 40 "$@" --out "$LEG/run" \
        >"$LEG/train.log" 2>&1 </dev/null &)
    # Not $!: the device tool runs commands with job control on, so the background job leads its
    # own process group and setsid forks; $! would be the setsid that exits at once.
    sleep 2
    pgrep -n -f "music2latent2.training train" >"$LEG/pid"
    sleep "${LEG_START_WAIT:-45}"
    tail -n 20 "$LEG/train.log"
    ;;
poll)
    limit=${1:-540}
    start=$SECONDS
    while kill -0 "$(cat "$LEG/pid")" 2>/dev/null && [ $((SECONDS - start)) -lt "$limit" ]; do
        sleep 5
    done
    if kill -0 "$(cat "$LEG/pid")" 2>/dev/null; then echo "training: running"; else echo "training: ended"; fi
    snap="$LEG/run/snapshots"
    if [ -f "$snap/LATEST" ]; then
        cp "$snap/$(cat "$snap/LATEST")"/* "$OUT/"
        echo "snapshot: $(cat "$snap/LATEST")"
    fi
    [ -f "$LEG/run/log.jsonl" ] && cp "$LEG/run/log.jsonl" "$OUT/"
    tail -n 400 "$LEG/train.log" >"$OUT/train_tail.txt"
    tail -n 12 "$LEG/train.log"
    ;;
*)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
