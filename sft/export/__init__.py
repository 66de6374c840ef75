"""Exporting a trained model: the LoRA merge into its base, GGUF files and Ollama Modelfiles."""
