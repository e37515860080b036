#!/usr/bin/env bash
# The main job on a small built-in default, on CPU, in a few minutes:
# synthetic TEMPO granules -> WebDataset shards -> 2-process DeepSpeed ZeRO-2 training
# (fp32 on CPU; GPU configs use bf16) -> TensorBoard logs in runs/demo/tb and a validation summary in physical units.
#
#   bash scripts/demo.sh            # then: tensorboard --logdir runs/demo/tb
#
# Re-running it continues the run in runs/demo (train.resume=latest): after an interrupted
# run it trains on from the last checkpoint; after a finished one it only validates and
# prints the summary again. For a new run: rm -rf runs/demo, or pass
# train.output_dir=runs/another.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DEMO_DATA:-data/demo}"
if [ ! -f "$DATA/shards/sizes.json" ]; then
    python -m data_prep.synthesize "$DATA/granules" --granules 16 --mirror-steps 48 \
        --xtrack 64 --channels 128 --seed 0
    python -m data_prep.make_shards "$DATA/granules" "$DATA/shards" --tile-size 16 \
        --max-samples-per-shard 24 --workers 2
    python -m data_prep.inspect_shards "$DATA/shards" --quiet
fi
export DS_ACCELERATOR=cpu
if [ -f runs/demo/checkpoints/latest ]; then
    echo "runs/demo has a checkpoint ($(cat runs/demo/checkpoints/latest)): continuing that run" \
        "(rm -rf runs/demo for a new one)"
fi
exec python -m train.launch --config_file accelerate_configs/cpu_deepspeed_zero2_fp32.yaml \
    train/main.py --config configs/training/demo.yaml data.shards="$DATA/shards" train.resume=latest "$@"
