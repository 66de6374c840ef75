"""The RolePlayProj recipe's ``utils.py``, kept so its users find the names they know.

The code lives in :mod:`sft.core` (logging set-up, seeding, local-path checks); the project's own
scripts import it from there.
"""

from sft.core.paths import require_local_dir
from sft.core.runner import set_seed, setup_logging

__all__ = ["require_local_dir", "set_seed", "setup_logging"]
