"""SentencePiece tokenizer of the Baichuan2 model family, for transformers 5.x.

Behaviour of the official Baichuan2 tokenizer that this class keeps:

- the vocabulary is a SentencePiece BPE model in `tokenizer.model`, with `<unk>`, `<s>`, `</s>` at ids 0, 1, 2
  and padding done with `<unk>` (id 0);
- no BOS/EOS is added by default (`add_bos_token=False`, `add_eos_token=False`, as the official
  `tokenizer_config.json` sets): the chat helpers place the turn tokens themselves;
- text goes to SentencePiece unchanged: the Baichuan2 model has no dummy prefix and identity normalisation, so
  Chinese text gets no spurious leading "▁" and spaces/newlines survive an encode/decode round trip;
- characters outside the vocabulary are byte-fallback pieces (`<0xE4>`, ...) that decode back to UTF-8 text.

The official `tokenizer_config.json` (with `"__type": "AddedToken"` dicts and an `auto_map` pointing at remote
code) loads unchanged through `AutoTokenizer` once `models.baichuan` is imported, without `trust_remote_code`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import sentencepiece as spm
from transformers.tokenization_utils_base import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
from transformers.utils import logging

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class BaichuanTokenizer(SentencePieceBackend):
    """Baichuan2 tokenizer: a thin layer over a SentencePiece model.

    Args:
        vocab_file: Path to the SentencePiece model (`tokenizer.model`).
        unk_token: Unknown token (id 0 in the Baichuan2 vocabulary).
        bos_token: Beginning-of-sequence token (id 1).
        eos_token: End-of-sequence token (id 2).
        pad_token: Padding token; Baichuan2 pads with `<unk>` (id 0).
        sp_model_kwargs: Extra arguments for `sentencepiece.SentencePieceProcessor` (e.g. sampling options).
        add_bos_token: Prepend `bos_token` when encoding with `add_special_tokens=True`.
        add_eos_token: Append `eos_token` when encoding with `add_special_tokens=True`.
        clean_up_tokenization_spaces: Apply transformers' English clean-up on decode (off: it would remove
            spaces before punctuation, breaking round trips).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012 (transformers declares it a plain list)

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = "<unk>",
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise FileNotFoundError(
                f"BaichuanTokenizer: SentencePiece model not found at {vocab_file!r}; pass the path of the "
                "model directory's tokenizer.model (a local directory, not a hub id)."
            )
        # Set before the base __init__: it encodes special tokens and may call build_inputs_with_special_tokens.
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # The model is used as trained: the base class's legacy=False would rewrite its normaliser, and BOS/EOS
        # placement is ours (build_inputs_with_special_tokens), not a generic special_tokens_pattern.
        kwargs.pop("legacy", None)
        kwargs.pop("special_tokens_pattern", None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            sp_model_kwargs=sp_model_kwargs or {},
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # --- pickling: the SentencePiece processor is rebuilt from its serialized proto --------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Keep the model bytes rather than the path: a DataLoader worker may not see the original file.
        state["sp_model"] = None
        state["_sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        proto = state.pop("_sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(proto)

    # --- text <-> pieces ----------------------------------------------------------------------------------

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Split plain text (special tokens already removed by the caller) into SentencePiece pieces."""
        return self.sp_model.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces back into text.

        Runs of ordinary pieces are decoded by SentencePiece itself, which turns "▁" into spaces and merges
        byte-fallback pieces (`<0xE4><0xBD><0xA0>`) into UTF-8 characters. Special/added tokens are copied
        verbatim, with no space inserted around them, so decode(encode(text)) == text.
        """
        special = set(self.all_special_tokens) | set(self._added_tokens_encoder)
        pieces: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in special:
                if run:
                    pieces.append(self.sp_model.decode(run))
                    run = []
                pieces.append(token)
            else:
                run.append(token)
        if run:
            pieces.append(self.sp_model.decode(run))
        return "".join(pieces)

    # --- special tokens -------------------------------------------------------------------------------------

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """`[bos] A [eos]` (and `[bos] B [eos]` appended for pairs), each part only if enabled."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 where `build_inputs_with_special_tokens` inserted a BOS/EOS, 0 on sequence tokens."""
        if already_has_special_tokens:
            special_ids = set(self.all_special_ids)
            return [1 if token_id in special_ids else 0 for token_id in token_ids_0]
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Zeros for the first sequence, ones for the second (Baichuan2 itself does not use token types)."""
        first = len(self.build_inputs_with_special_tokens(token_ids_0))
        if token_ids_1 is None:
            return [0] * first
        return [0] * first + [1] * len(self.build_inputs_with_special_tokens(token_ids_1))

    # --- saving ---------------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> tuple[str, ...]:
        """Save like any tokenizer, then write `add_bos_token`/`add_eos_token` back into tokenizer_config.json.

        transformers 5.x drops these two keys on save (its fast tokenizers keep them in `tokenizer.json`); a
        SentencePiece tokenizer has no such file, so without this a tokenizer with `add_bos_token=True` would
        come back with False.
        """
        files = super().save_pretrained(
            save_directory,
            legacy_format=legacy_format,
            filename_prefix=filename_prefix,
            push_to_hub=push_to_hub,
            **kwargs,
        )
        config_path = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + TOKENIZER_CONFIG_FILE
        )
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["add_bos_token"] = self.add_bos_token
        config["add_eos_token"] = self.add_eos_token
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True, ensure_ascii=False)
            handle.write("\n")
        return files


__all__ = ["BaichuanTokenizer"]
