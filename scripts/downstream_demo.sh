#!/usr/bin/env bash
# The whole loop on a CPU machine, nothing downloaded: pretrain a tiny ConvMAE on the embedded
# digits (about 7 minutes on 2 cores), evaluate it against its own random initialisation,
# fine-tune it and (as the baseline) the random initialisation, and render reconstructions.
# Everything it writes (data, checkpoints, the MLflow store mlruns.db) goes under $WORK.
#
#   bash scripts/downstream_demo.sh            # then: mlflow ui --backend-store-uri sqlite:///convmae_demo/mlruns.db
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-convmae_demo}"
mkdir -p "$WORK" && cd "$WORK"
PY="${PYTHON:-python3}"

# 1. Pretrain convmae_tiny at 64x64 (4x4 tokens: at 32x32 a 75% mask leaves one visible token)
#    for 60 epochs; registered as models:/convmae_tiny-64px-digits/N.
"$PY" "$ROOT/jobs/pretrain.py" --config "$ROOT/jobs/configs/tiny_cpu.yaml" --run_name demo-pretrain \
  --model.img_size 64 --train.epochs 60 --train.blr 6e-3 --train.warmup_epochs 2 \
  --train.val_every_epochs 10 --mlflow.recon_every_epochs 20 --checkpoint.every_steps 500

# 2. k-NN / linear probe / reconstruction loss: the pretrained encoder, then the very weights
#    it started from (random:PRESET:IMG_SIZE with the pretraining seed 0).
"$PY" "$ROOT/jobs/evaluate.py" --model models:/convmae_tiny-64px-digits/latest
"$PY" "$ROOT/jobs/evaluate.py" --model random:convmae_tiny:64

# 3. Fine-tune both the same way (10 epochs); the pretrained one is registered as a classifier.
"$PY" "$ROOT/jobs/finetune.py" --config "$ROOT/jobs/configs/finetune_tiny_cpu.yaml" \
  --model models:/convmae_tiny-64px-digits/latest --run_name demo-finetune
"$PY" "$ROOT/jobs/finetune.py" --config "$ROOT/jobs/configs/finetune_tiny_cpu.yaml" \
  --model random:convmae_tiny:64 --run_name demo-finetune-scratch --mlflow.register false

# 4. Reconstructions of 8 validation digits.
"$PY" "$ROOT/jobs/reconstruct.py" --model models:/convmae_tiny-64px-digits/latest --images 8 --out reconstructions.png
