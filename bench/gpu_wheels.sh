#!/usr/bin/env bash
# Fetch, here (where the package registries answer), the wheels that bench/gpu_check.sh installs on a lent
# GPU machine, which reaches no registry: what farcast's GPU check needs and that machine's image lacks
# (zarr and its own needs; torch, numpy, safetensors, pytest, hypothesis, transformers and the rest are
# there; Prefect is not needed: the check runs no flow). Into .whl/ (ignored by git; the device tool
# carries it: carry [".whl"]). Python 3.12, the image's, and 3.11, this machine's, for a dry run here.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pyv in 3.12 3.11; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl 'zarr>=3.1.6,<3.2' 'numcodecs<0.17' donfig google-crc32c
done
ls .whl
