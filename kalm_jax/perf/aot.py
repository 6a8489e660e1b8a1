"""Ahead-of-time compilation for TPU topologies on any host (MaxText `train_compile`, T5X `precompile`).

With the TPU runtime library installed (`pip install 'kalm-jax[tpu]'`, i.e. the `libtpu` wheel that
matches jax), `jax.experimental.topologies` describes a TPU slice (e.g. v5e-256) without the hardware.
This module lowers and compiles, with abstract, sharded inputs (`jax.ShapeDtypeStruct(..., sharding=...)`),
the inference engine's own encode and score programs (on the mesh its policy, `kalm_jax.parallel.inference_policy`,
chooses for those devices) and the real train step (on the config's ("data", "fsdp", "tensor") mesh), and
reports per-device memory against the chip's HBM.

    kalm-aot --config=tpu.py:nano,v5e-256 --topology=v5e-256

A passing check guarantees: the shardings are consistent (every array splits over its mesh axes), the
program (including the Pallas TPU attention kernel) compiles for that chip generation and slice shape,
and XLA's static buffer assignment fits in HBM. It does not measure speed, and does not cover
host-side input or checkpoint I/O.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kalm_jax.perf import aot_cost
from kalm_jax.perf.flops import PEAK_BF16

GiB = 2**30

# HBM per JAX device (one chip; v4/v5p run both TensorCores as one "megacore" device).
HBM_BYTES: dict[str, int] = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
}
# Slice shapes (chips) by chip count. v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {
    1: (1, 1, 1),
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
_GEN = {  # user prefix -> (libtpu topology prefix, chip config, cores per chip named in the slice name)
    "v4": ("v4", "megacore", 2),
    "v5p": ("v5", "megacore", 2),
    "v5e": ("v5e", "default", 1),
    "v6e": ("v6e", "default", 1),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A TPU slice type such as v5e-256: generation, chip grid and the libtpu topology arguments."""

    name: str
    generation: str
    chips: int
    shape: tuple[int, ...]
    topology_name: str
    chip_config_name: str
    wrap: tuple[bool, bool, bool]

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES[self.generation]


def tpu_slice(name: str) -> TpuSlice:
    """Parses 'v5e-256', 'v5p-128', 'v4-32', 'v6e-8', ... into a `TpuSlice` (ValueError lists valid ones)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower().replace("v5litepod", "v5e"))
    if not m:
        raise ValueError(
            f"unknown TPU topology {name!r}; expected <generation>-<size> with generation in "
            f"{sorted(_GEN)}, e.g. v5e-256, v5p-128, v4-32, v6e-256"
        )
    gen, size = m.group(1), int(m.group(2))
    prefix, chip_config, per_chip = _GEN[gen]
    chips, rem = divmod(size, per_chip)
    table = _SHAPES_3D if per_chip == 2 else _SHAPES_2D
    if rem or chips not in table:
        valid = sorted(c * per_chip for c in table)
        raise ValueError(f"unsupported slice size {name!r}; valid sizes for {gen}: {valid}")
    shape = table[chips]
    if len(shape) == 3:  # full 4x4x4 cubes and larger are tori
        wrap = (True, True, True) if chips >= 64 else (False, False, False)
    else:
        wrap = (shape[0] == 16, shape[1] == 16, False)
    return TpuSlice(
        name=f"{gen}-{size}",
        generation=gen,
        chips=chips,
        shape=shape,
        topology_name=f"{prefix}:{'x'.join(map(str, shape))}",
        chip_config_name=chip_config,
        wrap=wrap,
    )


def topology_devices(sl: TpuSlice, num_slices: int = 1) -> list:
    """Compile-only devices of `num_slices` copies of the slice (needs the libtpu wheel, not the hardware)."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "AOT compilation for TPU needs the TPU runtime library: pip install 'kalm-jax[tpu]' "
            "(the libtpu wheel matching your jax version)"
        ) from None
    cphb = (2, 2, 1) if sl.chips >= 4 else (1, 1, 1)
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=sl.topology_name,
        chip_config_name=sl.chip_config_name,
        chips_per_host_bounds=cphb,
        num_slices=num_slices,
        wrap=sl.wrap,
    )
    return list(desc.devices)


# ---------------------------------------------------------------------- mesh and shardings
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


