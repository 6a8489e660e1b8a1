"""Checkpoints: Hugging Face safetensors, the native Orbax format, integrity, the one loader, conversion."""
