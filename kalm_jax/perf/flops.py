"""Analytic FLOP model of KaLM-Reranker encode, score, the "no cache" path and a cross-encoder baseline, and
the one table of peak FLOP/s per chip that MFU figures divide by (bf16, and int8 where the chip's int8 matmul
rate is published).

Counts multiply-adds of the matmuls as 2 FLOPs each (the MFU convention): projections, MLP, attention
scores and attention-weighted values. Norms, RoPE, softmax, pooling and embedding lookups are ignored
(< 1% at every preset shape). Attention counts only the keys a query can see (causal triangle, sliding
window), i.e. useful work, not what a dense kernel executes. The formulas are written out in
docs/performance.md; `tests/perf/test_bench.py` checks them against a hand count.

Notation: H hidden, N query heads, K kv heads, D head dim, I MLP width, W sliding window,
n passage tokens, r MEP ratio, c = ceil(n / r) cached states, T decoder prompt tokens.
"""

from __future__ import annotations

from kalm_jax.model.config import SLIDING, ModelConfig

PEAK_BF16: dict[str, float] = {
    "v4": 275e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
}
"""Dense bf16 peak FLOP/s per chip (vendor figures), by TPU generation or GPU name."""

PEAK_INT8: dict[str, float] = {
    "v5e": 394e12,
    "v5p": 918e12,
    "v6e": 1836e12,
    "h100": 1979e12,
    "h200": 1979e12,
    "a100": 624e12,
}
"""Dense int8 peak OP/s per chip (vendor figures; 2x bf16 on every chip listed). No entry: no int8 MFU."""

PEAKS: dict[str, dict[str, float]] = {"bf16": PEAK_BF16, "int8": PEAK_INT8}
"""The peak table by matmul operand type: "bf16" (float matmuls, also weight-only int8 / fp8, whose weights are
dequantized into a bf16 matmul) and "int8" (int8 x int8 matmuls, quantization mode "int8-dynamic")."""


def matmul_type(quantization: str | None) -> str:
    """The `PEAKS` key of a program run with weight quantization `quantization` (`kalm_jax.model.quantization`
    modes; None or "none": float): "int8" for "int8-dynamic" (int8 x int8 matmuls), else "bf16"."""
    return "int8" if quantization == "int8-dynamic" else "bf16"


def peak_for(chip: str, quantization: str | None = None) -> float:
    """Peak FLOP/s of chip `chip` (a `PEAK_BF16` key) for a program in `quantization`; 0.0 when the table has
    no figure (then no MFU is reported)."""
    return PEAKS[matmul_type(quantization)].get(chip, 0.0)


# `jax.Device.device_kind` spellings -> PEAK_BF16 keys (longest match first).
_DEVICE_KINDS = (
    ("v5 lite", "v5e"),
    ("v5e", "v5e"),
    ("v5p", "v5p"),
    ("v5", "v5p"),  # "TPU v5" is v5p's device_kind
    ("v6", "v6e"),
    ("v4", "v4"),
    ("h100", "h100"),
    ("h200", "h200"),
    ("a100", "a100"),
)


def chip(device_kind: str) -> str | None:
    """The `PEAK_BF16` key ("v5e", "h200", ...) of a chip named by `jax.Device.device_kind` (e.g. "TPU v5 lite",
    "NVIDIA H200"); None when unknown."""
    kind = device_kind.lower()
    return next((key for spelling, key in _DEVICE_KINDS if spelling in kind), None)


def peak_flops(device_kind: str) -> float:
    """Peak bf16 FLOP/s of one chip named by `jax.Device.device_kind` (`chip`); 0.0 when unknown (then no MFU is
    reported)."""
    key = chip(device_kind)
    return PEAK_BF16.get(key, 0.0) if key else 0.0


def token_linear_flops(cfg: ModelConfig) -> int:
    """Per token per layer: q/k/v/o projections 2·H·D·(2N + 2K) + GeGLU MLP 3·2·H·I."""
    h, d = cfg.hidden_size, cfg.head_dim
    return 2 * h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 6 * h * cfg.intermediate_size


def attention_pair_flops(cfg: ModelConfig) -> int:
    """Per (query, visible key) pair per layer: scores 2·N·D + weighted values 2·N·D."""
    return 4 * cfg.num_heads * cfg.head_dim


def kv_projection_flops(cfg: ModelConfig) -> int:
    """Per cached passage state per decoder layer: k_proj and v_proj, 2·2·H·K·D."""
    return 4 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim


def bidirectional_visible_keys(n: int, window: int, sliding: bool) -> int:
    """Sum over the n queries of the keys each sees in the bidirectional encoder (exact at the edges).

    Sliding layers: query i sees keys j with -(W//2) <= i - j <= (W+1)//2 - 1 (W keys inside the passage).
    """
    if not sliding:
        return n * n
    left, right = (window + 1) // 2 - 1, window // 2
    return sum(min(n - 1, i + right) - max(0, i - left) + 1 for i in range(n))


def causal_visible_keys(t: int, window: int, sliding: bool) -> int:
    """Sum over t queries of the causal keys each sees (sliding layers: at most W)."""
    return sum(min(i + 1, window) if sliding else i + 1 for i in range(t))


