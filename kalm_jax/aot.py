"""Ahead-of-time compilation for TPU topologies on any host (MaxText `train_compile`, T5X `precompile`).

With the TPU runtime library installed (`pip install 'kalm-jax[tpu]'`, i.e. the `libtpu` wheel that
matches jax), `jax.experimental.topologies` describes a TPU slice (e.g. v5e-256) without the hardware.
This module builds the ("data", "fsdp", "tensor") mesh of a config over those devices, lowers and
compiles the jitted encode, score and train steps with abstract, sharded inputs
(`jax.ShapeDtypeStruct(..., sharding=...)`), and reports per-device memory against the chip's HBM.

    python -m kalm_jax.aot --config=configs/tpu.py:nano,v5e-256 --topology=v5e-256

A passing check guarantees: the shardings are consistent (every array splits over its mesh axes), the
program (including the Pallas TPU attention kernel) compiles for that chip generation and slice shape,
and XLA's static buffer assignment fits in HBM. It does not measure speed, and does not cover
host-side input or checkpoint I/O.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
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
        raise ValueError(f"unknown TPU topology {name!r}; expected <generation>-<size> with generation in "
                         f"{sorted(_GEN)}, e.g. v5e-256, v5p-128, v4-32, v6e-256")
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
    return TpuSlice(name=f"{gen}-{size}", generation=gen, chips=chips, shape=shape,
                    topology_name=f"{prefix}:{'x'.join(map(str, shape))}", chip_config_name=chip_config,
                    wrap=wrap)


def topology_devices(sl: TpuSlice, num_slices: int = 1) -> list:
    """Compile-only devices of `num_slices` copies of the slice (needs the libtpu wheel, not the hardware)."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise RuntimeError("AOT compilation for TPU needs the TPU runtime library: pip install 'kalm-jax[tpu]' "
                           "(the libtpu wheel matching your jax version)") from None
    cphb = (2, 2, 1) if sl.chips >= 4 else (1, 1, 1)
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=sl.topology_name, chip_config_name=sl.chip_config_name,
        chips_per_host_bounds=cphb, num_slices=num_slices, wrap=sl.wrap)
    return list(desc.devices)


