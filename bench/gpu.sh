#!/usr/bin/env bash
# The GPU checks in one go (issues 5 and 9): embedding and fine-tune throughput against plain torch loops,
# and the fine-tune depth table with GPU-length training. Each bench has its own time limit, so one that
# hangs does not cost the others. Writes RESULTS_DIR/log.txt and each bench's .json and .md.
# Usage: bench/gpu.sh RESULTS_DIR [PYTHON] [BENCH ...]   (BENCH: embed, finetune-speed, finetune-depth,
# finetune-depth-bn, finetune-depth-bn-lr; default all)
set -u
out=${1:?results dir}
py=${2:-.venv/bin/python}
mkdir -p "$out"
log="$out/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
"$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$log"
only=" ${*:3} "
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  local t=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t)) s" | tee -a "$log"
}
run embed 150 "$py" bench/embed.py --device cuda --n 8192 --size 224 --batch-size 256 --chunk 2048 \
  --models resnet50,efficientnet_lite0 --out "$out/embed-cuda"
run finetune-speed 150 "$py" bench/finetune_speed.py --device cuda --model resnet50 --n 4096 --val 256 \
  --epochs 2 --repeats 2 --batch-size 128 --out "$out/finetune-speed-cuda"
run finetune-depth 200 "$py" bench/finetune.py --device cuda --threads 8 --epochs 12 --head-epochs 2 \
  --sizes 10,50,500 --out "$out/finetune-cuda"
# 500 labels/class, where the table above has the fine-tunes lose to the probe: BatchNorm statistics
# re-estimated on the new domain, then also a 3x higher learning rate
run finetune-depth-bn 90 "$py" bench/finetune.py --device cuda --threads 8 --epochs 12 --head-epochs 2 \
  --sizes 500 --adapt-batchnorm --out "$out/finetune-cuda-500-bn"
run finetune-depth-bn-lr 90 "$py" bench/finetune.py --device cuda --threads 8 --epochs 12 --head-epochs 2 \
  --sizes 500 --adapt-batchnorm --head-lr 3e-3 --out "$out/finetune-cuda-500-bn-lr3"
