"""The programs the AOT check compiles: the workload, abstract sharded inputs, the inference engine's encode and
score programs for a topology and the real train step."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

PROGRAMS = ("encode", "score", "train")
"""The programs the check can compile."""

# Axes, rules and mesh building live in the one mesh module, `kalm_jax.parallel.mesh` (training and the engine use
# it too).


def abstract_state(state, mesh, rules: Mapping[str, Any]):
    """The NNX state with every array replaced by a sharded `jax.ShapeDtypeStruct` (from `out_sharding`)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from kalm_jax.parallel.mesh import logical_to_spec

    def one(var):
        value = var.get_value()
        axes = getattr(var, "out_sharding", None) or (None,) * len(value.shape)
        sharding = NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules))
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_input(shape: Sequence[int], dtype, mesh, rules: Mapping[str, Any]):
    """A sharded abstract batch array: leading dim on the "batch" rule (ValueError if it does not split)."""
    import jax
    from jax.sharding import NamedSharding

    from kalm_jax.parallel.mesh import batch_spec, check_batch

    check_batch(int(shape[0]), mesh, rules)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, batch_spec(len(shape), mesh, rules)))


def config_value(cfg, dotted: str, default):
    node = cfg
    for key in dotted.split("."):
        if node is None or key not in node:
            return default
        node = node[key]
    return node


@dataclasses.dataclass(frozen=True)
class Workload:
    """Shapes of one AOT check (global sizes; the batch dims are split over the batch mesh axes)."""

    batch_queries: int = 128  # training queries per step
    group_size: int = 16  # passages per query (1 positive + negatives)
    passage_len: int = 512
    query_len: int = 128  # decoder prompt length of the score program
    ratio: int = 4  # MEP ratio of the passage states the decoder reads
    eval_batch: int = 2048  # passages per encode call and pairs per score call


def model_config(preset: str, layers: int | None = None):
    """The preset's `ModelConfig`; with `layers`, only the first `layers` layers of each stack (the samples
    of `analysis_layers="sampled"`)."""
    from kalm_jax.model.config import get_preset

    mc = get_preset(preset)
    if layers is None:
        return mc
    return dataclasses.replace(
        mc, encoder_layer_types=mc.encoder_layer_types[:layers], decoder_layer_types=mc.decoder_layer_types[:layers]
    )


def inference_engine(
    preset: str,
    devices: Sequence,
    w: Workload,
    dtype: str = "bfloat16",
    *,
    hbm_bytes: int | None = None,
    weights: str | None = None,
    analysis: bool = False,
    einsum_attention: bool = False,
    layers: int | None = None,
    quantization: str | None = None,
    device_states: str = "compute",
):
    """The `InferenceEngine` a client would build on `devices` for the workload, over the abstract weights of
    the preset (`dtype` weights and compute; `layers`: see `model_config`; `analysis`: the cost-analysis
    variant; `einsum_attention`: that variant with the einsum attention instead of the engine's kernel, as
    `options.analysis_options` takes it): its mesh and weight layout come from the inference mesh policy
    (`kalm_jax.parallel.inference_policy`, `weights` its setting) for devices of `hbm_bytes`, its batch size
    is `w.eval_batch`; `quantization` is the engine's (`kalm_jax.model.quantization.MODES`: the abstract
    model quantizes abstractly, so the programs are those of the quantized engine); `device_states` is the
    engine's too ("int8": the score program takes int8 passage states + an fp32 scale per window). It only
    lowers programs (`encode_program`, `score_program`)."""

    from kalm_jax.inference.engine import InferenceEngine
    from kalm_jax.model.build import build_model
    from kalm_jax.model.options import analysis_options

    model = build_model(
        model_config(preset, layers),
        abstract=True,
        param_dtype=dtype,
        dtype=dtype,
        options=analysis_options(einsum_attention=einsum_attention) if analysis else None,
    )
    return InferenceEngine(
        model,
        devices=list(devices),
        batch_size=w.eval_batch,
        max_document_tokens=w.passage_len,
        max_prompt_tokens=w.query_len,
        yes_id=1,
        no_id=2,
        weights=weights,
        device_memory=hbm_bytes,
        show_progress=False,
        quantization=quantization,
        device_states=device_states,
    )


def engine_program(engine, name: str, w: Workload):
    """The engine's `name` program ("encode" or "score", an `InferenceEngine.Program`: the jitted function and
    the arguments the engine calls it with) for the workload: `encode_program` for `w.eval_batch` passages of
    `w.passage_len` tokens at `w.ratio`; `score_program` for `w.eval_batch` pairs of `w.query_len`-token
    prompts over passages of `w.passage_len` tokens at `w.ratio`."""
    if name == "encode":
        return engine.encode_program(w.eval_batch, w.passage_len, w.ratio)
    if name == "score":
        return engine.score_program(w.eval_batch, w.query_len, -(-w.passage_len // w.ratio))
    raise ValueError(f"no engine program {name!r}")


def lower_encode(engine, w: Workload):
    """Lowering of the engine's encode program (`engine_program`: `programs.encode_pool` at the engine's bucket
    shape and shardings)."""
    return engine_program(engine, "encode", w).lower


def lower_score(engine, w: Workload):
    """Lowering of the engine's score program (`engine_program`: `programs.score_pairs`)."""
    return engine_program(engine, "score", w).lower


def lower_train(cfg, preset: str, mesh, w: Workload, *, analysis: bool = False, layers: int | None = None, out=print):
    """Lowering of the real training step, `kalm_jax.training.step.make_train_step` (the config must be a
    full training config: the `tpu.py` or `train.py` config)."""
    from kalm_jax.model.options import analysis_options
    from kalm_jax.training import step as train_step
    from kalm_jax.training.config import validate

    missing = [k for k in ("loss", "optimizer", "mep", "lora", "data") if k not in cfg]
    if missing:
        raise ValueError(
            f"the train program needs a full training config; sections {missing} are missing "
            "(use --config=tpu.py:... or --config=train.py:...)"
        )
    validate(cfg)
    ts = train_step.make_train_step(
        model_config(preset, layers),
        cfg,
        mesh,
        yes_id=1,
        no_id=2,
        decoder_length=int(config_value(cfg, "data.decoder_length", 0)) or w.query_len,
        shard_local_passages=True,
        options=analysis_options(einsum_attention=True) if analysis else None,
    )  # as train.py runs it
    if not analysis:
        out(
            f"train: kalm_jax.training.step.make_train_step (lora={bool(cfg.lora.enabled)}, "
            f"ratios={tuple(cfg.mep.ratios)}, remat={bool(cfg.model.remat)}, "
            f"remat_policy={config_value(cfg, 'model.remat_policy', 'nothing')})"
        )

    return ts.lower


def workload_from_config(cfg) -> Workload:
    """Reads the training config keys (data.batch_size, data.group_size, data.max_document_tokens,
    data.max_query_tokens, eval.ratio, eval.batch_size); missing keys keep the `Workload` defaults."""
    d = Workload()
    return Workload(
        batch_queries=int(config_value(cfg, "data.batch_size", d.batch_queries)),
        group_size=int(config_value(cfg, "data.group_size", d.group_size)),
        passage_len=int(config_value(cfg, "data.max_document_tokens", d.passage_len)),
        query_len=int(config_value(cfg, "data.max_query_tokens", d.query_len)),
        ratio=int(config_value(cfg, "eval.ratio", d.ratio)),
        eval_batch=int(config_value(cfg, "eval.batch_size", d.eval_batch)),
    )
