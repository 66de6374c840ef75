"""TrainArgs: the one typed argument object of train.py, made of argument groups that other scripts reuse.

Every field has one help string and becomes one command-line flag of the same name (see
:mod:`sft.core`); ``python train.py --help`` shows one section per group below. The flag names of the
RolePlayProj recipe are kept (``--ds_file`` is an alias of ``--ds_config``) so its users can switch.
Arguments are checked once by :func:`sft.train.validate.validate_args`, which collects every problem and
raises them together, each naming the flag and the fix. This module is a leaf: plain dataclasses and the
vocabularies of their choices; the modules that use the settings take the groups they need.

Groups: :class:`ModelArgs`, :class:`AdapterArgs`, :class:`DataArgs` (also ``evaluate.py ppl`` and
``predict.py``), :class:`PreferenceArgs`, :class:`OptimArgs`, :class:`DistributedArgs`, :class:`OutputArgs`. The DeepSpeed
config (``--ds_config``) is completed from these flags by :func:`sft.train.ds_config.build_ds_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.core.flags import ArgumentParser, HelpFormatter, add_arguments, flag
from sft.data import LOSS_PLACEMENTS
from sft.modeling import PRECISIONS, QUANTIZATIONS

PEFT_METHODS = ("lora", "prompt_tuning", "p_tuning", "prefix_tuning")
LR_SCHEDULERS = ("cosine", "linear", "constant")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
PROMPT_LEARNING = ("prompt_tuning", "p_tuning", "prefix_tuning")
LORA_INITS = ("default", "gaussian", "pissa", "olora")
DEFAULT_DS_CONFIG = "ds_configs/zero2.json"
OBJECTIVES = ("sft", "dpo", "orpo", "simpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")
PREF_LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class ModelArgs:
    """Model: which base model, and how it is loaded and computed."""

    model_name_or_path: str = flag(
        "",
        "Local directory of the base model (config, weights, tokenizer). Required; hub ids are not downloaded.",
    )
    attn_implementation: str = flag(
        "auto",
        "Attention kernel of the base model: auto = sdpa where the model supports it, else eager (Gemma 2, "
        "whose attention soft-caps its logits); flash_attention_2 needs a GPU and the flash-attn package.",
        choices=ATTN_IMPLEMENTATIONS,
    )
    quantization: str = flag(
        "nf4",
        "Storage of the frozen base weights: nf4/fp4 (4-bit QLoRA), int8, or none.",
        choices=QUANTIZATIONS,
    )
    double_quant: bool = flag(
        True, "Quantise the 4-bit quantisation constants too (saves ~0.4 bit/param); 4-bit only."
    )
    precision: str = flag(
        "bf16",
        "Compute precision of the DeepSpeed engine and of the 4-bit matmuls; fp16 needs a GPU.",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = flag(
        False, "Recompute activations in the backward pass: much less memory, ~30% slower."
    )
    liger: bool = flag(
        False,
        "Experimental: Liger Kernel's Triton RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (CUDA GPU, "
        "pip install liger-kernel); Llama-family models and Baichuan2.",
    )
    torch_compile: bool = flag(
        False,
        "Experimental: torch.compile each decoder layer (first steps slower while it compiles); not with ZeRO-3.",
    )


@dataclass
class AdapterArgs:
    """Adapters: what is trained on top of the frozen base."""

    peft: str = flag("lora", "Which peft method to train.", choices=PEFT_METHODS)
    lora_dim: int = flag(16, "LoRA rank r.")
    lora_alpha: int = flag(64, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_dim.")
    lora_dropout: float = flag(0.1, "Dropout on the LoRA input.")
    lora_target: str = flag(
        "",
        "Comma-separated module names to wrap with LoRA. Default: every linear layer except the output head, "
        "discovered from the model (Baichuan2: W_pack,o_proj,gate_proj,up_proj,down_proj; "
        "Llama: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).",
    )
    num_virtual_tokens: int = flag(20, "Virtual tokens for --peft prompt_tuning / p_tuning / prefix_tuning.")
    use_dora: bool = flag(
        False,
        "DoRA: LoRA on the direction of each weight plus a trained magnitude vector per output row "
        "(peft use_dora; each forward also reads the whole base weight for its norm: slower steps).",
    )
    use_rslora: bool = flag(
        False, "rsLoRA: scale the update by lora_alpha / sqrt(lora_dim) instead of lora_alpha / lora_dim."
    )
    lora_init: str = flag(
        "default",
        "LoRA initialisation: default (B=0), gaussian (A ~ N(0, 1/r), B=0), pissa (principal singular "
        "components of W, subtracted from the base) or olora (QR of W, subtracted from the base); pissa and "
        "olora need --quantization none and are saved as plain LoRA relative to the original base.",
        choices=LORA_INITS,
    )
    pissa_niter: int = flag(
        16, "--lora_init pissa: iterations of the randomised SVD (peft pissa_niter_N); 0 = exact SVD (slow)."
    )

    @property
    def lora_target_modules(self) -> list[str]:
        """``--lora_target`` split into module names (empty list = discover from the model)."""
        return [name.strip() for name in self.lora_target.split(",") if name.strip()]


@dataclass
class DataArgs:
    """Data: files, chat template, lengths and batching of the examples."""

    train_path: str = flag("", "Training conversations (JSONL, see docs/DATA.md). Required.")
    test_path: str = flag(
        "", "Held-out conversations: perplexity at every save step and epoch end; empty = no evaluation."
    )
    template: str = flag(
        "",
        "Chat template: tokenizer (the model's own jinja template), baichuan2, llama2, llama3, alpaca or chatml; "
        "default: the tokenizer's own template when it has one, else by model type (docs/DATA.md).",
    )
    max_len: int = flag(1024, "Maximum tokens of one training example (prompt + answer).")
    max_src_len: int = flag(256, "Maximum tokens of the prompt part of an example.")
    is_skip: bool = flag(
        False, "Skip examples longer than --max_len / --max_src_len instead of truncating them."
    )
    loss_on: str = flag(
        "all",
        "Which assistant turns are learned: all, only the last, or each turn as its own example.",
        choices=LOSS_PLACEMENTS,
    )
    packing: bool = flag(
        False, "Pack several examples into each row of --max_len tokens (no cross-attention)."
    )
    group_by_length: bool = flag(False, "Batch examples of similar length together (less padding).")
    data_cache_dir: str = flag("", "Directory to cache tokenised data sets in; empty = no cache.")


@dataclass
class PreferenceArgs:
    """Objective: what is learned (docs/TRAINING.md, "Preference alignment")."""

    objective: str = flag(
        "sft",
        "sft: supervised fine-tuning on conversations; dpo / orpo / simpo: preference alignment on pairs of "
        "replies (--train_path and --test_path hold preference records, docs/DATA.md).",
        choices=OBJECTIVES,
    )
    pref_loss: str = flag(
        "sigmoid",
        "--objective dpo: sigmoid (DPO), ipo (on per-token mean log-probs, as TRL) or hinge (SLiC).",
        choices=PREF_LOSSES,
    )
    pref_beta: float = flag(
        0.1,
        "Preference objectives: beta, the strength of the preference term (DPO's KL weight; SimPO's reward "
        "scale, which wants ~2; ORPO's odds-ratio weight).",
    )
    label_smoothing: float = flag(
        0.0,
        "--objective dpo --pref_loss sigmoid: the assumed share of flipped labels (conservative DPO), < 0.5.",
    )
    pref_ftx: float = flag(
        0.0,
        "DPO / SimPO: weight of the chosen reply's NLL (per-token mean) added to each pair's loss; 0 = off.",
    )
    simpo_gamma: float = flag(0.5, "--objective simpo: the target reward margin gamma.")
    precompute_ref: bool = flag(
        False,
        "--objective dpo: compute the reference log-probs of every pair in one pass before training and store "
        "them with the run (resume reuses them): no reference forward in the steps.",
    )
    init_adapter: str = flag(
        "",
        "Start from this adapter checkpoint (e.g. an SFT run's epoch-E-step-S) instead of a fresh LoRA; its "
        "LoRA settings are used. With --objective dpo it is also the reference, frozen (log-probs computed "
        "once before training).",
    )


@dataclass
class OptimArgs:
    """Optimisation: batch sizes, learning rate and schedule, length of the run."""

    per_device_train_batch_size: int = flag(2, "Micro-batch size per process.")
    per_device_eval_batch_size: int = flag(4, "Batch size per process for evaluation.")
    gradient_accumulation_steps: int = flag(4, "Micro-batches accumulated into one optimizer step.")
    learning_rate: float = flag(1e-4, "Peak learning rate of the AdamW optimizer.")
    weight_decay: float = flag(0.1, "AdamW weight decay.")
    max_grad_norm: float = flag(
        1.0, "Clip the global gradient norm to this value (DeepSpeed gradient_clipping); 0 = off."
    )
    num_train_epochs: int = flag(1, "Passes over the training data.")
    max_steps: int = flag(
        -1, "Stop after this many optimizer steps (overrides --num_train_epochs); -1 = off."
    )
    warmup_ratio: float = flag(
        0.03, "Fraction of the optimizer steps spent warming the learning rate up from 0."
    )
    lr_scheduler: str = flag("cosine", "Learning-rate schedule after warm-up.", choices=LR_SCHEDULERS)
    loraplus_lr_ratio: float = flag(
        0.0,
        "LoRA+: train the LoRA B matrices at --learning_rate times this ratio (the paper suggests 16); "
        "0 = off.",
    )
    neftune_alpha: float = flag(
        0.0,
        "NEFTune: add uniform noise scaled by alpha / sqrt(seq_len * hidden) to the input embeddings "
        "while training (the paper uses 5-15); 0 = off.",
    )
    seed: int = flag(1234, "Random seed (data order, adapter initialisation, dropout).")
    max_bad_steps: int = flag(
        10,
        "Stop after this many optimizer steps in a row with a non-finite loss or gradient norm (each one's "
        "update is skipped on every rank); 0 = never stop.",
    )


@dataclass
class DistributedArgs:
    """DeepSpeed and distributed training."""

    ds_config: str = flag(
        DEFAULT_DS_CONFIG,
        'DeepSpeed JSON config: a path, or a bundled ds_configs/*.json from any directory; its "auto" values '
        "are filled from these flags.",
        aliases=("--ds_file",),
    )
    local_rank: int = flag(
        -1,
        "Set by the deepspeed launcher; the rank of this process on its node.",
        aliases=("--local-rank",),  # torch.distributed.launch spells it with a dash
    )


@dataclass
class OutputArgs:
    """Output, logging and checkpoints."""

    output_dir: str = flag("output", "Directory for checkpoints epoch-E-step-S/ and TensorBoard runs/.")
    show_loss_step: int = flag(10, "Log loss, learning rate and throughput every N optimizer steps.")
    save_model_step: int = flag(
        100,
        "Evaluate and save a checkpoint every N optimizer steps (also at the end of each epoch); 0 = epoch ends only.",
    )
    save_total_limit: int = flag(
        0, "Keep only the newest N checkpoints (plus the best by perplexity); 0 = keep all."
    )
    resume_from_checkpoint: str = flag(
        "",
        "Continue a run from a checkpoint directory, or 'latest' for the newest complete one in --output_dir "
        "(a fresh start when there is none yet).",
    )
    tensorboard_dir: str = flag("", "TensorBoard log directory; default: <output_dir>/runs.")

    @property
    def tensorboard_path(self) -> Path:
        """Where TensorBoard event files go."""
        return Path(self.tensorboard_dir) if self.tensorboard_dir else Path(self.output_dir) / "runs"


@dataclass
class TrainArgs(OutputArgs, DistributedArgs, OptimArgs, PreferenceArgs, DataArgs, AdapterArgs, ModelArgs):
    """Every setting of a training run (the groups above, flattened). See docs/TRAINING.md."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (saved as train_args.json next to each checkpoint)."""
        return dataclasses.asdict(self)


def build_parser() -> Any:
    """argparse parser generated from :class:`TrainArgs`: one flag per field, one section per group."""

    parser = ArgumentParser(
        description="QLoRA/LoRA supervised fine-tuning under DeepSpeed (see docs/TRAINING.md).",
        formatter_class=HelpFormatter,
    )
    return add_arguments(parser, TrainArgs)


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """Parse the command line into a :class:`TrainArgs` (not yet validated)."""
    return TrainArgs(**vars(build_parser().parse_args(argv)))


if __name__ == "__main__":
    # python -m sft.train.args --update-docs: rewrite the flag tables of docs/TRAINING.md from the help texts above.
    import sys

    from sft.core.flags import flag_table, replace_generated

    if sys.argv[1:] != ["--update-docs"]:
        sys.exit("usage: python -m sft.train.args --update-docs")
    replace_generated(
        Path(__file__).resolve().parents[2] / "docs" / "TRAINING.md", "train-flags", flag_table(TrainArgs)
    )
