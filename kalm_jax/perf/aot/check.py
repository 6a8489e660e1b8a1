"""The AOT check: compile the requested programs for a topology, print the memory table (and with a report path,
the cost table), and say whether the configuration fits."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kalm_jax.perf.aot import hlo_cost as aot_cost
from kalm_jax.perf.aot.cost import (
    ANALYSIS_LAYERS,
    analyse,
    cost_row,
    extrapolate_costs,
    format_cost_table,
    layer_samples,
    useful_flops,
)
from kalm_jax.perf.aot.memory import MemoryReport, compile_report, format_table
from kalm_jax.perf.aot.programs import (
    PROGRAMS,
    config_value,
    inference_engine,
    lower_encode,
    lower_score,
    lower_train,
    model_config,
    workload_from_config,
)
from kalm_jax.perf.aot.topology import GiB, topology_devices, tpu_slice


@dataclasses.dataclass
class AotResult:
    """What `run` found: one memory report per program and, with `cost=True`, one cost row per program."""

    memory: list[MemoryReport]
    cost: list[dict[str, Any]]
    mesh_shape: dict[str, int]


def mesh_for(cfg, devices: Sequence, num_slices: int = 1):
    """The config's ("data", "fsdp", "tensor") mesh over `devices` and its normalised logical rules."""
    from kalm_jax.parallel import mesh as mesh_lib

    sizes = {a: int(config_value(cfg, f"mesh.{a}", -1 if a == "data" else 1)) for a in mesh_lib.MESH_AXES}
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
    return mesh, mesh_lib.rules_dict(config_value(cfg, "logical_axis_rules", None))


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
    preset = str(config_value(cfg, "model.preset", "tiny"))
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