# ---------------------------------------------------------------------- mesh and shardings
MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
    ("kv_heads", None), ("head_dim", None), ("mlp", "tensor"), ("layers", None), ("lora_rank", None),
)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 filled so the product is `num_devices` (missing axes = 1)."""
    from kalm_jax.mesh import mesh_shape

    return mesh_shape({a: int(sizes.get(a, 1)) for a in MESH_AXES}, num_devices)


def build_mesh(devices: Sequence, sizes: Mapping[str, int], num_slices: int = 1):
    """Mesh ("data", "fsdp", "tensor") over topology devices; with several slices, `data` spans them (DCN)."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    shape = resolve_mesh_shape(sizes, len(devices))
    if num_slices > 1:
        if shape[0] % num_slices:
            raise ValueError(f"mesh data={shape[0]} must be a multiple of num_slices={num_slices} "
                             "(data parallelism spans the slices over DCN)")
        ici = (shape[0] // num_slices, shape[1], shape[2])
        arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices)
    else:
        try:
            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except (AssertionError, NotImplementedError, ValueError):
            arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _rules(rules) -> dict[str, Any]:
    items = DEFAULT_RULES if rules is None else (rules.items() if isinstance(rules, Mapping) else rules)
    return {str(k): v for k, v in items}


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh, rules: Mapping[str, Any]):
    """PartitionSpec from logical axis names; dims the mapped mesh axes do not divide are replicated."""
    from jax.sharding import PartitionSpec as P

    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(logical, shape):
        target = rules.get(name) if name is not None else None
        names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        names = tuple(a for a in names if a not in used and mesh.shape[a] > 1)
        if not names or size % math.prod(mesh.shape[a] for a in names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return P(*spec)


def abstract_state(state, mesh, rules: Mapping[str, Any]):
    """The NNX state with every array replaced by a sharded `jax.ShapeDtypeStruct` (from `out_sharding`)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    def one(var):
        value = var.get_value()
        axes = getattr(var, "out_sharding", None) or (None,) * len(value.shape)
        sharding = NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules))
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_input(shape: Sequence[int], dtype, mesh, rules: Mapping[str, Any]):
    """A sharded abstract batch array: leading dim on the "batch" rule (ValueError if it does not split)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    target = rules.get("batch")
    names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    n = math.prod(mesh.shape[a] for a in names)
    if shape[0] % n:
        raise ValueError(f"batch dimension {shape[0]} of input {tuple(shape)} does not split over the {n} "
                         f"batch shards (mesh axes {names} of {dict(mesh.shape)})")
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, P(target, *[None] * (len(shape) - 1))))


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
    def from_compiled(cls, name: str, compiled, hbm: int, seconds: float) -> "MemoryReport":
        m = compiled.memory_analysis()
        return cls(name, int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                   int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes), hbm, seconds)


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
    head = (f"{'program':<12}{'args':>10}{'outputs':>10}{'aliased':>10}{'temps':>10}{'code':>10}{'total':>10}"
            f"{'HBM':>10}{'used':>7}{'compile':>9}  fits")
    lines = ([title] if title else []) + [head + "   (GiB per device)", "-" * len(head)]
    for r in reports:
        lines.append(f"{r.name:<12}{g(r.arguments)}{g(r.outputs)}{g(r.aliased)}{g(r.temporaries)}"
                     f"{g(r.generated_code)}{g(r.total)}{g(r.hbm)}{100 * r.total / r.hbm:6.0f}%"
                     f"{r.compile_seconds:8.1f}s  {'yes' if r.fits else 'NO'}")
        if r.error:
            lines.append(f"    compiler: {r.error.splitlines()[0][:300]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- programs
@dataclasses.dataclass(frozen=True)
class Workload:
    """Shapes of one AOT check (global sizes; the batch dims are split over the batch mesh axes)."""

    batch_queries: int = 128   # training queries per step
    group_size: int = 16       # passages per query (1 positive + negatives)
    passage_len: int = 512
    query_len: int = 128       # decoder prompt length
    ratio: int = 4             # MEP ratio of the passage states the decoder reads
    eval_batch: int = 2048     # passages per encode call and pairs per score call


def _model(preset: str, param_dtype: str, dtype: str, remat: bool):
    from flax import nnx

    from kalm_jax.config import get_preset
    from kalm_jax.model import abstract_model

    model = abstract_model(get_preset(preset), param_dtype=param_dtype, dtype=dtype)
    model.remat = remat
    return nnx.split(model)


def lower_encode(preset: str, mesh, rules, w: Workload, dtype: str = "bfloat16"):
    """Lowering of `scoring.encode_pool` over [eval_batch, passage_len] passages (bf16 serving weights)."""
    import jax.numpy as jnp

    from kalm_jax import scoring

    graphdef, state = _model(preset, dtype, dtype, remat=False)
    params = abstract_state(state, mesh, rules)
    ids = batch_input((w.eval_batch, w.passage_len), jnp.int32, mesh, rules)
    return lambda: scoring.encode_pool.lower(graphdef, params, ids, ids, w.ratio)


def lower_score(preset: str, mesh, rules, w: Workload, dtype: str = "bfloat16"):
    """Lowering of `scoring.score_pairs`: [eval_batch, query_len] prompts against cached passage states."""
    import jax.numpy as jnp

    from kalm_jax import scoring
    from kalm_jax.config import get_preset

    graphdef, state = _model(preset, dtype, dtype, remat=False)
    params = abstract_state(state, mesh, rules)
    windows = -(-w.passage_len // w.ratio)
    h = get_preset(preset).hidden_size
    dec = batch_input((w.eval_batch, w.query_len), jnp.int32, mesh, rules)
    states = batch_input((w.eval_batch, windows, h), jnp.dtype(dtype), mesh, rules)
    pmask = batch_input((w.eval_batch, windows), jnp.int32, mesh, rules)
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    yes_no = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=NamedSharding(mesh, P()))
    return lambda: scoring.score_pairs.lower(graphdef, params, dec, dec, states, pmask, yes_no)


def lower_proxy_train(preset: str, mesh, rules, w: Workload, *, remat: bool = True):
    """Lowering of a stand-in full fine-tuning step (fp32 master weights, bf16 compute, AdamW).

    One step = encode B·G passages, MEP-pool at `ratio`, score each against its query prompt, listwise
    softmax cross-entropy over the group, gradients, AdamW update (params and optimizer state donated).
    It has the memory profile of the real step in `kalm_jax.training.step` (weights, two Adam moments,
    gradients, activations) and is used when that module is not available.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from kalm_jax import mep

    graphdef, state = _model(preset, "float32", "bfloat16", remat=remat)
    params = abstract_state(state, mesh, rules)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    from jax.sharding import NamedSharding, PartitionSpec as P

    # Optimizer leaves (Adam moments) take the sharding of the parameter whose path ends theirs;
    # anything else (the step count) is replicated.
    by_path = {jax.tree_util.keystr(k): v.sharding for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, P())

    def opt_leaf(path, leaf):
        key = jax.tree_util.keystr(path)
        sharding = next((sh for pk, sh in by_path.items() if key.endswith(pk)), replicated)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    opt_state = jax.tree_util.tree_map_with_path(opt_leaf, jax.eval_shape(tx.init, params))
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    n = w.batch_queries * w.group_size
    batch = {
        "passage_ids": batch_input((n, w.passage_len), jnp.int32, mesh, rules),
        "passage_mask": batch_input((n, w.passage_len), jnp.int32, mesh, rules),
        "decoder_ids": batch_input((n, w.query_len), jnp.int32, mesh, rules),
        "decoder_mask": batch_input((n, w.query_len), jnp.int32, mesh, rules),
    }

    def step(params, opt_state, batch):
        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            states = model.encode(batch["passage_ids"], batch["passage_mask"])
            pooled, pmask, _ = mep.pool(states, batch["passage_mask"], w.ratio)
            margins = model.score_margin(batch["decoder_ids"], batch["decoder_mask"], pooled, pmask, 1, 2)
            logits = margins.reshape(w.batch_queries, w.group_size)
            return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    param_sh = jax.tree.map(lambda s: s.sharding, params)
    jitted = jax.jit(step, out_shardings=(param_sh, opt_shardings, None), donate_argnums=(0, 1))
    return lambda: jitted.lower(params, opt_state, batch)


# ---------------------------------------------------------------------- config-driven entry point
def _get(cfg, dotted: str, default):
    node = cfg
    for key in dotted.split("."):
        if node is None or key not in node:
            return default
        node = node[key]
    return node


def workload_from_config(cfg) -> Workload:
    """Reads the training config keys (data.batch_size, data.group_size, data.passage_max_tokens,
    data.query_max_tokens, eval.ratio, eval.batch_size); missing keys keep the `Workload` defaults."""
    d = Workload()
    return Workload(
        batch_queries=int(_get(cfg, "data.batch_size", d.batch_queries)),
        group_size=int(_get(cfg, "data.group_size", d.group_size)),
        passage_len=int(_get(cfg, "data.passage_max_tokens", d.passage_len)),
        query_len=int(_get(cfg, "data.query_max_tokens", d.query_len)),
        ratio=int(_get(cfg, "eval.ratio", d.ratio)),
        eval_batch=int(_get(cfg, "eval.batch_size", d.eval_batch)),
    )


PROGRAMS = ("encode", "score", "train")


def run(cfg, topology: str, num_slices: int = 1, programs: Sequence[str] = PROGRAMS,
        out=print) -> list[MemoryReport]:
    """AOT-compiles `programs` for `num_slices` x `topology` with the config's model, mesh and batch.

    Returns one `MemoryReport` per program; prints the mesh, the workload and the memory table.
    """
    sl = tpu_slice(topology)
    devices = topology_devices(sl, num_slices)
    sizes = {a: int(_get(cfg, f"mesh.{a}", -1 if a == "data" else 1)) for a in MESH_AXES}
    mesh = build_mesh(devices, sizes, num_slices)
    rules = _rules(_get(cfg, "logical_axis_rules", None))
    w = workload_from_config(cfg)
    preset = str(_get(cfg, "model.preset", "tiny"))
    remat = bool(_get(cfg, "model.remat", True))
    out(f"{num_slices} x {sl.name} ({sl.topology_name}, {len(devices)} devices, "
        f"{sl.hbm_bytes / GiB:.0f} GiB HBM each); mesh {dict(mesh.shape)}; model {preset}")
    out(f"workload: {w}")
    builders = {
        "encode": lambda: lower_encode(preset, mesh, rules, w),
        "score": lambda: lower_score(preset, mesh, rules, w),
        "train": lambda: _lower_train(cfg, preset, mesh, rules, w, remat, out),
    }
    unknown = [p for p in programs if p not in builders]
    if unknown:
        raise ValueError(f"unknown programs {unknown}; valid: {list(PROGRAMS)}")
    reports = []
    for name in programs:
        reports.append(compile_report(name, builders[name](), mesh, sl.hbm_bytes))
    out(format_table(reports, title=f"per-device memory on {num_slices} x {sl.name}"))
    return reports


def _lower_train(cfg, preset, mesh, rules, w, remat, out):
    """The real training step (`kalm_jax.training.step.make_train_step`) when `cfg` is a full training
    config; otherwise the stand-in step `lower_proxy_train` (same memory profile, single MEP ratio)."""
    try:
        from kalm_jax.training import step as train_step
        from kalm_jax.training.config import validate
    except ImportError:
        train_step = None
    if train_step is not None and "loss" in cfg and "optimizer" in cfg:
        from kalm_jax.config import get_preset

        validate(cfg)
        ts = train_step.make_train_step(get_preset(preset), cfg, mesh, yes_id=1, no_id=2,
                                        decoder_length=int(_get(cfg, "data.decoder_length", 0)) or w.query_len)
        out(f"train: kalm_jax.training.step.make_train_step (lora={bool(cfg.lora.enabled)}, "
            f"ratios={tuple(cfg.mep.ratios)}, remat={bool(cfg.model.remat)})")
        return ts.lower
    out("train: not a full training config (or kalm_jax.training is absent); compiling the stand-in "
        "full fine-tuning step (aot.lower_proxy_train)")
    return lower_proxy_train(preset, mesh, rules, w, remat=remat)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    # A CPU-only host: never grab a local accelerator, and tell libtpu not to probe for TPU VM metadata
    # (the topology is described from the arguments, not discovered).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)
    p = argparse.ArgumentParser(prog="python -m kalm_jax.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="ml_collections config file[:arg], e.g. configs/tpu.py:nano,v5e-256")
    p.add_argument("--topology", required=True, help="TPU slice type, e.g. v5e-256, v5p-128, v4-32, v6e-256")
    p.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (data axis spans them)")
    p.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated subset of encode,score,train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set mesh.fsdp=64 --set data.batch_size=256 (repeatable)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    reports = run(cfg, args.topology, args.num_slices, [s for s in args.programs.split(",") if s])
    bad = [r for r in reports if not r.fits]
    if bad:
        print("does not fit: " + "; ".join(
            f"{r.name} needs {r.total / GiB:.2f} GiB per device, HBM is {r.hbm / GiB:.0f} GiB" for r in bad))
        return 1
    print("fits: every program compiled within HBM")
    return 0


def load_config(spec: str, overrides: Sequence[str] = ()):
    """Loads `path[:arg]` (a file with `get_config(arg)`) and applies KEY=VALUE overrides (literal values)."""
    import ast
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    mod_spec = importlib.util.spec_from_file_location("_kalm_aot_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must be KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = cfg
        *parents, last = key.split(".")
        for k in parents:
            if k not in node:
                raise ValueError(f"override {item!r}: config has no section {k!r}")
            node = node[k]
        if last not in node:
            raise ValueError(f"override {item!r}: unknown key {key!r}; valid: {sorted(node.keys())}")
        node[last] = value
    return cfg


if __name__ == "__main__":
    sys.exit(main())
