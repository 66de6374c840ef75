"""Using a trained model: loading it (with or without an adapter), generation settings, generating and
streaming, and chat sessions. Shared by predict.py, evaluate.py, web_demo.py and data_helper.py.

- :mod:`sft.inference.loading` -- the model-loading flags and :func:`~sft.inference.loading.load_from_flags`.
- :mod:`sft.inference.settings` -- the generation flags and the model's generation_config with them applied.
- :mod:`sft.inference.engines` -- what computes the replies (torch, llama.cpp, vLLM) behind one interface.
- :mod:`sft.inference.generate` -- sampling and the token loop: batches of replies, one streamed reply.
- :mod:`sft.inference.kv_cache` -- the KV cache of our decoding loops.
- :mod:`sft.inference.cpu_decode` -- a CPU decode step made cheaper without changing what it computes.
- :mod:`sft.inference.serving` -- live replies for many users decoded together (the web demo).
- :mod:`sft.inference.chat` -- fitting a chat into the context window.
"""

# What --engine accepts (predict.py, web_demo.py, data_helper.py synthesize/preference): docs/INFERENCE.md#engines.
ENGINES = ("torch", "llama_cpp", "vllm")
