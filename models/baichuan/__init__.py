"""Our own Baichuan2 implementation (config, model, tokenizer), following the transformers conventions.

:func:`register` (called through ``models.register_models()``) makes ``AutoConfig`` /
``AutoModel`` / ``AutoModelForCausalLM`` / ``AutoTokenizer`` resolve ``model_type="baichuan"`` to the
classes below. The official Baichuan2 ``config.json`` files carry an ``auto_map`` pointing at their
remote code; transformers prefers a registered class that does not live in the ``transformers``
package over remote code (``explicit_local_code`` in ``models/auto/auto_factory.py`` and
``configuration_auto.py``) and resolves ``trust_remote_code=None`` to False when local code exists, so
no remote code is imported or executed.
"""

from .configuration_baichuan import BaichuanConfig
from .modeling_baichuan import BaichuanForCausalLM, BaichuanModel, BaichuanPreTrainedModel
from .tokenization_baichuan import BaichuanTokenizer


def register() -> None:
    """Register the Baichuan2 classes with the transformers Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    # exist_ok: a later transformers release might ship its own "baichuan"; ours must still win.
    AutoConfig.register(BaichuanConfig.model_type, BaichuanConfig, exist_ok=True)
    AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
    AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
    AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaichuanTokenizer, exist_ok=True)


__all__ = [
    "BaichuanConfig",
    "BaichuanForCausalLM",
    "BaichuanModel",
    "BaichuanPreTrainedModel",
    "BaichuanTokenizer",
    "register",
]
