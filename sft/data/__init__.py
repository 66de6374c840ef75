"""Data: the on-disk conversation format, converters of public data sets, chat templates, tokenised datasets
and their batches."""

# Which assistant turns of a conversation are learned (--loss_on).
LOSS_PLACEMENTS = ("all", "last", "each")
