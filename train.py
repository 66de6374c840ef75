"""QLoRA/LoRA supervised fine-tuning under DeepSpeed: a hand-written loop that reads top to bottom.

    python train.py --model_name_or_path DIR --train_path train.jsonl --test_path test.jsonl
    deepspeed --num_gpus 2 train.py --ds_config ds_configs/zero2.json ...
    torchrun --nproc_per_node 2 train.py ...

main() runs the steps in order: parse and validate the arguments, set up the process group, the
tokenizer, the data, the model, the DeepSpeed engine, resume if asked, the training loop (with
evaluation and checkpoints at save steps and epoch ends), the final save. See docs/TRAINING.md.

Who owns what: DeepSpeed owns precision, gradient accumulation, clipping and the optimizer step
(sft.train.ds_config fills its config from the flags); sft.core.distributed owns rank logic; sft.train.objectives.sft the loss;
sft.train.evaluation perplexity; sft.checkpoint the checkpoint directory (saving and resuming);
sft.train.metrics the TensorBoard window; sft.train.stopping SIGTERM/Ctrl-C and the non-finite guard.

Exact resume: the global RNG that dropout draws from is advanced by training forwards only; creating a
DataLoader iterator and evaluating run on a forked RNG. So the RNG state saved with a checkpoint is the one
the next step starts from, whether the checkpoint was evaluated or not, mid-epoch or at an epoch end.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import register_models
from sft.checkpoint.adapters import check_adapter_fits_base, read_adapter
from sft.checkpoint.layout import CheckpointError, checkpoint_step, list_checkpoints
from sft.checkpoint.resume import check_resume_args, check_resume_base
from sft.checkpoint.runs import best_checkpoint, resolve_resume_dir, rotate_checkpoints
from sft.checkpoint.save import load_checkpoint, save_checkpoint
from sft.checkpoint.space import check_free_space, directory_bytes, estimated_checkpoint_bytes
from sft.checkpoint.state import TrainProgress, restore_rng_state
from sft.core.distributed import (
    all_reduce_min,
    all_reduce_sum,
    broadcast_object,
    check_cuda_request,
    destroy,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from sft.core.runner import run_entry_point, set_seed, setup_logging
from sft.data.formats import DataFormatError
from sft.modeling.loading import load_tokenizer
from sft.train.args import PREFERENCE_OBJECTIVES, TrainArgs, parse_args
from sft.train.attention import shares_prompts
from sft.train.ds_config import build_ds_config, zero_stage
from sft.train.evaluation import evaluate
from sft.train.lora_variants import optimizer_param_groups
from sft.train.metrics import Metrics
from sft.train.model import load_model_for_training
from sft.train.objectives import Objective, build_objective
from sft.train.reference import attach_reference_logps, needs_precomputed_reference
from sft.train.stopping import GracefulStop, NonFiniteGuard, TrainingDiverged, TrainingStopped
from sft.train.validate import validate_args

logger = logging.getLogger("train")
RESUME_HINT = "run the same command with --resume_from_checkpoint latest to continue from the newest complete checkpoint"


# --------------------------------------------------------------------------------------------------
# 1. arguments
# --------------------------------------------------------------------------------------------------
def setup_args(argv: list[str] | None) -> TrainArgs:
    """Parse and validate every flag before any work (all problems reported together)."""
    args = parse_args(argv)
    if args.local_rank >= 0:
        # The deepspeed launcher passes --local_rank and also sets LOCAL_RANK; older launchers only the flag.
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    validate_args(args)
    return args


# --------------------------------------------------------------------------------------------------
# 2. data
# --------------------------------------------------------------------------------------------------
@dataclass
class Data:
    """This rank's loaders (``eval`` is None without --test_path) and the datasets behind them."""

    train: DataLoader
    eval: DataLoader | None
    micro_batches_per_epoch: int  # the same on every rank (the minimum over ranks)
    datasets: dict  # "train" (and "eval"): the tokenised datasets


