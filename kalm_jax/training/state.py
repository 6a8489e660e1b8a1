"""The train state and its parts: a plain pytree, so Orbax, shardings and AOT lowering see plain arrays.

    state = {"step": int32 [],                    # micro-steps done
             "params": <param tree>,              # every parameter incl. LoRA factors, the
                                                  # `orbax_io.param_tree(model)` layout
             "opt_state": <optax state over the trainable subset>}

The trainable subset is every parameter in full fine-tuning and only the LoRA factors with LoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from kalm_jax.model.config import ModelConfig, parse_dtype
from kalm_jax.model.t5gemma2 import T5Gemma2

LORA_SUFFIXES = ("_lora_a", "_lora_b")


def is_lora_path(path: tuple[str, ...]) -> bool:
    return str(path[-1]).endswith(LORA_SUFFIXES)


def trainable_predicate(lora: bool) -> Callable[[tuple[str, ...]], bool]:
    """Which parameter paths the optimiser updates: LoRA factors only, or everything."""
    return is_lora_path if lora else (lambda path: True)


def split_params(params: dict, trainable: Callable[[tuple[str, ...]], bool], _path=()) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; each holds only its own leaves (empty sub-dicts dropped)."""
    a: dict = {}
    b: dict = {}
    for k, v in params.items():
        path = (*_path, k)
        if isinstance(v, dict):
            sa, sb = split_params(v, trainable, path)
            if sa:
                a[k] = sa
            if sb:
                b[k] = sb
        elif trainable(path):
            a[k] = v
        else:
            b[k] = v
    return a, b


def merge_params(a: dict, b: dict) -> dict:
    """Inverse of `split_params`: the union of two disjoint nested dicts."""
    out = dict(b)
    for k, v in a.items():
        out[k] = merge_params(v, out[k]) if isinstance(v, dict) and k in out else v
    return out


def build_model(model_cfg: ModelConfig, train_cfg: Any, *, seed: int = 0, abstract: bool = True) -> T5Gemma2:
    """The model (abstract by default) described by `model_cfg` and the `model`/`lora` config sections."""

    def make():
        m = T5Gemma2(
            model_cfg,
            param_dtype=parse_dtype(train_cfg.model.param_dtype),
            dtype=parse_dtype(train_cfg.model.compute_dtype),
            rngs=nnx.Rngs(seed),
        )
        if train_cfg.lora.enabled:
            m.add_lora(
                int(train_cfg.lora.rank),
                float(train_cfg.lora.alpha),
                tuple(train_cfg.lora.targets),
                stacks=tuple(train_cfg.lora.stacks),
                rngs=nnx.Rngs(seed + 1),
            )
        m.remat = bool(train_cfg.model.remat)
        m.remat_policy = str(train_cfg.model.remat_policy)
        return m

    return nnx.eval_shape(make) if abstract else make()


def configure_for_training(model: T5Gemma2, train_cfg: Any, *, seed: int = 0) -> T5Gemma2:
    """Adds LoRA factors (when enabled and absent) and sets remat/compute dtype on a concrete model."""
    if train_cfg.lora.enabled and not model.has_lora:
        model.add_lora(
            int(train_cfg.lora.rank),
            float(train_cfg.lora.alpha),
            tuple(train_cfg.lora.targets),
            stacks=tuple(train_cfg.lora.stacks),
            rngs=nnx.Rngs(seed + 1),
        )
    model.remat = bool(train_cfg.model.remat)
    model.remat_policy = str(train_cfg.model.remat_policy)
    model.dtype = parse_dtype(train_cfg.model.compute_dtype)
    pdt = parse_dtype(train_cfg.model.param_dtype)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(pdt) if x.dtype != pdt else x, state)
    return nnx.merge(graphdef, state)


def param_tree(model: T5Gemma2) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


__all__ = [
    "split_params",
    "merge_params",
    "trainable_predicate",
    "is_lora_path",
    "build_model",
    "configure_for_training",
    "param_tree",
]
