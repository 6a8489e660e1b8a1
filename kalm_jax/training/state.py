"""The train state and its parts: a plain pytree, so Orbax, shardings and AOT lowering see plain arrays.

    state = {"step": int32 [],                    # micro-steps done
             "params": <param tree>,              # every parameter incl. LoRA factors, the
                                                  # `t5gemma2.param_tree(model)` layout
             "opt_state": <optax state over the trainable subset>}

The trainable subset is every parameter in full fine-tuning and only the LoRA factors with LoRA. The model
itself comes from `kalm_jax.model.build.build_model`; `model_kwargs` turns a training config into its arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kalm_jax.model.build import LoRASpec
from kalm_jax.model.options import ModelOptions

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


def lora_spec(train_cfg: Any, *, dtype="float32") -> LoRASpec | None:
    """The config's `lora` section as a `LoRASpec` (None unless `lora.enabled`), factors stored in `dtype`."""
    if not train_cfg.lora.enabled:
        return None
    return LoRASpec(
        int(train_cfg.lora.rank),
        float(train_cfg.lora.alpha),
        tuple(train_cfg.lora.targets),
        tuple(train_cfg.lora.stacks),
        dtype=str(dtype),
    )


def model_options(train_cfg: Any, options: ModelOptions | None = None) -> ModelOptions:
    """`options` (default `ModelOptions()`) with the config's `model.remat` and `model.remat_policy`, and the
    reference MLP (``tpu_mlp="xla"``: the fused kernel's backward would recompute the sub-block in XLA)."""
    return (options or ModelOptions()).replace(
        remat=bool(train_cfg.model.remat), remat_policy=str(train_cfg.model.remat_policy), tpu_mlp="xla"
    )


def model_kwargs(train_cfg: Any, *, options: ModelOptions | None = None, lora_dtype="float32") -> dict[str, Any]:
    """The `build_model` arguments of a training config: its dtypes (`model.param_dtype`,
    `model.compute_dtype`), LoRA (`lora`, factors stored in `lora_dtype`) and options (`model_options`).

        build_model(model_cfg, abstract=True, **model_kwargs(train_cfg))   # the train step's abstract state
    """
    return {
        "lora": lora_spec(train_cfg, dtype=lora_dtype),
        "param_dtype": str(train_cfg.model.param_dtype),
        "dtype": str(train_cfg.model.compute_dtype),
        "options": model_options(train_cfg, options),
    }


__all__ = [
    "split_params",
    "merge_params",
    "trainable_predicate",
    "is_lora_path",
    "lora_spec",
    "model_options",
    "model_kwargs",
]
