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

PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-deepspeed}
NUM_GPUS=${NUM_GPUS:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}
INCLUDE=${INCLUDE:-}
OUTPUT_DIR=${OUTPUT_DIR:-output-multi}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
MAX_LEN=${MAX_LEN:-1560}
MAX_SRC_LEN=${MAX_SRC_LEN:-1024}
BATCH_SIZE=${BATCH_SIZE:-2}
GRAD_ACCUM=${GRAD_ACCUM:-4}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.1}
WARMUP_RATIO=${WARMUP_RATIO:-0.03}
SEED=${SEED:-1234}
LORA_DIM=${LORA_DIM:-16}
LORA_ALPHA=${LORA_ALPHA:-64}
LORA_DROPOUT=${LORA_DROPOUT:-0.1}
QUANTIZATION=${QUANTIZATION:-nf4}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PRECISION=${PRECISION:-bf16}
else
  # On the CPU, 4-bit matmuls in bf16 are several times slower than in fp32.
  PRECISION=${PRECISION:-fp32}
  # Each CPU rank would otherwise start one thread per core and the ranks would fight over them.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + NUM_GPUS - 1) / NUM_GPUS ))}
  # DeepSpeed's CPU accelerator counts NUMA nodes as devices; --include needs this many slots.
  export LOCAL_SIZE=${LOCAL_SIZE:-$NUM_GPUS}
fi

if [[ -z "${MODEL:-}" ]]; then
  # Demo: a tiny random Baichuan2 and the bundled role-play sample (a random model needs a much
  # larger learning rate than a pretrained one to show a falling loss within a few steps).
  DEMO_DIR="$OUTPUT_DIR/demo"
  MODEL="$DEMO_DIR/tiny_baichuan"
  [[ -f "$MODEL/config.json" ]] || "$PYTHON" -m models.tiny --out "$MODEL" --arch baichuan
  [[ -f "$DEMO_DIR/data/train.jsonl" ]] ||
    "$PYTHON" data_helper.py rolebench --data_dir data/demo_rolebench --out_dir "$DEMO_DIR/data"
  TRAIN=${TRAIN:-$DEMO_DIR/data/train.jsonl}
  TEST=${TEST:-$DEMO_DIR/data/test.jsonl}
  LR=${LR:-1e-2}
  SHOW_LOSS_STEP=${SHOW_LOSS_STEP:-1}
  SAVE_STEP=${SAVE_STEP:-4}
fi
: "${TRAIN:?set TRAIN to a conversation JSONL file (python data_helper.py ... converts public data sets)}"
TEST=${TEST:-}
LR=${LR:-1e-4}
EPOCHS=${EPOCHS:-3}
SHOW_LOSS_STEP=${SHOW_LOSS_STEP:-10}
SAVE_STEP=${SAVE_STEP:-100}

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

exec "${launch[@]}" train.py \
  --model_name_or_path "$MODEL" \
  --train_path "$TRAIN" \
  --test_path "$TEST" \
  --output_dir "$OUTPUT_DIR" \
  --ds_config "$DS_CONFIG" \
  --max_len "$MAX_LEN" \
  --max_src_len "$MAX_SRC_LEN" \
  --per_device_train_batch_size "$BATCH_SIZE" \
  --gradient_accumulation_steps "$GRAD_ACCUM" \
  --learning_rate "$LR" \
  --weight_decay "$WEIGHT_DECAY" \
  --num_train_epochs "$EPOCHS" \
  --warmup_ratio "$WARMUP_RATIO" \
  --seed "$SEED" \
  --show_loss_step "$SHOW_LOSS_STEP" \
  --save_model_step "$SAVE_STEP" \
  --lora_dim "$LORA_DIM" \
  --lora_alpha "$LORA_ALPHA" \
  --lora_dropout "$LORA_DROPOUT" \
  --precision "$PRECISION" \
  --quantization "$QUANTIZATION" \
  --gradient_checkpointing \
  "$@"