def setup_data(args: TrainArgs, tokenizer, device: torch.device) -> Data:
    """Tokenise the data sets with the chat template and build this rank's loaders.

    The template chosen by default is written into ``args.template``, so the checkpoints record the one
    training used and the inference tools pick it up.
    """
    from transformers import AutoConfig

    from sft.data.batching import build_dataloader, build_eval_dataloader
    from sft.data.dataset import load_sft_dataset
    from sft.data.preference import load_preference_dataset
    from sft.data.templates import get_template, resolve_template_name

    model_type = AutoConfig.from_pretrained(args.model_name_or_path).model_type
    args.template = resolve_template_name(args.template, tokenizer, model_type)
    template = get_template(args.template, tokenizer, model_dir=args.model_name_or_path)
    logger.info("chat template %s (model type %s)", args.template, model_type)
    if not getattr(tokenizer, "chat_template", None):
        # Saved with every checkpoint and copied into merged models: apply_chat_template renders the format
        # training used.
        tokenizer.chat_template = template.chat_template()

    def load(path: str, flag: str):
        try:
            if args.objective in PREFERENCE_OBJECTIVES:  # pairs of replies, only the final reply learned
                return load_preference_dataset(
                    path,
                    template,
                    tokenizer,
                    max_len=args.max_len,
                    max_src_len=args.max_src_len,
                    is_skip=args.is_skip,
                    cache_dir=args.data_cache_dir or None,
                )
            return load_sft_dataset(
                path,
                tokenizer,
                template,
                max_len=args.max_len,
                max_src_len=args.max_src_len,
                is_skip=args.is_skip,
                loss_on=args.loss_on,
                cache_dir=args.data_cache_dir or None,
            )
        except DataFormatError:
            raise  # already names the file and line
        except (
            ValueError
        ) as err:  # e.g. every sample skipped as too long: the message names the flag to change
            raise DataFormatError(f"{flag}: {err}") from err

    common = {
        "packing": args.packing,
        "max_len": args.max_len,
        "rank": get_rank(),
        "world_size": get_world_size(),
        "pad_token_id": tokenizer.pad_token_id,
        "pin_memory": device.type == "cuda",  # page-locked batches: their copies to the GPU do not block
    }
    datasets = {"train": load(args.train_path, "--train_path")}
    if args.test_path:
        datasets["eval"] = load(args.test_path, "--test_path")
    if args.packing and args.objective in PREFERENCE_OBJECTIVES:
        # Each pair's prompt computed once, where the attention can take a shared prompt (CPU document SDPA).
        share = shares_prompts(args.model_name_or_path, args.attn_implementation, device)
        for dataset in datasets.values():
            dataset.share_prompt = share
        logger.info(
            "packed pairs %s their prompt", "share" if share else "do not share (this attention cannot)"
        )
    train_loader = build_dataloader(
        datasets["train"],
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        seed=args.seed,
        group_by_length=args.group_by_length,
        **common,
    )
    eval_loader = None
    if args.test_path:
        eval_loader = build_eval_dataloader(
            datasets["eval"], batch_size=args.per_device_eval_batch_size, **common
        )
    # Every rank must run the same number of micro-batches (each backward may be a collective).
    n_micro = int(all_reduce_min(torch.tensor(len(train_loader), device=device)).item())
    return Data(train=train_loader, eval=eval_loader, micro_batches_per_epoch=n_micro, datasets=datasets)


def total_optimizer_steps(args: TrainArgs, data: Data) -> tuple[int, int]:
    """(steps per epoch, total steps): --max_steps wins over --num_train_epochs when set."""
    steps_per_epoch = math.ceil(data.micro_batches_per_epoch / args.gradient_accumulation_steps)
    total = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    return steps_per_epoch, total


# --------------------------------------------------------------------------------------------------
# 3. model and DeepSpeed engine
# --------------------------------------------------------------------------------------------------
def setup_engine(args: TrainArgs, device: torch.device, total_steps: int):
    """Quantised base + peft adapter, wrapped by a DeepSpeed engine that owns the optimizer step."""
    import deepspeed
    from transformers import get_scheduler

    ds_config = build_ds_config(
        args, path=args.ds_config, precision=args.precision, world_size=get_world_size()
    )
    model = load_model_for_training(args, device, ds_config=ds_config)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[args.lr_scheduler]

    def make_scheduler(optimizer):
        return get_scheduler(
            schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        # One group per learning rate (LoRA+); the schedule scales every group by the same factor.
        model_parameters=optimizer_param_groups(model, args.loraplus_lr_ratio, args.learning_rate),
        config=ds_config,
        lr_scheduler=make_scheduler,
    )
    logger.info(
        "DeepSpeed ZeRO-%d, %s, %d rank(s), micro-batch %d x accumulation %d; %d steps (%d warm-up, %s)",
        zero_stage(ds_config),
        args.precision,
        get_world_size(),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        total_steps,
        warmup_steps,
        args.lr_scheduler,
    )
    return engine


