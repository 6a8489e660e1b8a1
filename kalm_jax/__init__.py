"""kalm-jax: a JAX/Flax reimplementation of the KaLM-Reranker-V1 passage reranker."""

__version__ = "0.1.0"
