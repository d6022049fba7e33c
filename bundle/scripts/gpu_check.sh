#!/usr/bin/env bash
# The GPU check, on a machine with CUDA, from the repository root:
#     bash bundle/scripts/gpu_check.sh
# Installs the pure-Python packages the machine lacks from .whl/ when present (wheels downloaded beforehand with
# `pip download --no-deps -d .whl ...` on a machine with a package index), runs the tests marked `gpu`, then trains sam_med3d_small at
# 128^3 for about three minutes and prints steps/s and peak GPU memory.
set -euo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
python3 bundle/scripts/gpu_training_check.py --network_name sam_med3d_small --seconds 180
