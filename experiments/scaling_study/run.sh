#!/usr/bin/env bash
# The CPU scaling study (docs/RESULTS.md, "Scaling at CPU scale"): SimCLR model x data, SimCLR resolution, MAE
# model x data; 38 trials. Every part is a resumable sweep: re-running this script continues where it stopped and
# skips finished trials. Extra arguments go to every `replab sweep` (e.g. --set sweep.max_concurrent=1).
#   nohup bash experiments/scaling_study/run.sh > scaling_study.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
for part in simclr resolution mae; do
  replab sweep "experiments/scaling_study/$part.yaml" "$@"
done
