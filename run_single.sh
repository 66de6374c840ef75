#!/usr/bin/env bash
# Fine-tune on one GPU (or on the CPU when there is none) with the RolePlayProj recipe's defaults.
#
#   ./run_single.sh                                   # no MODEL: builds and trains the tiny demo model
#   MODEL=/models/Baichuan2-7B-Chat TRAIN=data/train.jsonl TEST=data/test.jsonl ./run_single.sh
#   MODEL=... ./run_single.sh --num_train_epochs 1 --quantization none   # extra flags go to train.py
#
# Every setting (here and in run_common.sh) can be overridden by an environment variable of the same name;
# flags given on the command line come last and win. See docs/TRAINING.md for all flags.
set -euo pipefail
cd "$(dirname "$0")"

OUTPUT_DIR=${OUTPUT_DIR:-output-single}
source ./run_common.sh  # the recipe's defaults, PRECISION, recipe_train_args
recipe_train_args 6     # demo (no MODEL): save every 6 steps

# One process, no launcher: train.py sets up its own one-rank process group.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
exec "$PYTHON" train.py "${TRAIN_ARGS[@]}" "$@"
