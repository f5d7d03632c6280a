#!/usr/bin/env bash
# The RoPAWS study (benchmarks/ropaws_study.py) at a GPU budget: ResNet-18 width 1, a 20,000-image pool,
# SimCLR 100 epochs then PAWS / RoPAWS 50 epochs from it, the official CIFAR-10 support and multi-crop sizes
# (64 images per class x 2 views, 6 multi-crops), batch 256, bf16; 3 seeds x 5 pools x 2 label budgets.
# Not run yet (no GPU lent so far). Resumes from --out when re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
export REPLAB_DATA_ROOT="${REPLAB_DATA_ROOT:-/work/shared/datasets}"
PYTHONPATH="$PWD" python benchmarks/ropaws_study.py \
  --device cuda --precision bf16 --width 1.0 --pool 20000 --pretrain-epochs 100 --epochs 50 \
  --warmup-epochs 5 --batch-size 256 --support-per-class 64 --local-crops 6 --test-limit 10000 \
  --seeds 0,1,2 --labels 25,100 --pools r00,r25,r50,r75,tin50 \
  --out "${OUT:-docs/ropaws_study_gpu.json}" --plot "${PLOT:-docs/ropaws_study_gpu.png}" "$@"
