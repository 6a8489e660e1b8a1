"""Performance benchmark suite: `kalm-bench` (see docs/performance.md).

Modules: `flops` (analytic FLOP model), `timing` (warm-up, device sync, medians, rotated inputs, matmul
peak, memory), `suite` (kalm-jax rows), `peer` (the PyTorch transformers peer), `train_hook` (train rows
once `kalm_jax.training` exists), `runner` (the whole run, JSON written row by row), `report` (tables).
This package imports nothing at import time so the CLI can set XLA environment flags first.
"""
