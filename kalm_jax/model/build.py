"""The one way to build a `T5Gemma2`: random or abstract, with or without LoRA, in any dtypes and options.

    model = build_model(config)                                       # random weights, seed 0, fp32
    model = build_model(config, abstract=True, param_dtype="bfloat16")  # jax.ShapeDtypeStruct leaves
    model = build_model(config, lora=LoRASpec(rank=8, alpha=16.0), options=ModelOptions(remat=True))
    model = build_model(config, base=loaded, lora=LoRASpec(8, 16.0))   # a loaded model, LoRA wired in

Every model in the package comes from here: checkpoint loaders build the abstract model they restore into,
the train step builds its abstract state, training builds (or wires) the model it trains, the AOT tools
build the program's model.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from kalm_jax.model.config import ModelConfig, parse_dtype
from kalm_jax.model.options import ModelOptions
from kalm_jax.model.t5gemma2 import LORA_TARGETS_DEFAULT, STACKS, LoRAParam, T5Gemma2


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """LoRA adapters to add: factors A [L, *in, rank] and B [L, rank, *out] on `targets` of `stacks`, scaled by
    alpha / rank (`LayerStack.add_lora`). The factors are drawn in fp32 and stored in `dtype`."""

    rank: int = 96
    alpha: float = 48.0
    targets: tuple[str, ...] = LORA_TARGETS_DEFAULT
    stacks: tuple[str, ...] = STACKS
    dtype: str = "float32"

    @classmethod
    def from_meta(cls, meta: dict | None) -> LoRASpec | None:
        """The spec of a checkpoint's `lora` entry ({"rank", "alpha", "targets", "stacks"}; None: no LoRA)."""
        if not meta:
            return None
        return cls(int(meta["rank"]), meta["alpha"], tuple(meta["targets"]), tuple(meta["stacks"]))


def build_model(
    config: ModelConfig,
    *,
    lora: LoRASpec | None = None,
    abstract: bool = False,
    seed: int = 0,
    param_dtype="float32",
    dtype=None,
    options: ModelOptions | None = None,
    base: T5Gemma2 | None = None,
) -> T5Gemma2:
    """A `T5Gemma2` of `config`.

    Args:
      config: the model hyper-parameters.
      lora: LoRA adapters to add (None: none); their factors are drawn from `nnx.Rngs(seed + 1)`.
      abstract: leaves are `jax.ShapeDtypeStruct`s (shapes without allocating: counts, AOT, loading targets).
      seed: the weights are drawn from `nnx.Rngs(seed)`.
      param_dtype: storage dtype of the parameters (fp32 master weights for training; bf16 for serving).
      dtype: compute dtype (default: param_dtype).
      options: the run-time switches (`ModelOptions`); default `ModelOptions()`, with `base` base's own.
      base: a concrete model to build on instead of random weights (fine-tuning a loaded checkpoint): it
        gets `options` and `dtype`, the LoRA adapters of `lora` unless it has adapters already, and its
        parameters are cast to `param_dtype` (its LoRA factors to `lora.dtype`, to param_dtype without
        `lora`). The model returned replaces `base`.
    """
    if base is not None and abstract:
        raise ValueError("build_model: base= is a concrete model; abstract=True builds a new one")
    pdt = parse_dtype(param_dtype)
    lora_dt = parse_dtype(lora.dtype) if lora is not None else pdt

    def make() -> T5Gemma2:
        if base is None:
            model = T5Gemma2(config, param_dtype=pdt, dtype=dtype, options=options, rngs=nnx.Rngs(seed))
        else:
            model = base
            model.dtype = parse_dtype(dtype) if dtype is not None else pdt
            if options is not None:
                model.options = options
        if lora is not None and not model.has_lora:
            model.add_lora(
                lora.rank, lora.alpha, tuple(lora.targets), stacks=tuple(lora.stacks), rngs=nnx.Rngs(seed + 1)
            )
        return cast_params(model, pdt, lora_dt)

    return nnx.eval_shape(make) if abstract else make()


def cast_params(model: T5Gemma2, param_dtype, lora_dtype=None) -> T5Gemma2:
    """`model` with its weights in `param_dtype` and its LoRA factors in `lora_dtype` (default param_dtype);
    the same object when nothing changes dtype."""
    pdt = parse_dtype(param_dtype)
    ldt = parse_dtype(lora_dtype) if lora_dtype is not None else pdt
    graphdef, factors, weights = nnx.split(model, LoRAParam, ...)

    def to(dt):
        return lambda x: x if x.dtype == dt else x.astype(dt)

    if all(x.dtype == ldt for x in jax.tree.leaves(factors)) and all(x.dtype == pdt for x in jax.tree.leaves(weights)):
        return model
    return nnx.merge(graphdef, jax.tree.map(to(ldt), factors), jax.tree.map(to(pdt), weights))


__all__ = ["LoRASpec", "build_model", "cast_params"]
