#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (its image has torch and numpy, not soundfile or soxr)
# into .whl/ (ignored by git), for Python 3.12 on x86-64 Linux. Run here, with PyPI reachable.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    soundfile==0.13.1 cffi==2.0.0 pycparser==2.23 soxr==1.0.0
ls -la .whl
