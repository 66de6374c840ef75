"""Loading a base model and its tokenizer (dtype, 4-bit/8-bit quantisation, damaged files named), and the
attention functions of our own that training and decoding register beside SDPA: shared by training, inference and
export.
"""

# What the flags that choose how a base is loaded accept (train.py, predict.py, merge_params.py, ...).
PRECISIONS = ("bf16", "fp16", "fp32")
QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
