#!/usr/bin/env bash
# Fine-tune on several GPUs, on one machine or several, with the RolePlayProj recipe's defaults.
#
#   ./run_multi.sh                                         # no MODEL: the tiny demo model on 2 ranks
#   MODEL=/models/Baichuan2-7B-Chat TRAIN=data/train.jsonl TEST=data/test.jsonl NUM_GPUS=4 ./run_multi.sh
#   INCLUDE=localhost:0,1 MODEL=... ./run_multi.sh          # pick GPUs (deepspeed --include)
#   LAUNCHER=torchrun NUM_GPUS=2 MODEL=... ./run_multi.sh   # torchrun instead of the deepspeed launcher
#
# Several machines (same command on every machine, shared or identical paths):
#   deepspeed launcher (passwordless ssh from the first machine; a hostfile lists "host slots=N" lines):
#     HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 MODEL=... ./run_multi.sh        # run on the first machine only
#   torchrun (no ssh; start it on every machine with its own NODE_RANK):
#     LAUNCHER=torchrun NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NUM_GPUS=8 MODEL=... ./run_multi.sh
#     LAUNCHER=torchrun NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NUM_GPUS=8 MODEL=... ./run_multi.sh
#
# Without a GPU the ranks run on the CPU (DeepSpeed's CPU accelerator, gloo). Every setting can be
# overridden by an environment variable of the same name; extra flags go to train.py and win.
set -euo pipefail
cd "$(dirname "$0")"

LAUNCHER=${LAUNCHER:-deepspeed}
NUM_GPUS=${NUM_GPUS:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}
INCLUDE=${INCLUDE:-}
OUTPUT_DIR=${OUTPUT_DIR:-output-multi}
source ./run_common.sh  # the recipe's defaults, PRECISION, HAS_GPU, recipe_train_args
if [[ "$HAS_GPU" == 0 ]]; then
  # Each CPU rank would otherwise start one thread per core and the ranks would fight over them.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + NUM_GPUS - 1) / NUM_GPUS ))}
  # DeepSpeed's CPU accelerator counts NUMA nodes as devices; --include needs this many slots.
  export LOCAL_SIZE=${LOCAL_SIZE:-$NUM_GPUS}
fi
recipe_train_args 4     # demo (no MODEL): save every 4 steps

case "$LAUNCHER" in
  deepspeed)
    launch=(deepspeed --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    if [[ -n "$HOSTFILE" ]]; then
      launch+=(--hostfile "$HOSTFILE")
    elif [[ -n "$INCLUDE" ]]; then
      launch+=(--include "$INCLUDE")
    else
      launch+=(--num_gpus "$NUM_GPUS")
    fi
    ;;
  torchrun)
    launch=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    ;;
  *)
    echo "LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2
    exit 2
    ;;
esac

exec "${launch[@]}" train.py "${TRAIN_ARGS[@]}" "$@"
