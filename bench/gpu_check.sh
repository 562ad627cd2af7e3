#!/usr/bin/env bash
# The GPU check, in one go on a machine with a CUDA device (a few minutes): the tests that touch the
# fit (CUDA vs CPU agreement included), then the fit benchmark on the CPU and on the GPU side by side.
#
# Where it runs: a checkout with the venv made by `make TORCH=torch test` (a CUDA build of torch), or,
# without .venv, the machine's own python3 (a lent GPU machine's holds a CUDA torch and most of what
# the check needs). A machine that reaches no package registry installs what its python lacks from
# .whl/, fetched beforehand by bench/gpu_wheels.sh on a machine that does, plus farcast itself
# (editable, no dependencies). On the device tool: carry [".whl"], command `bench/gpu_check.sh`.
#
# GPU_CHECK_DRY=1 runs everything but the CUDA half on a machine without one (to try the set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ] && [ -z "${GPU_CHECK_LOGGED:-}" ]; then  # the device tool's $OUT: the whole log comes back
  GPU_CHECK_LOGGED=1 "$0" "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ] && ! "$PY" -c "import zarr, farcast.pipelines.fit" 2>/dev/null; then
  # every package bench/gpu_wheels.sh fetched, by name: pip takes the wheel that fits this python
  "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links .whl $(ls .whl | sed 's/-.*//' | sort -u)
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
devices="cpu cuda"
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  devices=cpu
else
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
fi
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_forecaster.py tests/test_fit_backtest.py
for device in $devices; do
  "$PY" bench/fit_cost.py --no-big --device "$device"
done
