"""Inference: the jitted hot paths, the one engine, passage states and the Reranker."""
