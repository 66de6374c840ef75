"""Using a trained model: loading it (with or without an adapter), generation settings, generating and
streaming, and chat sessions. Shared by predict.py, evaluate.py, web_demo.py and data_helper.py synthesize.

- :mod:`sft.inference.loading` -- the model-loading flags and :func:`~sft.inference.loading.load_from_flags`.
- :mod:`sft.inference.settings` -- the generation flags and the model's generation_config with them applied.
- :mod:`sft.inference.generate` -- batched, left-padded generation and streamed replies.
- :mod:`sft.inference.chat` -- fitting a chat's history into the context window.
"""
