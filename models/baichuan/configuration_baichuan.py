"""Configuration of the Baichuan2 model family (7B with RoPE, 13B with ALiBi).

Written for transformers 5.x: `PreTrainedConfig` subclasses are dataclasses whose fields are type-checked by the
`@strict` decorator; keys of a `config.json` that are not fields are set as plain attributes by the base class.
"""

from __future__ import annotations

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

POSITION_EMBEDDING_TYPES = ("rope", "alibi")


@strict
class BaichuanConfig(PreTrainedConfig):
    r"""Configuration of a Baichuan2 decoder (`model_type="baichuan"`).

    Reads the official Baichuan2-7B/13B (Base and Chat) `config.json` files unchanged, and writes files those loaders
    read back. The defaults are the Baichuan2-7B sizes.

    Position scheme (`position_embedding_type`):
        The official files do not name their position scheme; the two sizes differ in it. The rule:

        1. an explicit `position_embedding_type` (`"rope"` or `"alibi"`) wins;
        2. otherwise `"rope"` when the config has `max_position_embeddings` (the 7B files carry it),
           `"alibi"` when it does not (the 13B files carry only `model_max_length`).

        A bare `BaichuanConfig()` therefore resolves to ALiBi; pass `position_embedding_type="rope"` (or
        `max_position_embeddings`) for the 7B layout. Saved configs write the resolved `position_embedding_type`, so
        a save/load round trip never changes the scheme.

    Args:
        vocab_size: Vocabulary size (rows of `model.embed_tokens` and of `lm_head`).
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU MLP.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of attention heads (multi-head attention, no grouped KV heads).
        hidden_act: MLP activation (`"silu"` in every published checkpoint).
        max_position_embeddings: Context length the RoPE model was trained for (informational: RoPE has no table,
            positions beyond it still compute). Present in the 7B files, absent (None) in the 13B files.
        model_max_length: Training context length written by the official files (both sizes); informational.
        position_embedding_type: `"rope"` or `"alibi"`; None resolves by the rule above.
        rope_theta: RoPE base (10000 in Baichuan2-7B).
        initializer_range: Standard deviation of the normal initialisation of linear and embedding weights.
        rms_norm_eps: Epsilon of the RMSNorm layers.
        use_cache: Whether the forward returns a key/value cache by default.
        z_loss_weight: Weight of the z-loss `mean(logsumexp(logits)^2)` over learned tokens (0 disables it).
        pad_token_id / bos_token_id / eos_token_id: Special token ids (0 / 1 / 2 in the official files).
        tie_word_embeddings: Must stay False: the NormHead normalises its own weight, it cannot share the embedding.

    Extra keys of the official files are accepted and kept as attributes: `auto_map`, `_from_model_config`,
    `tokenizer_class`, `torch_dtype` (read as `dtype`). The 13B files' `"gradient_checkpointing": [false]` (a list,
    hence truthy) is normalised to a bool and dropped when false, so loading them does not silently switch on
    activation checkpointing.
    """

    model_type: ClassVar[str] = "baichuan"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 125696
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int | None = None
    model_max_length: int | None = 4096
    position_embedding_type: str | None = None
    rope_theta: float | int = 10000.0
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    z_loss_weight: float | int = 0.0
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # The 13B files carry `"gradient_checkpointing": [false]`. transformers enables activation checkpointing
        # for any truthy `config.gradient_checkpointing`, and a one-element list is truthy.
        gradient_checkpointing = kwargs.pop("gradient_checkpointing", None)
        if isinstance(gradient_checkpointing, (list, tuple)):
            gradient_checkpointing = any(bool(flag) for flag in gradient_checkpointing)
        if gradient_checkpointing:
            kwargs["gradient_checkpointing"] = True

        if self.position_embedding_type is None:
            self.position_embedding_type = "rope" if self.max_position_embeddings is not None else "alibi"
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: shapes and the position scheme must be usable."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BaichuanConfig: hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"BaichuanConfig: position_embedding_type={self.position_embedding_type!r} is not one of "
                f"{POSITION_EMBEDDING_TYPES}; set it explicitly or follow the rule in the class docstring."
            )
        if self.position_embedding_type == "rope" and head_dim % 2 != 0:
            raise ValueError(f"BaichuanConfig: RoPE needs an even head dimension, got {head_dim}.")
        if self.tie_word_embeddings:
            raise ValueError(
                "BaichuanConfig: tie_word_embeddings=True is not supported: the NormHead normalises its own weight "
                "rows and cannot share the input embedding. Set tie_word_embeddings=false in config.json."
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        """Baichuan2 uses plain multi-head attention: one key/value head per query head (read by cache classes)."""
        return self.num_attention_heads


__all__ = ["BaichuanConfig"]
