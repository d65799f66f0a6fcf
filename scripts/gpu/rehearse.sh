#!/usr/bin/env bash
# Rehearse four legs on this CPU: the calls `leg.sh plan` prints, run as the device tool runs
# them (job control on, a copy of the travelling tree, carried paths, $OUT checked against what a
# call returns), a missed gap and a slow compile among them. See rehearse.py.
#
#   bash scripts/gpu/rehearse.sh [--device-python PYTHON] [--work DIR]
set -euo pipefail
set -m
exec "${LEG_PYTHON_HERE:-python3}" "$(dirname "$0")/rehearse.py" "$@"
