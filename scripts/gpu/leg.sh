#!/usr/bin/env bash
# Every step of a 15-minute training leg, here and on the device: see leg.py and README.md.
#
#   here:   bash scripts/gpu/leg.sh plan | park | unpark | keep FILES_AT --into runs/legN
#   device: bash scripts/gpu/leg.sh setup PART... | unpack PART... | start PART... [-- FLAGS] | poll
set -euo pipefail
exec "${LEG_PYTHON:-python3}" "$(dirname "$0")/leg.py" "$@"
