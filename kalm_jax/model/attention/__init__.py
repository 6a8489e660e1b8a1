"""Attention implementations: XLA (dense and banded) and the Pallas splash kernel for TPU."""
