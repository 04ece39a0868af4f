#!/usr/bin/env bash
# GPU training-step benchmark (torch + timm alone): run on a GPU machine from the repo root; results under $OUT (default benchmarks/results).
OUT=${OUT:-benchmarks/results}; mkdir -p "$OUT"
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, timm, torchvision; print(torch.__version__, timm.__version__, torchvision.__version__, torch.cuda.is_available())"
python benchmarks/train_throughput.py --no-ray --steps 60 --warmup 15 2>&1 | tail -8 | tee $OUT/effb0_bf16_cl.txt
python benchmarks/train_throughput.py --no-ray --steps 60 --warmup 15 --amp fp16 2>&1 | tail -3 | tee $OUT/effb0_fp16_cl.txt
python benchmarks/train_throughput.py --no-ray --steps 40 --warmup 10 --amp off --channels-last false 2>&1 | tail -3 | tee $OUT/effb0_fp32.txt