def encoder_flops(cfg: ModelConfig, n: int) -> int:
    """Forward FLOPs to encode one passage of n tokens (all layers; no LM head)."""
    total = 0
    for kind in cfg.encoder_layer_types:
        keys = bidirectional_visible_keys(n, cfg.sliding_window, kind == SLIDING)
        total += n * token_linear_flops(cfg) + keys * attention_pair_flops(cfg)
    return total


def decoder_flops(cfg: ModelConfig, t: int, c: int) -> int:
    """Forward FLOPs to score one (prompt of t tokens, c cached states) pair.

    Every decoder layer but the last pays the prompt's linear work, the k/v projection of the c cached
    states (the cache holds pre-projection hidden states) and merged attention over t causal keys + c
    passage keys. Only the last position is read, so the last layer needs the k/v projections of all t
    prompt tokens and of the c states, but q/o, attention and the MLP for one query; the head multiplies
    that state by the two yes/no rows (2·2·H).
    """
    total = 4 * cfg.hidden_size
    kinds = cfg.decoder_layer_types
    for kind in kinds[:-1]:
        self_keys = causal_visible_keys(t, cfg.sliding_window, kind == SLIDING)
        total += (
            t * token_linear_flops(cfg) + c * kv_projection_flops(cfg) + (self_keys + t * c) * attention_pair_flops(cfg)
        )
    last_keys = min(t, cfg.sliding_window) if kinds[-1] == SLIDING else t
    total += (
        (t + c) * kv_projection_flops(cfg)
        + token_linear_flops(cfg)
        - kv_projection_flops(cfg)
        + (last_keys + c) * attention_pair_flops(cfg)
    )
    return total


def cached_states(n: int, r: int) -> int:
    return -(-n // r)


def no_cache_flops(cfg: ModelConfig, n: int, r: int, t: int) -> int:
    """Per pair without a passage cache: encode the passage, then score it (encode + score)."""
    return encoder_flops(cfg, n) + decoder_flops(cfg, t, cached_states(n, r))


def online_ratio(cfg: ModelConfig, n: int, r: int, t: int) -> float:
    """Analytic online-cost ratio: (encode + score) / score, per pair."""
    return no_cache_flops(cfg, n, r, t) / decoder_flops(cfg, t, cached_states(n, r))


def cross_encoder_flops(cfg: ModelConfig, n: int, t: int) -> int:
    """A decoder-only cross-encoder of the same layer shapes reading prompt + passage (t + n tokens causally)
    through the decoder stack's depth, with a 2-row head at the last position (Qwen3-Reranker style)."""
    length = t + n
    total = 4 * cfg.hidden_size
    for kind in cfg.decoder_layer_types:
        keys = causal_visible_keys(length, cfg.sliding_window, kind == SLIDING)
        total += length * token_linear_flops(cfg) + keys * attention_pair_flops(cfg)
    return total


def cross_encoder_ratio(cfg: ModelConfig, n: int, r: int, t: int) -> float:
    """Cross-encoder cost per pair over KaLM's cached scoring cost per pair."""
    return cross_encoder_flops(cfg, n, t) / decoder_flops(cfg, t, cached_states(n, r))


def train_flops(cfg: ModelConfig, n: int, r: int, t: int, *, lora: bool) -> int:
    """Train-step FLOPs per example: forward (encode + score) × 3 for full fine-tuning (forward, input
    gradients, weight gradients), × 2 for LoRA (frozen weights get no weight gradients; adapters ignored)."""
    return (2 if lora else 3) * no_cache_flops(cfg, n, r, t)


def train_step_flops(cfg: ModelConfig, n: int, ratios: tuple[int, ...], t: int, *, lora: bool) -> int:
    """Useful FLOPs per training pair of the real step (`kalm_jax.training.step`): the passage is encoded
    once and scored once per MEP ratio in `ratios`; × 3 for full fine-tuning, × 2 for LoRA (as `train_flops`)."""
    forward = encoder_flops(cfg, n) + sum(decoder_flops(cfg, t, cached_states(n, r)) for r in ratios)
    return (2 if lora else 3) * forward


def cache_bytes(cfg: ModelConfig, n: int, r: int, itemsize: int = 2) -> int:
    """Bytes of one cached passage: ceil(n/r) states × H × itemsize (+ int32 counts per window)."""
    c = cached_states(n, r)
    return c * cfg.hidden_size * itemsize + c * 4


__all__ = [
    "PEAK_BF16",
    "PEAK_INT8",
    "PEAKS",
    "matmul_type",
    "peak_for",
    "peak_flops",
    "token_linear_flops",
    "attention_pair_flops",
    "kv_projection_flops",
    "encoder_flops",
    "decoder_flops",
    "no_cache_flops",
    "online_ratio",
    "cross_encoder_flops",
    "cross_encoder_ratio",
    "train_flops",
    "train_step_flops",
    "cache_bytes",
    "cached_states",
    "bidirectional_visible_keys",
    "causal_visible_keys",
]
