"""The run and checkpoint directory format: the one module that writes and reads it.

A run's ``--output_dir`` holds ``runs/`` (TensorBoard) and one directory per checkpoint,
``epoch-E-step-S/`` (E counts from 1, S is the optimizer step), holding

- ``adapter_model.safetensors`` + ``adapter_config.json``: the trainable weights only, in peft's
  format (``PeftModel.from_pretrained(base, ckpt_dir)`` loads them);
- the tokenizer files (with its chat template) and ``train_args.json``: the run's arguments, among
  them the base model (``model_name_or_path``), its quantisation and the chat template it trained with;
- ``base_model.json``: the identity of the base model (its config and a fingerprint of its weights), so
  resuming, merging or loading the adapter on another model is refused before anything is loaded;
- ``training_state/``: DeepSpeed's optimizer, scheduler and trainable-weight state (the frozen base
  is never written), plus one ``rng_state_<rank>.pt`` per rank;
- ``trainer_state.json``: step, epoch, data position and evaluation metrics. It is written last and
  atomically, so a directory without a readable one is an interrupted save and is never resumed from.
  A save that fails (a full disk) removes its directory and raises a :class:`CheckpointError` naming
  the path, the fix and the last complete checkpoint, on every rank together.

Writing: :func:`save_checkpoint` (every rank calls it: under ZeRO-3 gathering the adapter and saving the
optimizer partitions are collectives; rank 0 writes the shared files), :func:`rotate_checkpoints`.
Reading: :func:`list_checkpoints` / :func:`resolve_resume_dir` / :func:`best_checkpoint`,
:func:`load_checkpoint` (resume), :func:`read_train_args`, and for the inference tools
:func:`read_adapter` (an :class:`AdapterInfo`: config, tensor shapes, training quantisation and
template) and :func:`check_adapter_fits_base` (which compares the recorded base identity first).
No other module spells these file names.
"""
