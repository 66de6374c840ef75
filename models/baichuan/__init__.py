"""Our own Baichuan2 implementation, registered with the transformers Auto classes on import.

After `import models.baichuan`, `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` / `AutoTokenizer` resolve
`model_type="baichuan"` to the classes below. The official Baichuan2 `config.json` files carry an `auto_map` pointing
at their remote code; transformers prefers a registered class that does not live in the `transformers` package over
remote code (`explicit_local_code` in `models/auto/auto_factory.py` and `configuration_auto.py`), and resolves
`trust_remote_code=None` to False when local code exists, so no remote code is imported or executed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_baichuan import BaichuanConfig
from .modeling_baichuan import BaichuanForCausalLM, BaichuanModel, BaichuanPreTrainedModel
from .tokenization_baichuan import BaichuanTokenizer

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
]
