#!/usr/bin/env bash
# Rehearse a whole training leg on this CPU machine with the tiny preset: the same scripts and
# the same sequence of calls as scripts/gpu/README.md, a local folder standing in for the device.
#
#   bash scripts/gpu/rehearse.sh CORPUS_DIR [WORK_DIR]
#
# It copies the working tree as the device tool would (tracked and untracked-not-ignored files
# plus the carried .carry parts), then runs setup -> unpack -> start -> poll -> join -> evaluate.
set -euo pipefail
set -m  # job control on, as the device tool runs commands: background jobs lead their own group
corpus=${1:?usage: rehearse.sh CORPUS_DIR [WORK_DIR]}
work=${2:-/tmp/m2l2-rehearsal}
root=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$work" && mkdir -p "$work/device" "$work/back"
corpus=$(cd "$corpus" && pwd)
(cd "$root" && python3 -m music2latent2.training.corpus pack "$corpus" --out "$work/carry" --part-mib "${PART_MIB:-8}")
nparts=$(ls -d "$work"/carry/p* | wc -l)

# "device" working tree: what a call sends (git ls-files -co --exclude-standard), plus carried parts.
(cd "$root" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/device")
cp -r "$work/carry" "$work/device/.carry"
cd "$work/device"
export LEG_DIR=$work/leg CORPUS_DIR=$work/corpus LEG_PRESET=tiny LEG_MINUTES=${LEG_MINUTES:-1.5} LEG_BATCH=4 \
    LEG_WORKERS=1 LEG_SNAPSHOT_MINUTES=0.4 LEG_START_WAIT=5 OMP_NUM_THREADS=2

echo "== call 1: setup + part 1"
OUT=$work/out1 bash scripts/gpu/leg.sh setup .carry/p1
echo "== call 2: the other parts ($nparts in all), then start"
others=$(seq 2 "$nparts" | sed 's|^|.carry/p|')
[ -n "$others" ] && OUT=$work/out2 bash scripts/gpu/leg.sh unpack $others
OUT=$work/out2 bash scripts/gpu/leg.sh start --reserve-minutes 0.1 --calibrate-steps 10 --log-every 10
echo "== call 3: poll mid-run"
OUT=$work/out3 bash scripts/gpu/leg.sh poll 40
echo "== call 4: poll to the end"
OUT=$work/out4 bash scripts/gpu/leg.sh poll 600
ls -la "$work/out4"
n=$(ls "$work/out4" | wc -l)
[ "$n" -le 8 ] || { echo "too many files for one call ($n > 8)"; exit 1; }

echo "== here: join the pieces and evaluate"
cd "$root"
python3 -m music2latent2.training join "$work/out4" --out "$work/back/model.safetensors"
python3 -m music2latent2.evaluate --model "$work/back/model.safetensors" --data "$root/examples" \
    --out "$work/back/eval" --max-seconds 2 --no-visqol
echo "rehearsal ok: $work/back/model.safetensors"
