#!/usr/bin/env bash
# Rehearse two whole legs on this CPU: the calls `leg.sh plan` prints, run as the device tool runs
# them (job control on, a copy of the travelling tree, carried paths, $OUT checked against what a
# call returns). See rehearse.py.
#
#   bash scripts/gpu/rehearse.sh [WORK_DIR] [CORPUS_DIR]
set -euo pipefail
set -m
exec "${LEG_PYTHON:-python3}" "$(dirname "$0")/rehearse.py" "$@"
