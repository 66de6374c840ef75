"""What every part of sft shares and nothing else: errors and exit statuses, flags declared as dataclass
fields, the entry-point runner and logging, atomic file writes, rank logic. A leaf: it imports nothing
else from sft.
"""
