#!/usr/bin/env bash
# The GPU check, in one go on a machine with a CUDA device (a few minutes): the tests that touch the
# fit (CUDA vs CPU agreement included), then the fit benchmark on the CPU and on the GPU side by side.
# Run from a checkout with the venv made by `make TORCH=torch test` (a CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_forecaster.py tests/test_fit_backtest.py
for device in cpu cuda; do
  "$PY" bench/fit_cost.py --no-big --device "$device"
done
