"""Training: arguments, the DeepSpeed config, the model with its adapter, batches as model inputs, the
objectives, evaluation, metrics and stopping. train.py's loop composes them.
"""