# ---------------------------------------------------------------------- memory report
@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device memory of one compiled program (bytes) against the chip's HBM."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int
    hbm: int
    compile_seconds: float
    error: str | None = None  # the compiler's out-of-memory message, when it refused the program

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @property
    def fits(self) -> bool:
        return self.error is None and self.total <= self.hbm

    @classmethod
    def from_compiled(cls, name: str, compiled, hbm: int, seconds: float) -> MemoryReport:
        m = compiled.memory_analysis()
        return cls(
            name,
            int(m.argument_size_in_bytes),
            int(m.output_size_in_bytes),
            int(m.alias_size_in_bytes),
            int(m.temp_size_in_bytes),
            int(m.generated_code_size_in_bytes),
            hbm,
            seconds,
        )


# e.g. "the total memory required for HLO temporaries (805.51G) exceeds available HBM (15.75G)"
_OOM_TOTAL = re.compile(r"\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM", re.I)


def _parse_oom(message: str) -> int:
    """Best-effort required bytes from an XLA TPU RESOURCE_EXHAUSTED message (0 when absent)."""
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    m = _OOM_TOTAL.search(message)
    return int(float(m.group(1)) * scale[m.group(2).upper()]) if m else 0


def compile_report(name: str, lower: Callable[[], Any], mesh, hbm: int) -> MemoryReport:
    """Lowers (under `jax.set_mesh(mesh)`, which the TPU attention kernel's shard_map needs) and compiles;
    an out-of-memory refusal by the compiler becomes a non-fitting report."""
    import jax

    t = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            lowered = lower()
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED when the program cannot fit in HBM
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        need = _parse_oom(msg)
        return MemoryReport(name, 0, 0, 0, need, 0, hbm, time.perf_counter() - t, error=msg.strip())
    return MemoryReport.from_compiled(name, compiled, hbm, time.perf_counter() - t)


def format_table(reports: Sequence[MemoryReport], title: str = "") -> str:
    """A fixed-width table, GiB per device, one row per program."""

    def g(b: int) -> str:
        return f"{b / GiB:10.3f}"

    head = (
        f"{'program':<12}{'args':>10}{'outputs':>10}{'aliased':>10}{'temps':>10}{'code':>10}{'total':>10}"
        f"{'HBM':>10}{'used':>7}{'compile':>9}  fits"
    )
    lines = ([title] if title else []) + [head + "   (GiB per device)", "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.name:<12}{g(r.arguments)}{g(r.outputs)}{g(r.aliased)}{g(r.temporaries)}"
            f"{g(r.generated_code)}{g(r.total)}{g(r.hbm)}{100 * r.total / r.hbm:6.0f}%"
            f"{r.compile_seconds:8.1f}s  {'yes' if r.fits else 'NO'}"
        )
        if r.error:
            lines.append(f"    compiler: {r.error.splitlines()[0][:300]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- programs
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
    layers: int | None = None,
):
    """The `InferenceEngine` a client would build on `devices` for the workload, over the abstract weights of
    the preset (`dtype` weights and compute; `layers`: see `model_config`; `analysis`: the cost-analysis
    variant): its mesh and weight layout come from the inference mesh policy (`kalm_jax.parallel.inference_policy`,
    `weights` its setting) for devices of `hbm_bytes`, its batch size is `w.eval_batch`. It only lowers
    programs (`encode_program`, `score_program`)."""

    from kalm_jax.inference.engine import InferenceEngine
    from kalm_jax.model.build import build_model
    from kalm_jax.model.options import analysis_options

    model = build_model(
        model_config(preset, layers),
        abstract=True,
        param_dtype=dtype,
        dtype=dtype,
        options=analysis_options() if analysis else None,
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
    )


def lower_encode(engine, w: Workload):
    """Lowering of the engine's encode program (`InferenceEngine.encode_program`: `programs.encode_pool` at the
    engine's bucket shape and shardings) for `w.eval_batch` passages of `w.passage_len` tokens at `w.ratio`."""
    program = engine.encode_program(w.eval_batch, w.passage_len, w.ratio)
    return program.lower


