"""Hugging Face `t5gemma2` checkpoints ⇄ the NNX model: the name/layout mapping as data, and `load`.

On-disk (Hub) names: `model.encoder.embed_tokens.{weight,eoi_embedding}`, `model.encoder.layers.{i}.*`,
`model.encoder.norm.weight`, `model.decoder.layers.{i}.*`, `model.decoder.norm.weight`; the decoder
embedding and `lm_head.out_proj.weight` are tied aliases. PyTorch Linear weights are [out, in]; ours are
einsum kernels ([H, N, D] for q, [N, D, H] for o, [H, I] for gate/up, [I, H] for down).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kalm_jax.config import ModelConfig, parse_dtype
from kalm_jax.model import T5Gemma2, abstract_model

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
TIED_ALIASES = ("model.decoder.embed_tokens.weight", "model.decoder.embed_tokens.eoi_embedding",
                "lm_head.out_proj.weight")
PASSTHROUGH_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")
STACKS = {"encoder": "model.encoder.layers", "decoder": "model.decoder.layers"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: its name, PyTorch shape and where it lives in the NNX model."""

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]          # attribute path in the model, e.g. ("encoder", "q")
    layer: int | None              # index into the stacked leading axis, or None

    def to_ours(self, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return _to_ours(self.path[-1], t, cfg)

    def to_hf(self, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return _to_hf(self.path[-1], t, cfg)


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """All text tensors of the Hub layout for `cfg`, in a stable order (tied aliases omitted)."""
    h, n, k, d, i, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    shapes = {"q": (n * d, h), "k": (k * d, h), "v": (k * d, h), "o": (h, n * d), "q_norm": (d,),
              "k_norm": (d,), "pre_attn_norm": (h,), "post_attn_norm": (h,), "pre_ffw_norm": (h,),
              "post_ffw_norm": (h,), "gate": (i, h), "up": (i, h), "down": (h, i)}
    specs = [TensorSpec("model.encoder.embed_tokens.weight", (v, h), ("embedding",), None),
             TensorSpec("model.encoder.embed_tokens.eoi_embedding", (h,), ("eoi_embedding",), None)]
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


def canonical_name(name: str) -> str:
    """Maps in-memory transformers names (`model.encoder.text_model.*`) to the Hub layout."""
    return name.replace("model.encoder.text_model.", "model.encoder.", 1)


# ---------------------------------------------------------------------- safetensors access
class SafetensorsDir:
    """Read access to the safetensors of an HF checkpoint directory (single file or sharded index)."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: not a checkpoint directory")
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
            self.files = {name: self.root / f for name, f in weight_map.items()}
            missing = sorted({str(p) for p in self.files.values() if not p.exists()})
            if missing:
                raise FileNotFoundError(f"{index} names shard files that do not exist: {missing[:5]}")
        else:
            shards = sorted(self.root.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{self.root}: no *.safetensors files (and no model.safetensors.index.json)")
            from safetensors import safe_open
            self.files = {}
            for shard in shards:
                with safe_open(shard, framework="np") as f:
                    for name in f.keys():
                        self.files[name] = shard
        from safetensors import safe_open
        self._safe_open = safe_open
        self._handles: dict[Path, object] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {}

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = self._safe_open(file, framework="np")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.files)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._shapes:
            sl = self._handle(self.files[name]).get_slice(name)
            self._shapes[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        return self._handle(self.files[name]).get_tensor(name)

    def close(self):
        self._handles.clear()


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Reads and validates `config.json` of an HF checkpoint directory."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: missing (an HF checkpoint directory needs config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return ModelConfig.from_hf(raw, source=str(cfg_path))


def check_tensors(cfg: ModelConfig, available: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """Compares HF tensors {name: shape} with what `cfg` needs.

    Returns (problems, passthrough): human-readable problems (missing, mis-shaped, unexpected), and the
    names of vision/projector tensors that are carried but unused.
    """
    problems, passthrough = [], []
    expected = {s.hf_name: s.hf_shape for s in tensor_specs(cfg)}
    canon = {}
    for name, shape in available.items():
        c = canonical_name(name)
        if c.startswith(PASSTHROUGH_PREFIXES):
            passthrough.append(name)
        elif c in TIED_ALIASES:
            want = (cfg.vocab_size, cfg.hidden_size) if c.endswith("weight") else (cfg.hidden_size,)
            if tuple(shape) != want:
                problems.append(f"tied alias {name}: shape {tuple(shape)}, expected {want}")
        else:
            canon[c] = (name, tuple(shape))
    for name, shape in expected.items():
        if name not in canon:
            problems.append(f"missing tensor {name} (shape {shape})")
        elif canon[name][1] != shape:
            problems.append(f"tensor {canon[name][0]} has shape {canon[name][1]}, expected {shape}")
    for c, (name, shape) in canon.items():
        if c not in expected:
            problems.append(f"unexpected tensor {name} (shape {shape})")
    return problems, sorted(passthrough)


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))


def load(path: str | os.PathLike, dtype="float32", *, compute_dtype=None, progress: bool | None = None,
         ) -> tuple[ModelConfig, T5Gemma2]:
    """Loads an HF T5Gemma 2 / KaLM-Reranker-V1 checkpoint directory into the NNX model.

    Args:
      path: directory with `config.json` and `model.safetensors` (or shards + `model.safetensors.index.json`).
      dtype: parameter dtype ('float32' or 'bfloat16'); also the compute dtype unless `compute_dtype` is set.
      progress: show a progress bar (default: for checkpoints over 1 GiB).
    Returns:
      (config, model). Vision-tower tensors are not loaded; their names are kept in
      `model.hf_passthrough` (and the source directory in `model.hf_source`) so `save` can carry them.
    Raises:
      ValueError naming every missing, unexpected or mis-shaped tensor, or a wrong model type.
    """
    param_dtype = parse_dtype(dtype)
    cfg = read_config(path)
    st = SafetensorsDir(path)
    try:
        shapes = {name: st.shape_dtype(name)[0] for name in st.names()}
        problems, passthrough = check_tensors(cfg, shapes)
        if problems:
            head = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ValueError(f"{path}: checkpoint does not match its config.json ({len(problems)} problems):\n  "
                             f"{head}{more}")
        model = abstract_model(cfg, param_dtype=param_dtype, dtype=compute_dtype)
        by_canon = {canonical_name(n): n for n in st.names()}
        np_dtype = _np_dtype(param_dtype)
        specs = tensor_specs(cfg)
        total = sum(int(np.prod(s.hf_shape)) for s in specs) * np_dtype.itemsize
        show = progress if progress is not None else total > (1 << 30)
        buffers: dict[tuple[str, ...], np.ndarray] = {}
        for spec in tqdm(specs, desc=f"loading {Path(path).name}", unit="tensor", disable=not show):
            value = spec.to_ours(st.get(by_canon[spec.hf_name]), cfg).astype(np_dtype, copy=False)
            if spec.layer is None:
                _set(model, spec.path, value)
                continue
            buf = buffers.get(spec.path)
            if buf is None:
                var = _get(model, spec.path)
                buf = buffers[spec.path] = np.empty(var.get_value().shape, np_dtype)
            buf[spec.layer] = value
            if spec.layer == buf.shape[0] - 1:
                _set(model, spec.path, buffers.pop(spec.path))
    finally:
        st.close()
    model.hf_passthrough = tuple(passthrough)
    model.hf_source = str(Path(path).resolve())
    return cfg, model


def _get(model, path: tuple[str, ...]) -> nnx.Variable:
    obj = model
    for p in path:
        obj = getattr(obj, p)
    return obj


def _set(model, path: tuple[str, ...], value: np.ndarray) -> None:
    _get(model, path).set_value(jnp.asarray(value))


def iter_hf_tensors(model: T5Gemma2, dtype="bfloat16") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (Hub name, PyTorch-layout numpy tensor in `dtype`) for every text tensor, one at a time."""
    cfg = model.config
    np_dtype = _np_dtype(parse_dtype(dtype))
    for spec in tensor_specs(cfg):
        value = _get(model, spec.path).get_value()
        if spec.layer is not None:
            value = value[spec.layer]
        yield spec.hf_name, np.ascontiguousarray(spec.to_hf(np.asarray(value), cfg).astype(np_dtype))


__all__ = ["load", "read_config", "tensor_specs", "check_tensors", "iter_hf_tensors", "SafetensorsDir",
           "TensorSpec", "LAYER_NAMES", "TIED_ALIASES", "PASSTHROUGH_PREFIXES"]
