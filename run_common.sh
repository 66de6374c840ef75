# Sourced by run_single.sh and run_multi.sh (not run on its own), so that both train with the same
# RolePlayProj recipe: its defaults, the demo mode and the train.py argument list. Every setting can be
# overridden by an environment variable of the same name. The caller sets OUTPUT_DIR first.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "run_common.sh is sourced by run_single.sh and run_multi.sh: run one of those" >&2
  exit 2
fi

PYTHON=${PYTHON:-python}
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
  HAS_GPU=1
  PRECISION=${PRECISION:-bf16}
else
  HAS_GPU=0
  PRECISION=${PRECISION:-fp32}  # on the CPU, 4-bit matmuls in bf16 are several times slower than in fp32
fi

# recipe_train_args DEMO_SAVE_STEP: the model and data (the demo's when MODEL is unset), then the
# train.py flags of the recipe in the array TRAIN_ARGS.
recipe_train_args() {
  local demo_save_step=$1
  if [[ -z "${MODEL:-}" ]]; then
    # Demo: a tiny random Baichuan2 and the bundled role-play sample. A random model needs a much
    # larger learning rate than a pretrained one to show a falling loss within a few steps.
    DEMO_DIR="$OUTPUT_DIR/demo"
    MODEL="$DEMO_DIR/tiny_baichuan"
    [[ -f "$MODEL/config.json" ]] || "$PYTHON" -m models.tiny --out "$MODEL" --arch baichuan
    [[ -f "$DEMO_DIR/data/train.jsonl" ]] ||
      "$PYTHON" data_helper.py rolebench --data_dir data/demo_rolebench --out_dir "$DEMO_DIR/data"
    TRAIN=${TRAIN:-$DEMO_DIR/data/train.jsonl}
    TEST=${TEST:-$DEMO_DIR/data/test.jsonl}
    LR=${LR:-1e-2}
    SHOW_LOSS_STEP=${SHOW_LOSS_STEP:-1}
    SAVE_STEP=${SAVE_STEP:-$demo_save_step}
  fi
  : "${TRAIN:?set TRAIN to a conversation JSONL file (python data_helper.py ... converts public data sets)}"
  TEST=${TEST:-}
  LR=${LR:-1e-4}
  EPOCHS=${EPOCHS:-3}
  SHOW_LOSS_STEP=${SHOW_LOSS_STEP:-10}
  SAVE_STEP=${SAVE_STEP:-100}

  TRAIN_ARGS=(
    --model_name_or_path "$MODEL"
    --train_path "$TRAIN"
    --test_path "$TEST"
    --output_dir "$OUTPUT_DIR"
    --ds_config "$DS_CONFIG"
    --max_len "$MAX_LEN"
    --max_src_len "$MAX_SRC_LEN"
    --per_device_train_batch_size "$BATCH_SIZE"
    --gradient_accumulation_steps "$GRAD_ACCUM"
    --learning_rate "$LR"
    --weight_decay "$WEIGHT_DECAY"
    --num_train_epochs "$EPOCHS"
    --warmup_ratio "$WARMUP_RATIO"
    --seed "$SEED"
    --show_loss_step "$SHOW_LOSS_STEP"
    --save_model_step "$SAVE_STEP"
    --lora_dim "$LORA_DIM"
    --lora_alpha "$LORA_ALPHA"
    --lora_dropout "$LORA_DROPOUT"
    --precision "$PRECISION"
    --quantization "$QUANTIZATION"
    --gradient_checkpointing
  )
}