# --------------------------------------------------------------------------------------------------
# 4. the loop
# --------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one optimizer step did."""

    applied: bool  # False: DeepSpeed skipped the update on every rank (non-finite loss or gradient norm)
    nonfinite_loss_ranks: list[int]  # ranks whose loss was inf/NaN; only looked up for a skipped step


def train_step(
    args: TrainArgs,
    engine,
    objective: Objective,
    micro_batches: list[dict],
    device: torch.device,
    metrics: Metrics,
    stop: GracefulStop,
) -> StepResult | None:
    """One optimizer step over ``micro_batches`` (up to --gradient_accumulation_steps of them).

    The loss is the objective's mean over every unit of the step (learned tokens for SFT), on all ranks.
    DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over ranks, so
    each micro-batch contributes loss_sum * world_size * accumulation / global_units.
    Returns None, before any forward pass, when a rank was asked to stop: the ranks agree through the
    reduction every step makes anyway, so they all stop at the same step.
    """
    # Unit and token counts come from the CPU tensors: counting them costs no device sync.
    learned = sum(objective.count(b) for b in micro_batches)
    inputs = sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        for b in micro_batches
    )
    # One reduction per step carries the token counts and the stop requests of all ranks (how many got a
    # SIGINT, how many a SIGTERM: a rank that got none stops with them).
    requests = [stop.signum == signal.SIGINT, stop.signum == signal.SIGTERM]
    counts = all_reduce_sum(torch.tensor([learned, inputs, *requests], dtype=torch.int64, device=device))
    # The step's one host sync (never per micro-batch): a signal that came during the previous step, its
    # evaluation or its save is seen here, before this step changes anything.
    sigints, sigterms = counts[2:].tolist()
    if sigints or sigterms:
        stop.join(signal.SIGTERM if sigterms else signal.SIGINT)
        return None
    scale = get_world_size() * args.gradient_accumulation_steps / counts[0].clamp(min=1).float()

    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    step_metrics = torch.zeros(len(objective.metric_names), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        # The last micro-batch closes the accumulation window, also when an epoch ends early.
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        loss_sum, metric_sums = objective.loss_sums(engine, batch, device)
        # 0 for a finite loss, NaN for an inf/NaN one (NaN times anything, 0 included, is NaN): a non-finite
        # loss then makes every gradient of the step NaN, and DeepSpeed's overflow check -- the global
        # gradient norm, reduced over ranks -- skips the update on every rank. No sync, no extra collective.
        poison = loss_sum.detach() - loss_sum.detach()
        engine.backward(loss_sum * (scale + poison))
        step_loss += loss_sum.detach().double()
        for j, name in enumerate(objective.metric_names):
            step_metrics[j] += metric_sums[name].double()
    engine.step()
    applied = engine.was_step_applied()  # a host bool: DeepSpeed's step already synced for its norm
    metrics.record_step(step_loss, counts[:2], applied, step_metrics)
    if applied:
        return StepResult(applied=True, nonfinite_loss_ranks=[])
    # Only after a skipped step, which every rank saw: which ranks had the non-finite loss, for the log.
    flags = torch.zeros(get_world_size(), dtype=torch.int32, device=device)
    flags[get_rank()] = int(not torch.isfinite(step_loss).item())
    ranks = [rank for rank, bad in enumerate(all_reduce_sum(flags).tolist()) if bad]
    return StepResult(applied=False, nonfinite_loss_ranks=ranks)


def evaluate_and_save(
    args: TrainArgs,
    engine,
    objective: Objective,
    tokenizer,
    data: Data,
    progress: TrainProgress,
    metrics: Metrics,
) -> Path:
    """The objective's evaluation on the test set (all ranks), then an adapter checkpoint, then rotation."""
    with metrics.pause():  # keep evaluation and saving out of tokens/s
        progress.eval = {}
        if data.eval is not None:
            # On a forked RNG: creating the eval iterator draws from it, and training must not notice.
            with torch.random.fork_rng(devices=[]):
                result = evaluate(engine, data.eval, objective)
            progress.eval = result
            for name in objective.eval_names:
                metrics.scalar(f"eval/{name}", result[name], progress.step)
            logger.info("step %d eval %s", progress.step, objective.describe(result))
        path = save_checkpoint(engine, tokenizer, args.to_dict(), progress, args.output_dir)
        rotate_checkpoints(args.output_dir, args.save_total_limit)
    return path


def save_if_good(
    args: TrainArgs,
    engine,
    objective: Objective,
    tokenizer,
    data: Data,
    progress: TrainProgress,
    metrics: Metrics,
    guard: NonFiniteGuard,
) -> Path | None:
    """:func:`evaluate_and_save`, unless this step's update was skipped as non-finite (then None).

    Such a checkpoint would hold an older step's adapter at a later data position; skipping it keeps the
    newest checkpoint the last good state, the one ``--resume_from_checkpoint latest`` continues from.
    """
    if guard.in_a_row:
        logger.warning("step %d: no checkpoint, the step's update was skipped as non-finite", progress.step)
        return None
    return evaluate_and_save(args, engine, objective, tokenizer, data, progress, metrics)


def diverged_message(args: TrainArgs, guard: NonFiniteGuard, step: int) -> str:
    """Why the run stops after --max_bad_steps skipped steps, and the checkpoint to resume from."""
    good = [p for p in list_checkpoints(args.output_dir) if checkpoint_step(p) < guard.first_bad_step]
    resume = (
        f"the last good checkpoint is {good[-1]}: resume from it (--resume_from_checkpoint {good[-1]})"
        if good
        else "there is no checkpoint before it: start again"
    )
    return (
        f"step {step}: {guard.in_a_row} optimizer steps in a row (from step {guard.first_bad_step}) had a "
        f"non-finite loss or gradient norm (--max_bad_steps {args.max_bad_steps}); their updates were skipped "
        f"and the run stops without a new checkpoint; {resume} with a lower --learning_rate or "
        "--max_grad_norm, and check the training data at the positions logged above"
    )


def train(
    args: TrainArgs,
    engine,
    objective: Objective,
    tokenizer,
    data: Data,
    device: torch.device,
    resume: Path | None,
) -> TrainProgress:
    """The training loop: epochs of optimizer steps, logging, evaluation and checkpoints."""
    _, total_steps = total_optimizer_steps(args, data)
    accumulation = args.gradient_accumulation_steps
    progress, rng_state = load_checkpoint(engine, resume) if resume else (TrainProgress(), None)
    if rng_state is not None:
        restore_rng_state(rng_state)  # the state the checkpoint's next step started from
    if progress.batches_in_epoch >= data.micro_batches_per_epoch:  # the checkpoint closed its epoch
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0

    metrics = Metrics(
        str(args.tensorboard_path), device, progress.step, progress.skipped_steps, objective.metric_names
    )
    guard = NonFiniteGuard(args.max_bad_steps, args.precision)
    progress_bar = (
        tqdm(total=total_steps, initial=progress.step, desc="train", dynamic_ncols=True)
        if is_main_process()
        else None
    )
    engine.train()
    saved_at, saved_path = (progress.step, resume) if resume else (-1, None)
    with GracefulStop() as stop:
        while progress.step < total_steps:
            sampler = data.train.batch_sampler
            sampler.set_epoch(progress.epoch)
            sampler.skip_batches(progress.batches_in_epoch)
            with torch.random.fork_rng(devices=[]):  # creating the iterator draws from the RNG
                batches = iter(data.train)

            while progress.step < total_steps and progress.batches_in_epoch < data.micro_batches_per_epoch:
                # Prefetch the step's micro-batches so their learned tokens are counted before any backward.
                n = min(accumulation, data.micro_batches_per_epoch - progress.batches_in_epoch)
                micro_batches = list(islice(batches, n))
                result = train_step(args, engine, objective, micro_batches, device, metrics, stop)
                if result is None:  # a stop was asked for: checkpoint the last step done, then stop
                    # Without evaluation (a preempted job may have seconds left); never a skipped step.
                    if saved_at != progress.step and not guard.in_a_row:
                        saved_path = save_checkpoint(
                            engine, tokenizer, args.to_dict(), progress, args.output_dir
                        )
                        rotate_checkpoints(args.output_dir, args.save_total_limit)
                    close(metrics, progress_bar)
                    raise TrainingStopped(stop.signum, str(saved_path or "nothing"))
                position = (
                    f"epoch {progress.epoch + 1}, micro-batches {progress.batches_in_epoch + 1}-"
                    f"{progress.batches_in_epoch + n} of {data.micro_batches_per_epoch}"
                )
                progress.step += 1
                progress.batches_in_epoch += n
                progress.eval = {}  # the metrics of an evaluation belong to the step it ran at
                progress.skipped_steps += not result.applied
                guard.record(progress.step, result.applied, result.nonfinite_loss_ranks, position)
                if guard.exhausted:
                    close(metrics, progress_bar)
                    raise TrainingDiverged(diverged_message(args, guard, progress.step))
                if progress_bar is not None:
                    progress_bar.update(1)
                if progress.step % args.show_loss_step == 0:
                    metrics.log(engine, progress.step, progress_bar)
                if args.save_model_step and progress.step % args.save_model_step == 0:
                    saved_path = (
                        save_if_good(args, engine, objective, tokenizer, data, progress, metrics, guard)
                        or saved_path
                    )
                    saved_at = progress.step

            if saved_at != progress.step:  # end of an epoch (or of --max_steps)
                saved_path = (
                    save_if_good(args, engine, objective, tokenizer, data, progress, metrics, guard)
                    or saved_path
                )
                saved_at = progress.step
            if progress.batches_in_epoch >= data.micro_batches_per_epoch:
                progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0

    if stop.signum:
        logger.warning("a stop signal came during the last step or the final save: the run finished anyway")
    if metrics.steps:  # the last steps, when they did not fill a --show_loss_step window
        metrics.log(engine, progress.step, progress_bar)
    close(metrics, progress_bar)
    return progress


def close(metrics: Metrics, progress_bar) -> None:
    """Flush TensorBoard and end the progress bar (rank 0 has one)."""
    if progress_bar is not None:
        progress_bar.close()
    metrics.close()


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def checked_on_rank0(check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 and raise its error on every rank, so that none waits in a collective."""
    problem = None
    if is_main_process():
        try:
            check()
        except (CheckpointError, OSError, ValueError) as err:  # what cli() reports as one line
            problem = err
    problem = broadcast_object(problem)
    if problem is not None:
        raise problem


def main(argv: list[str] | None = None) -> TrainProgress:
    """Run one training job; returns where it ended (step, epoch, last eval)."""
    setup_logging(int(os.environ.get("RANK", 0)))
    register_models()
    args = setup_args(argv)
    check_cuda_request()  # CUDA_VISIBLE_DEVICES set but no usable GPU: stop rather than train on the CPU
    device = init_distributed()
    setup_logging(get_rank())
    if not is_main_process():
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one copy of the weight-loading bar
    set_seed(args.seed)
    if is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(args.model_name_or_path)
    data = setup_data(args, tokenizer, device)
    _, total_steps = total_optimizer_steps(args, data)
    # Rank 0 picks the checkpoint, so every rank resumes from the same one.
    resume = broadcast_object(
        resolve_resume_dir(args.resume_from_checkpoint, args.output_dir) if is_main_process() else None
    )
    if resume is not None:  # before the model is loaded: a mismatch or a full disk fails fast
        check_resume_args(resume, args.to_dict())
        checked_on_rank0(lambda: check_resume_base(resume, args.model_name_or_path))
        checked_on_rank0(
            lambda: check_free_space(args.output_dir, directory_bytes(resume), f"a checkpoint like {resume}")
        )
    if args.init_adapter:  # before the model is loaded: an adapter of another base fails fast
        checked_on_rank0(
            lambda: check_adapter_fits_base(
                args.model_name_or_path,
                read_adapter(args.init_adapter, "--init_adapter"),
                base_flag="--model_name_or_path",
            )
        )
    # Same seed right before the adapter is created: its initial weights do not depend on data set-up.
    set_seed(args.seed)
    engine = setup_engine(args, device, total_steps)
    if resume is None:
        checked_on_rank0(
            lambda: check_free_space(
                args.output_dir, estimated_checkpoint_bytes(engine.module), "a checkpoint"
            )
        )
    objective = build_objective(args, head_loss="liger" if args.liger else "fused")
    if needs_precomputed_reference(args):
        attach_reference_logps(args, engine, objective, data.datasets, device, tokenizer.pad_token_id)
    progress = train(args, engine, objective, tokenizer, data, device, resume)
    if is_main_process():
        checkpoints = list_checkpoints(args.output_dir)
        best = best_checkpoint(args.output_dir)
        logger.info(
            "done: %d steps; newest checkpoint %s; best by eval perplexity %s",
            progress.step,
            checkpoints[-1] if checkpoints else "none",
            best or "n/a (no --test_path)",
        )
    destroy()
    return progress


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry point: :func:`main` under sft.core's error handling.

    A user error (bad flags: exit status 2; bad data, a damaged checkpoint or model, an unusable path, a full
    disk: 1) ends with one log line naming the flag or file and the fix; a SIGTERM or Ctrl-C that saved a
    checkpoint with 128 + the signal and a hint how to continue (README.md, "When things go wrong").
    """
    return run_entry_point(main, argv, logger=logger, cleanup=destroy, interrupt_hint=RESUME_HINT)


if __name__ == "__main__":
    sys.exit(cli())
