"""Model families this project implements itself, and their registration with transformers.

Every entry point (the top-level scripts, ``tests/conftest.py``) calls :func:`register_models` once,
before it touches a config, tokenizer or model: after that, ``AutoConfig`` / ``AutoModelForCausalLM`` /
``AutoTokenizer`` resolve ``model_type="baichuan"`` to our classes, and a checkpoint of any family
transformers ships (Llama, Qwen2, ...) loads the usual way. Importing a package never registers
anything by itself, so no behaviour depends on import order.
"""

from __future__ import annotations


def register_models() -> None:
    """Register our model families with the transformers Auto classes (idempotent, cheap)."""
    from models.baichuan import register

    register()
