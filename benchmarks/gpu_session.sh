#!/usr/bin/env bash
# Every GPU figure of issue 7 in one prepared run on a lent H200 (about 8 minutes; results are written
# as they are measured, so a run stopped by its time limit keeps what it finished).
#
#   here:    REPLAB_DATA_ROOT=../shared/datasets python benchmarks/gpu_carry.py
#   device:  run(command="bash benchmarks/gpu_session.sh", carry=[".gpucarry"], timeout_s=560)
#
# The device image has torch, torchvision, pyarrow, numpy, pillow, pyyaml, psutil and nvidia-ml-py but no
# Ray or MLflow: everything here goes through the plain training loop (replab.platform.train.loop), which never
# imports them. Order: the CIFAR-10 epoch target first, then the augmentation case, then MFU per model.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 REPLAB_DATA_ROOT="$PWD/.gpucarry/datasets"
OUT="${OUT:-/tmp/replab-gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  | tee -a "$OUT/machine.txt"
nproc | sed 's/^/cores /' | tee -a "$OUT/machine.txt"
timeout 200 python3 -m replab.cli bench --only epoch --out "$OUT/epoch.json" 2>&1 | tee "$OUT/epoch.log"
timeout 60 python3 -m replab.cli bench --quick --only augment --out "$OUT/augment.json" 2>&1 | tee "$OUT/augment.log"
timeout 300 python3 -m replab.cli bench --quick --only gpu --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
