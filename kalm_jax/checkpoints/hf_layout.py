"""The Hugging Face `t5gemma2` ⇄ NNX name and layout map, as data (no I/O).

On-disk (Hub) names: `model.encoder.embed_tokens.{weight,eoi_embedding}`, `model.encoder.layers.{i}.*`,
`model.encoder.norm.weight`, `model.decoder.layers.{i}.*`, `model.decoder.norm.weight`; the decoder
embedding and `lm_head.out_proj.weight` are tied aliases. PyTorch Linear weights are [out, in]; ours are
einsum kernels ([H, N, D] for q, [N, D, H] for o, [H, I] for gate/up, [I, H] for down).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from kalm_jax.model.config import ModelConfig

# HF per-layer suffix -> our stacked-parameter name.
LAYER_NAMES: dict[str, str] = {
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "pre_self_attn_layernorm.weight": "pre_attn_norm",
    "post_self_attn_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "pre_ffw_norm",
    "post_feedforward_layernorm.weight": "post_ffw_norm",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
}
TOP_NAMES: dict[str, tuple[str, ...]] = {
    "model.encoder.embed_tokens.weight": ("embedding",),
    "model.encoder.embed_tokens.eoi_embedding": ("eoi_embedding",),
    "model.encoder.norm.weight": ("encoder_norm",),
    "model.decoder.norm.weight": ("decoder_norm",),
}
TIED_ALIASES = (
    "model.decoder.embed_tokens.weight",
    "model.decoder.embed_tokens.eoi_embedding",
    "lm_head.out_proj.weight",
)
PASSTHROUGH_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")
STACKS = {"encoder": "model.encoder.layers", "decoder": "model.decoder.layers"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: its name, PyTorch shape and where it lives in the NNX model."""

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]  # attribute path in the model, e.g. ("encoder", "q")
    layer: int | None  # index into the stacked leading axis, or None

    def to_ours(self, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return _to_ours(self.path[-1], t, cfg)

    def to_hf(self, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return _to_hf(self.path[-1], t, cfg)


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """All text tensors of the Hub layout for `cfg`, in a stable order (tied aliases omitted)."""
    h, n, k, d, i, v = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    shapes = {
        "q": (n * d, h),
        "k": (k * d, h),
        "v": (k * d, h),
        "o": (h, n * d),
        "q_norm": (d,),
        "k_norm": (d,),
        "pre_attn_norm": (h,),
        "post_attn_norm": (h,),
        "pre_ffw_norm": (h,),
        "post_ffw_norm": (h,),
        "gate": (i, h),
        "up": (i, h),
        "down": (h, i),
    }
    specs = [
        TensorSpec("model.encoder.embed_tokens.weight", (v, h), ("embedding",), None),
        TensorSpec("model.encoder.embed_tokens.eoi_embedding", (h,), ("eoi_embedding",), None),
    ]
    for stack, prefix in STACKS.items():
        for layer in range(len(getattr(cfg, f"{stack}_layer_types"))):
            for suffix, ours in LAYER_NAMES.items():
                specs.append(TensorSpec(f"{prefix}.{layer}.{suffix}", shapes[ours], (stack, ours), layer))
        specs.append(TensorSpec(f"model.{stack}.norm.weight", (h,), (f"{stack}_norm",), None))
    return specs


def _to_ours(name: str, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    h, d = cfg.hidden_size, cfg.head_dim
    if name == "q":
        return t.T.reshape(h, cfg.num_heads, d)
    if name in ("k", "v"):
        return t.T.reshape(h, cfg.num_kv_heads, d)
    if name == "o":
        return t.T.reshape(cfg.num_heads, d, h)
    if name in ("gate", "up", "down"):
        return t.T
    return t


def _to_hf(name: str, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if name in ("q", "k", "v"):
        return t.reshape(t.shape[0], -1).T
    if name == "o":
        return t.reshape(-1, t.shape[-1]).T
    if name in ("gate", "up", "down"):
        return t.T
    return t


def hf_shape(name: str, ours: Sequence[int]) -> tuple[int, ...]:
    """PyTorch shape of one layer's parameter `name` whose (unstacked) NNX shape is `ours`."""
    ours = tuple(int(x) for x in ours)
    if name in ("q", "k", "v") and len(ours) == 3:
        return (ours[1] * ours[2], ours[0])
    if name == "o" and len(ours) == 3:
        return (ours[2], ours[0] * ours[1])
    if name in ("gate", "up", "down"):
        return ours[::-1]
    return ours


def canonical_name(name: str) -> str:
    """Maps in-memory transformers names (`model.encoder.text_model.*`) to the Hub layout."""
    return name.replace("model.encoder.text_model.", "model.encoder.", 1)


__all__ = [
    "LAYER_NAMES",
    "TOP_NAMES",
    "TIED_ALIASES",
    "PASSTHROUGH_PREFIXES",
    "STACKS",
    "TensorSpec",
    "tensor_specs",
    "hf_shape",
    "canonical_name",
]
