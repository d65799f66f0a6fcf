#!/usr/bin/env bash
# Download the wheels of wheels.txt for the GPU machine (Python 3.12, x86-64 Linux) into .whl/
# (ignored by git), replacing what was there only once all of them have arrived: the device
# installs every wheel in .whl/, and two versions of one package stop the whole install.
#
#   bash scripts/gpu/fetch_wheels.sh [PYTHON_VERSION] [DEST]     (defaults: 3.12 .whl)
set -euo pipefail
cd "$(dirname "$0")/../.."
version="${1:-3.12}"
dest="${2:-.whl}"
tmp="$(mktemp -d "${dest%/}.partial.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
platforms=()
for n in 39 35 34 31 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
grep -v '^#' "$(dirname "$0")/wheels.txt" | grep -v '^$' | xargs python3 -m pip download --quiet --no-deps \
    --only-binary=:all: --python-version "$version" --implementation cp "${platforms[@]}" \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp"
rm -rf "$dest.old"
if [ -e "$dest" ]; then mv "$dest" "$dest.old"; fi
mv "$tmp" "$dest"
rm -rf "$dest.old"
trap - EXIT
ls -la "$dest"
