#!/usr/bin/env bash
# The GPU suite in one command, for one H100/H200 machine without network (benchmarks/gpu_suite.py says what it runs).
#
#   bash benchmarks/gpu_wheels.sh            # where pip works: wheels into .whl/, the VQA-RAD subset into .gpu_data/
#   bash benchmarks/gpu_suite.sh             # on the GPU machine (carry .whl and .gpu_data): at most 8 minutes
#   bash benchmarks/gpu_suite.sh --cpu-smoke # the same suite at tiny shapes on a CPU (tests/test_gpu_suite.py)
#
# The machine needs torch (CUDA), transformers, peft and accelerate; the rest (bitsandbytes, pydantic, ...) comes
# from the carried .whl/ folder, installed into /tmp/site without network. Extra arguments go to gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1 && [[ " $* " != *" --cpu-smoke "* ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [[ " $* " == *" --cpu-smoke "* ]]; then
  exec "$PY" benchmarks/gpu_suite.py "$@"        # a shared CPU takes what it takes: no time budget
fi
exec timeout 570 "$PY" benchmarks/gpu_suite.py "$@"   # the 8-minute promise (rows stop at 480 s, the job at 540 s)