def lower_score(engine, w: Workload):
    """Lowering of the engine's score program (`InferenceEngine.score_program`: `programs.score_pairs`) for
    `w.eval_batch` pairs of `w.query_len`-token prompts over passages of `w.passage_len` tokens at `w.ratio`."""
    program = engine.score_program(w.eval_batch, w.query_len, -(-w.passage_len // w.ratio))
    return program.lower


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
        decoder_length=int(_get(cfg, "data.decoder_length", 0)) or w.query_len,
        shard_local_passages=True,
        options=analysis_options() if analysis else None,
    )  # as train.py runs it
    if not analysis:
        out(
            f"train: kalm_jax.training.step.make_train_step (lora={bool(cfg.lora.enabled)}, "
            f"ratios={tuple(cfg.mep.ratios)}, remat={bool(cfg.model.remat)}, "
            f"remat_policy={_get(cfg, 'model.remat_policy', 'nothing')})"
        )

    return ts.lower


# ---------------------------------------------------------------------- the compiler's cost model
# What the cost rows are computed from (the row's `analysis` field; `run` appends how layers were sampled).
ANALYSIS = "layers unrolled, XLA attention (kalm_jax.model.options.analysis_options)"

# Dense bf16 peak per JAX device (one chip), FLOP/s: the datasheet figures MFU is quoted against.


def useful_flops(program: str, cfg, preset: str, w: Workload) -> int:
    """Analytic useful FLOPs (`kalm_jax.perf.flops`) of one call of `program`, whole batch (all chips)."""
    from kalm_jax.model.config import get_preset
    from kalm_jax.perf import flops

    mc = get_preset(preset)
    if program == "encode":
        return w.eval_batch * flops.encoder_flops(mc, w.passage_len)
    if program == "score":
        return w.eval_batch * flops.decoder_flops(mc, w.query_len, flops.cached_states(w.passage_len, w.ratio))
    if program == "train":
        t = int(_get(cfg, "data.decoder_length", 0)) or w.query_len
        ratios = tuple(int(r) for r in _get(cfg, "mep.ratios", (w.ratio,)))
        return (
            w.batch_queries
            * w.group_size
            * flops.train_step_flops(mc, w.passage_len, ratios, t, lora=bool(_get(cfg, "lora.enabled", False)))
        )
    raise ValueError(f"unknown program {program!r}; valid: {list(PROGRAMS)}")


# Instructions without a cost model (`kalm_jax.perf.aot_cost`): XLA:TPU lowers an all-gather of fsdp-sharded
# weights to async slices joined by a `ConcatBitcast` custom call, and a Pallas kernel is a `tpu_custom_call`;
# each adds -1 to `optimal_seconds` (checked: nano encode on v5e-4 reports -3.991 with 4 ConcatBitcasts).
UNKNOWN_COST_CALLS = aot_cost.UNKNOWN_COST
MIN_FLOPS_RATIO = 0.95
"""A row whose XLA FLOPs are below this share of the useful FLOPs prints no MFU (the analysis misses work)."""


def cost_fields(compiled, generation: str = "v5e") -> dict[str, Any]:
    """flops, bytes accessed and optimal_seconds from `compiled.cost_analysis()` (per device).

    `optimal_seconds` is the compiler's roofline of the modelled instructions plus the instructions it does
    not model, as `aot_cost.account` counts them from the HLO (for a chip of `generation`): the -1 of each is
    added back and a data-movement op's bytes are timed at HBM bandwidth (`unknown_cost_ops` counts them,
    `unknown_cost_bytes` / `unknown_cost_seconds` are what was added, `unaccounted` names those whose cost
    the HLO does not show, `optimal_seconds_raw` keeps the raw figure); a result that is still not positive
    becomes -1 (unknown).
    """
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = dict(ca or {})
    raw = float(ca.get("optimal_seconds", -1.0))
    accounted = aot_cost.account(aot_cost.unknown_ops(compiled.as_text()), raw, generation)
    return {
        "xla_flops": float(ca.get("flops", -1.0)),
        "bytes_accessed": float(ca.get("bytes accessed", -1.0)),
        "optimal_seconds_raw": raw,
        **accounted,
    }


def cost_row(
    program: str,
    sl: TpuSlice,
    num_devices: int,
    num_slices: int,
    preset: str,
    w: Workload,
    useful_total: int,
    cost: Mapping[str, float],
    memory: MemoryReport | None,
    cfg=None,
    bytes_estimate: float | None = None,
) -> dict[str, Any]:
    """One `--report` row (JSON-ready); every figure per chip. The contract scripts rely on: `program`,
    `topology`, `xla_flops`, `useful_flops`, `bytes_accessed`, `optimal_seconds`, `predicted_mfu`.

    Every row has `unknown_cost_ops` (instructions without a cost model, `aot_cost`) and what they add
    (`unknown_cost_bytes`, `unknown_cost_seconds`); `predicted_mfu` is None, with the reason in `mfu_note`,
    when some are not accounted for (`unaccounted`) or XLA's FLOPs fall below `MIN_FLOPS_RATIO` of the
    useful FLOPs. `bytes_estimate` is the analytic bytes per chip given (`aot_cost.estimate_bytes`; None for
    the train step), `bytes_ratio` = `bytes_accessed` / `bytes_estimate`."""
    useful = useful_total / num_devices
    secs = cost["optimal_seconds"]
    ok = secs > 0
    peak = PEAK_BF16[sl.generation]
    ratio = cost["xla_flops"] / useful if useful else None
    row: dict[str, Any] = {
        "program": program,
        "topology": sl.name,
        "num_slices": num_slices,
        "devices": num_devices,
        "preset": preset,
        "n": w.passage_len,
        "r": w.ratio,
        "prompt_len": w.query_len,
        "xla_flops": cost["xla_flops"],
        "useful_flops": useful,
        "flops_ratio": ratio,
        "bytes_accessed": cost["bytes_accessed"],
        "optimal_seconds": secs,
        "optimal_seconds_raw": cost.get("optimal_seconds_raw", secs),
        "unknown_cost_ops": cost.get("unknown_cost_ops", 0),
        "unknown_cost_targets": dict(cost.get("unknown_cost_targets", {})),
        "unknown_cost_bytes": cost.get("unknown_cost_bytes", 0.0),
        "unknown_cost_seconds": cost.get("unknown_cost_seconds", 0.0),
        "unaccounted": list(cost.get("unaccounted", [])),
        "peak_flops": peak,
        "analysis": ANALYSIS,
    }
    note = aot_cost.mfu_note(row, MIN_FLOPS_RATIO) or (None if ok else "no MFU: optimal_seconds unknown")
    row["predicted_mfu"] = None if note else useful / (secs * peak)
    row["mfu_note"] = note
    row["bytes_estimate"] = bytes_estimate
    row["bytes_ratio"] = (
        cost["bytes_accessed"] / bytes_estimate if bytes_estimate and cost["bytes_accessed"] > 0 else None
    )
    per_chip = w.eval_batch / num_devices
    if program == "encode":
        row.update(
            batch=w.eval_batch,
            passages_per_s=per_chip / secs if ok else None,
            tokens_per_s=per_chip * w.passage_len / secs if ok else None,
        )
    elif program == "score":
        row.update(batch=w.eval_batch, pairs_per_s=per_chip / secs if ok else None)
    else:
        pairs = w.batch_queries * w.group_size / num_devices
        row.update(
            batch=w.batch_queries * w.group_size,
            ratios=list(_get(cfg, "mep.ratios", ())),
            examples_per_s=pairs / secs if ok else None,
            queries_per_s=w.batch_queries / num_devices / secs if ok else None,
        )
    if memory is not None:
        row.update(
            memory_total_bytes=memory.total,
            memory_temp_bytes=memory.temporaries,
            hbm_bytes=memory.hbm,
            fits=memory.fits,
        )
    return row


def analyse(name: str, lower: Callable[[], Any], mesh, generation: str = "v5e") -> tuple[dict[str, Any], str | None]:
    """Compiles the analysis variant and returns its cost fields (or -1s and the compiler's refusal)."""
    import jax

    try:
        with jax.set_mesh(mesh):
            lowered = lower()
        return cost_fields(lowered.compile(), generation), None
    except Exception as e:
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        return (
            {
                "xla_flops": -1.0,
                "bytes_accessed": -1.0,
                "optimal_seconds": -1.0,
                "optimal_seconds_raw": -1.0,
                "unknown_cost_ops": 0,
            },
            msg.strip().splitlines()[0],
        )


ANALYSIS_LAYERS = ("all", "sampled")
_COST_KEYS = ("xla_flops", "bytes_accessed", "optimal_seconds", "optimal_seconds_raw", "unknown_cost_ops")
_ACCOUNTED_KEYS = ("unknown_cost_bytes", "unknown_cost_seconds")


def layer_samples(types: Sequence[str]) -> tuple[int, ...]:
    """Layer counts whose analysis compiles determine a per-layer-type cost model of a stack with layer
    types `types`: 2, 3 and one whole period of the pattern (e.g. 2, 3, 6 for 5 sliding + 1 full), or
    more when those do not separate the types. Not 1: a one-layer program gathers its weights differently
    (no combined all-gathers), and its bytes do not sit on the line through the others. () when the
    samples would not be smaller than the stack itself (compile it whole)."""
    from kalm_jax.model.t5gemma2 import layer_period

    kinds = sorted(set(types))
    p, _ = layer_period(tuple(types))
    for ks in ((2, 3, p), (2, 3, p, p + 1), tuple(range(2, len(types)))):
        ks = tuple(sorted({k for k in ks if 1 < k < len(types)}))
        if ks and np.linalg.matrix_rank(_design(types, ks, kinds)) == len(kinds) + 1:
            return ks
    return ()


def _design(types: Sequence[str], samples: Sequence[int], kinds: Sequence[str]):
    """[len(samples), 1 + len(kinds)]: a constant and the number of layers of each type in each sample."""
    return np.array([[1.0] + [float(list(types[:k]).count(t)) for t in kinds] for k in samples])


def extrapolate_costs(types: Sequence[str], sampled: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Cost fields of the whole stack from `sampled` (layer count -> `cost_fields` of a model truncated to
    that many layers in each stack), fitted as constant + per-layer-type cost (exact for the FLOPs and
    bytes of unrolled layers: each layer is the same program as in the full model) and evaluated at the
    full layer counts. Raises ValueError when a sample failed (a cost of -1)."""
    kinds = sorted(set(types))
    ks = sorted(sampled)
    a = _design(types, ks, kinds)
    target = _design(types, [len(types)], kinds)[0]
    out: dict[str, float] = {}
    for key in _COST_KEYS:
        y = np.array([float(sampled[k].get(key, -1.0)) for k in ks])
        if key in ("xla_flops", "bytes_accessed", "optimal_seconds") and (y <= 0).any():
            raise ValueError(f"the {key} of a sampled analysis compile is unknown: {dict(zip(ks, y.tolist()))}")
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        out[key] = float(target @ coef)
    for key in _ACCOUNTED_KEYS:  # what the unknown-cost instructions add, when every sample says
        if all(key in sampled[k] for k in ks):
            coef, *_ = np.linalg.lstsq(a, np.array([float(sampled[k][key]) for k in ks]), rcond=None)
            out[key] = float(target @ coef)
    out["unknown_cost_ops"] = int(round(out["unknown_cost_ops"]))
    out["unaccounted"] = sorted({t for k in ks for t in sampled[k].get("unaccounted", [])})
    out["unknown_cost_targets"] = dict(sampled[ks[-1]].get("unknown_cost_targets", {}))
    return out


def format_cost_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width table of `--report` rows (per chip; the compiler's predictions, not measurements)."""
    head = (
        f"{'program':<8}{'topology':>9}{'preset':>7}{'n':>6}{'r':>4}{'xla TF':>9}{'useful TF':>10}"
        f"{'ratio':>7}{'GB acc':>8}{'GB est':>8}{'unk':>5}{'opt ms':>9}{'MFU':>7}  throughput per chip"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["program"] == "encode":
            tput = f"{r.get('passages_per_s') or 0:,.0f} passages/s, {r.get('tokens_per_s') or 0:,.0f} tok/s"
        elif r["program"] == "score":
            tput = f"{r.get('pairs_per_s') or 0:,.0f} pairs/s"
        else:
            tput = f"{r.get('examples_per_s') or 0:,.1f} pairs/s"
        mfu = f"{100 * r['predicted_mfu']:6.1f}%" if r.get("predicted_mfu") else "    n/a"
        est = f"{r['bytes_estimate'] / 1e9:8.2f}" if r.get("bytes_estimate") else f"{'-':>8}"
        lines.append(
            f"{r['program']:<8}{r['topology']:>9}{r['preset']:>7}{r['n']:>6}{r['r']:>4}"
            f"{r['xla_flops'] / 1e12:9.3f}{r['useful_flops'] / 1e12:10.3f}{r['flops_ratio'] or 0:7.3f}"
            f"{r['bytes_accessed'] / 1e9:8.2f}{est}{r.get('unknown_cost_ops', 0):5d}"
            f"{r['optimal_seconds'] * 1e3:9.2f}{mfu}  {tput}"
        )
        if r.get("mfu_note"):
            lines.append(f"    {r['mfu_note']}")
        if r.get("analysis_error"):
            lines.append(f"    compiler: {r['analysis_error'][:300]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- config-driven entry point
def _get(cfg, dotted: str, default):
    node = cfg
    for key in dotted.split("."):
        if node is None or key not in node:
            return default
        node = node[key]
    return node


def workload_from_config(cfg) -> Workload:
    """Reads the training config keys (data.batch_size, data.group_size, data.max_document_tokens,
    data.max_query_tokens, eval.ratio, eval.batch_size); missing keys keep the `Workload` defaults."""
    d = Workload()
    return Workload(
        batch_queries=int(_get(cfg, "data.batch_size", d.batch_queries)),
        group_size=int(_get(cfg, "data.group_size", d.group_size)),
        passage_len=int(_get(cfg, "data.max_document_tokens", d.passage_len)),
        query_len=int(_get(cfg, "data.max_query_tokens", d.query_len)),
        ratio=int(_get(cfg, "eval.ratio", d.ratio)),
        eval_batch=int(_get(cfg, "eval.batch_size", d.eval_batch)),
    )


PROGRAMS = ("encode", "score", "train")


@dataclasses.dataclass
class AotResult:
    """What `run` found: one memory report per program and, with `cost=True`, one cost row per program."""

    memory: list[MemoryReport]
    cost: list[dict[str, Any]]
    mesh_shape: dict[str, int]


def mesh_for(cfg, devices: Sequence, num_slices: int = 1):
    """The config's ("data", "fsdp", "tensor") mesh over `devices` and its normalised logical rules."""
    from kalm_jax.parallel import mesh as mesh_lib

    sizes = {a: int(_get(cfg, f"mesh.{a}", -1 if a == "data" else 1)) for a in mesh_lib.MESH_AXES}
    try:
        mesh = mesh_lib.make_mesh(sizes, devices, num_slices=num_slices)
    except ValueError as e:
        hint = (
            (
                f" (for --num_slices={num_slices} pass the slice count to the config too, e.g. "
                f"--config=tpu.py:<preset>,<topology>,{num_slices})"
            )
            if num_slices > 1
            else ""
        )
        raise ValueError(f"config mesh {sizes} on {len(devices)} devices: {e}{hint}") from None
    return mesh, mesh_lib.rules_dict(_get(cfg, "logical_axis_rules", None))


def run(
    cfg,
    topology: str,
    num_slices: int = 1,
    programs: Sequence[str] = PROGRAMS,
    out=print,
    cost: bool = False,
    analysis_layers: str = "all",
    weights: str | None = None,
) -> AotResult:
    """AOT-compiles `programs` for `num_slices` x `topology` with the config's model, mesh and batch.

    Prints the mesh, the workload and the per-device memory table. With `cost`, also compiles each
    program's analysis variant (`options.analysis_options`: layers unrolled, einsum attention) and returns
    the compiler's cost model per chip beside the analytic useful FLOPs (`cost_row`). `analysis_layers`:
    "all" unrolls every layer; "sampled" compiles the analysis variant at `layer_samples` layers per stack
    and extrapolates per layer type (`extrapolate_costs`), for programs too large to unroll whole on the host.

    `encode` and `score` are the inference engine's own programs (`InferenceEngine.encode_program` /
    `score_program`) on the mesh its policy (`kalm_jax.parallel.inference_policy`, setting `weights`) chooses for the
    slice, with bf16 weights and `eval.batch_size` rows per call; `train` is the real train step on the
    config's training mesh. One line is printed as each compile starts and as it ends (with its time).
    """
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise ValueError(f"unknown programs {unknown}; valid: {list(PROGRAMS)}")
    if analysis_layers not in ANALYSIS_LAYERS:
        raise ValueError(f"analysis_layers={analysis_layers!r}; valid: {list(ANALYSIS_LAYERS)}")
    sl = tpu_slice(topology)
    devices = topology_devices(sl, num_slices)
    mesh, rules = mesh_for(cfg, devices, num_slices)
    w = workload_from_config(cfg)
    preset = str(_get(cfg, "model.preset", "tiny"))
    out(
        f"{num_slices} x {sl.name} ({sl.topology_name}, {len(devices)} devices, "
        f"{sl.hbm_bytes / GiB:.0f} GiB HBM each); training mesh {dict(mesh.shape)}; model {preset}"
    )
    out(f"workload: {w}")
    started = time.perf_counter()

    def engine(analysis: bool, layers: int | None):
        return inference_engine(
            preset, devices, w, hbm_bytes=sl.hbm_bytes, weights=weights, analysis=analysis, layers=layers
        )

    policy = None
    if any(p in ("encode", "score") for p in programs):
        policy = engine(False, None).policy
        out(f"encode, score: the inference engine's programs; {policy.describe()}")

    def builder(name: str, analysis: bool, layers: int | None = None):
        if name == "encode":
            return lower_encode(engine(analysis, layers), w)
        if name == "score":
            return lower_score(engine(analysis, layers), w)
        return lower_train(cfg, preset, mesh, w, analysis=analysis, layers=layers, out=out)

    samples: tuple[int, ...] = ()
    if cost and analysis_layers == "sampled":
        mc = model_config(preset)
        if mc.encoder_layer_types != mc.decoder_layer_types:
            raise ValueError(
                "analysis_layers=sampled truncates both stacks alike: it needs equal encoder and decoder layer types"
            )
        types = mc.encoder_layer_types
        samples = layer_samples(types)
    reports, rows = [], []
    total = len(programs) * (1 + (len(samples) or 1 if cost else 0))
    done = 0

    def step(what: str, fn: Callable[..., Any], *args):
        nonlocal done
        done += 1
        out(f"[{done}/{total}] compiling {what} ...")
        sys.stdout.flush()
        t = time.perf_counter()
        result = fn(*args)
        out(
            f"[{done}/{total}] {what}: {time.perf_counter() - t:.1f}s "
            f"({time.perf_counter() - started:.0f}s since start)"
        )
        sys.stdout.flush()
        return result

    for name in programs:
        memory = step(f"{name} (the real program)", compile_report, name, builder(name, False), mesh, sl.hbm_bytes)
        reports.append(memory)
        if not cost:
            continue
        if samples:
            sampled, err = {}, None
            for k in samples:
                sampled[k], err = step(
                    f"{name} analysis variant, {k} layer(s) per stack",
                    analyse,
                    name,
                    builder(name, True, k),
                    mesh,
                    sl.generation,
                )
                if err:
                    err = f"{k}-layer sample: {err}"
                    break
            fields = sampled[k] if err else extrapolate_costs(types, sampled)
        else:
            fields, err = step(f"{name} analysis variant", analyse, name, builder(name, True), mesh, sl.generation)
        estimate = (
            None
            if name == "train"
            else aot_cost.estimate_bytes(name, model_config(preset), w, len(devices), policy.tensor)
        )
        row = cost_row(
            name,
            sl,
            len(devices),
            num_slices,
            preset,
            w,
            useful_flops(name, cfg, preset, w),
            fields,
            memory,
            cfg,
            bytes_estimate=estimate,
        )
        if samples:
            row["analysis"] += f"; extrapolated per layer type from {list(samples)} layers per stack"
            row["analysis_samples"] = {str(k): v for k, v in sampled.items()}
        if err:
            row["analysis_error"] = err
        rows.append(row)
    out(format_table(reports, title=f"per-device memory on {num_slices} x {sl.name}"))
    if rows:
        out("the compiler's cost model per chip (predictions, not measurements):")
        out(format_cost_table(rows))
    out(f"{done} compiles in {time.perf_counter() - started:.0f}s")
    return AotResult(reports, rows, dict(mesh.shape))


def check(
    cfg,
    topology: str | None = None,
    num_slices: int = 1,
    programs: str = ",".join(PROGRAMS),
    report: str | None = None,
    analysis_layers: str = "all",
    weights: str | None = None,
) -> int:
    """The CLI's work: compile `programs` for the slice and print whether they fit; 0 fits, 1 does not."""
    from kalm_jax import cli

    if not topology:
        raise cli.ConfigError("--topology is required (the TPU slice type, e.g. v5e-256, v5p-128, v4-32, v6e-256)")
    result = run(
        cfg,
        topology,
        num_slices,
        [s for s in programs.split(",") if s],
        cost=report is not None,
        analysis_layers=analysis_layers,
        weights=weights,
    )
    if report:
        from kalm_jax.perf.bench.runner import write_rows

        write_rows(result.cost, Path(report))
        print(f"wrote {len(result.cost)} cost rows to {report}")
    reports = result.memory
    bad = [r for r in reports if not r.fits]
    if bad:
        print(
            "does not fit: "
            + "; ".join(f"{r.name} needs {r.total / GiB:.2f} GiB per device, HBM is {r.hbm / GiB:.0f} GiB" for r in bad)
        )
        return 1
    print("fits: every program compiled within HBM")
    return 0
