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
from kalm_jax.perf.aot.memory import MemoryReport, compile_report, format_table, unread_bytes
from kalm_jax.perf.aot.programs import (
    PROGRAMS,
    Workload,
    config_value,
    engine_program,
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
    batches: list[dict[str, Any]] = dataclasses.field(default_factory=list)


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
    analysis_layers: str = "auto",
    weights: str | None = None,
    quantization: str | Sequence[str] = "none",
    fit_batch: bool = False,
    states: str = "compute",
    hbm_bound: bool = False,
) -> AotResult:
    """AOT-compiles `programs` for `num_slices` x `topology` with the config's model, mesh and batch.

    Prints the mesh, the workload and the per-device memory table. With `cost`, also compiles each
    program's analysis variant (`options.analysis_options`: layers unrolled; encode and score keep the engine's
    attention kernel, accounted by `aot_cost`, the train step uses the einsum attention) and returns
    the compiler's cost model per chip beside the analytic useful FLOPs (`cost_row`). `analysis_layers`:
    "all" unrolls every layer; "sampled" compiles the analysis variant at `layer_samples` layers per stack
    and extrapolates per layer type (`extrapolate_costs`), for programs too large to unroll whole on the host;
    "auto" samples the train step (nano's, unrolled whole, outgrows a 24 GB host) and unrolls encode and score
    whole.

    `encode` and `score` are the inference engine's own programs (`InferenceEngine.encode_program` /
    `score_program`) on the mesh its policy (`kalm_jax.parallel.inference_policy`, setting `weights`) chooses for the
    slice, with bf16 weights and `eval.batch_size` rows per call (or the policy's cap, `InferencePolicy.rows`,
    with which the rows' FLOPs and bytes are counted); `train` is the real train step on the
    config's training mesh. One line is printed as each compile starts and as it ends (with its time).

    `quantization`: the engine's weight mode (`kalm_jax.model.quantization.MODES`), or several (a sequence or a
    comma-separated string): encode and score are lowered with `InferenceEngine(abstract_model,
    quantization=mode)` once per mode (the train step once, in float); each memory report is named
    "<program>" for "none" and "<program> <mode>" otherwise, and each cost row carries its `quantization`.
    `fit_batch`: also find the largest batch of each encode / score program that fits HBM (`largest_batch`),
    on the same engine (layout) as the workload's batch; in `AotResult.batches` and the cost rows.
    `states`: the engine's `device_states` ("compute" or "int8": the score program takes int8 passage states and
    their per-window scale); with "int8" every report of the score program is named with " int8-states" appended
    and its cost row carries ``device_states``.
    `hbm_bound`: with `cost`, each encode / score analysis variant is also compiled with every buffer in HBM
    (`aot_cost.analyse`), for an upper bound on the program's HBM bytes beside the compiler's `bytes_accessed`.
    """
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise ValueError(f"unknown programs {unknown}; valid: {list(PROGRAMS)}")
    if analysis_layers not in ANALYSIS_LAYERS:
        raise ValueError(f"analysis_layers={analysis_layers!r}; valid: {list(ANALYSIS_LAYERS)}")
    from kalm_jax.model.quantization import check_mode

    modes = [m.strip() for m in quantization.split(",") if m.strip()] if isinstance(quantization, str) else quantization
    modes = [check_mode(m) for m in modes] or ["none"]
    from kalm_jax.inference.engine import check_device_states

    states = check_device_states(states)
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

    engines: dict[tuple, Any] = {}

    def engine(analysis: bool, layers: int | None, mode: str):
        key = (analysis, layers, mode)
        if key not in engines:  # one abstract engine per variant (building one is cheap; lowering is not)
            # A variant with fewer layers has fewer weights, so the policy could choose another layout for it:
            # every variant takes the whole model's layout and batch, which the real program runs.
            whole = None if layers is None else engine(False, None, mode).policy
            engines[key] = inference_engine(
                preset,
                devices,
                w if whole is None else dataclasses.replace(w, eval_batch=whole.rows),
                hbm_bytes=sl.hbm_bytes,
                weights=weights if whole is None else whole.setting_of_layout,
                analysis=analysis,
                layers=layers,
                quantization=mode,
                device_states=states,
            )
        return engines[key]

    inference = [p for p in programs if p in ("encode", "score")]
    policies, works = {}, {}
    for mode in modes if inference else ():
        policies[mode] = engine(False, None, mode).policy
        works[mode] = dataclasses.replace(w, eval_batch=policies[mode].rows)  # the policy may cap the batch
        out(f"encode, score ({mode}): the inference engine's programs; {policies[mode].describe()}")

    def work_of(name: str, mode: str) -> Workload:
        return w if name == "train" else works[mode]

    def builder(name: str, analysis: bool, layers: int | None = None, mode: str = "none", work: Workload | None = None):
        work = work_of(name, mode) if work is None else work
        if name == "encode":
            return lower_encode(engine(analysis, layers, mode), work)
        if name == "score":
            return lower_score(engine(analysis, layers, mode), work)
        return lower_train(cfg, preset, mesh, work, analysis=analysis, layers=layers, out=out)

    mc = model_config(preset)
    types, sampleable = mc.encoder_layer_types, mc.encoder_layer_types == mc.decoder_layer_types
    if cost and analysis_layers == "sampled" and not sampleable:
        raise ValueError(
            "analysis_layers=sampled truncates both stacks alike: it needs equal encoder and decoder layer types"
        )

    def samples_of(name: str) -> tuple[int, ...]:
        """The layer counts of `name`'s analysis compiles; () = every layer unrolled in one compile."""
        sampled = analysis_layers == "sampled" or (analysis_layers == "auto" and name == "train" and sampleable)
        return layer_samples(types) if cost and sampled else ()

    jobs = [(name, mode) for mode in modes for name in inference]
    jobs += [("train", "none") for p in programs if p == "train"]
    reports, rows, batches = [], [], []
    total = sum(1 + (len(samples_of(name)) or 1 if cost else 0) for name, _ in jobs)
    done = 0

    def step(what: str, fn: Callable[..., Any], *args):
        nonlocal done, total
        done += 1
        total = max(total, done)
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

    for name, mode in jobs:
        label = name if mode == "none" else f"{name} {mode}"
        if name == "score" and states != "compute":
            label += f" {states}-states"
        program = None if name == "train" else engine_program(engine(False, None, mode), name, work_of(name, mode))
        lower = builder(name, False, mode=mode) if program is None else program.lower
        memory = step(f"{label} (the real program)", compile_report, label, lower, mesh, sl.hbm_bytes)
        if program is not None:  # the engine holds both stacks' weights; each program reads one
            memory = dataclasses.replace(memory, unread=unread_bytes(memory, program.args))
        reports.append(memory)
        fitted = None
        if fit_batch and name != "train":
            fitted = largest_batch(
                lambda rows, name=name, mode=mode: builder(
                    name, False, mode=mode, work=dataclasses.replace(w, eval_batch=rows)
                ),
                engine(False, None, mode),
                work_of(name, mode).eval_batch,
                memory,
                mesh,
                sl.hbm_bytes,
                lambda what, fn, *a, label=label: step(f"{label} {what}", fn, *a),
                out=out,
            )
            fitted = {"program": name, "quantization": mode, **fitted}
            batches.append(fitted)
            out(
                f"{label}: largest batch that fits {fitted['max_batch']} rows "
                f"({fitted['max_batch_per_shard']} per batch shard, "
                f"{fitted['max_batch_bytes'] / GiB:.2f} GiB per device; "
                f"{fitted['max_batch_how']})"
            )
        if not cost:
            continue
        samples = samples_of(name)
        bound = hbm_bound and name != "train"
        twice = " (and again with every buffer in HBM)" if bound else ""
        if samples:
            sampled, err = {}, None
            for k in samples:
                sampled[k], err = step(
                    f"{label} analysis variant, {k} layer(s) per stack{twice}",
                    analyse,
                    name,
                    builder(name, True, k, mode),
                    mesh,
                    sl.generation,
                    bound,
                )
                if err:
                    err = f"{k}-layer sample: {err}"
                    break
            fields = sampled[k] if err else extrapolate_costs(types, sampled)
        else:
            fields, err = step(
                f"{label} analysis variant{twice}",
                analyse,
                name,
                builder(name, True, mode=mode),
                mesh,
                sl.generation,
                bound,
            )
        estimate = collectives = None
        if name != "train":
            args = (name, model_config(preset), work_of(name, mode), len(devices), policies[mode].tensor)
            weight_itemsize = None if mode == "none" else 1
            estimate = aot_cost.estimate_bytes(*args, weight_itemsize=weight_itemsize)
            collectives = estimate - aot_cost.estimate_bytes(*args, weight_itemsize=weight_itemsize, collectives=False)
        row = cost_row(
            name,
            sl,
            len(devices),
            num_slices,
            preset,
            work_of(name, mode),
            useful_flops(name, cfg, preset, work_of(name, mode)),
            fields,
            memory,
            cfg,
            bytes_estimate=estimate,
            quantization=mode,
        )
        if name != "train":
            row["layout"] = policies[mode].describe()
            row["bytes_estimate_collectives"] = collectives
        if name == "score" and states != "compute":
            row["device_states"] = states
        if fitted:
            row.update({k: v for k, v in fitted.items() if k.startswith("max_batch")})
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
    return AotResult(reports, rows, dict(mesh.shape), batches)


def largest_batch(
    lower_at: Callable[[int], Callable[[], Any]],
    engine,
    batch: int,
    first: MemoryReport,
    mesh,
    hbm: int,
    step: Callable[..., Any] = lambda what, fn, *a: fn(*a),
    compiles: int = 8,
    out: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The largest batch (in the engine's padded rows: a row count `engine.rows` keeps) whose real program fits
    `hbm` per device, by compiling it at a few batches.

    `lower_at(rows)` lowers the program at `rows`; `first` is its memory report at `batch`'s rows (its `unread`
    weights are the same at every batch). The per-device total is fitted as a + b * rows from `first` and a
    compile at twice the rows (arguments and temporaries grow linearly with the batch); the largest bucket
    within HBM on that line is compiled first, then the buckets between the largest that fits and the smallest
    that does not are bisected, at most `compiles` compiles in all. Returns `max_batch` (0 when none fits),
    `max_batch_per_shard` (rows per batch shard), `max_batch_bytes` (its per-device total), `max_batch_exact`
    (the next bucket up was compiled and does not fit) and `max_batch_how`."""
    shards = engine.rows(1)
    r1 = engine.rows(batch)
    r2 = engine.rows(2 * r1)
    points = {r1: first}
    out(
        f"    {r1} rows: {first.total / GiB:.3f} GiB per device ({first.arguments / GiB:.3f} arguments, "
        f"{first.temporaries / GiB:.3f} temporaries): {'fits' if first.fits else 'does not fit'}"
    )

    def probe(rows: int, why: str) -> MemoryReport:
        if rows not in points:
            m = step(f"at {rows} rows ({why})", compile_report, "fit", lower_at(rows), mesh, hbm)
            points[rows] = m = m if m.error else dataclasses.replace(m, unread=first.unread)  # the same weights
            out(
                f"    {rows} rows: {m.total / GiB:.3f} GiB per device ({m.arguments / GiB:.3f} arguments, "
                f"{m.temporaries / GiB:.3f} temporaries): {'fits' if m.fits else 'does not fit'}"
            )
        return points[rows]

    probe(r2, "memory line")
    slope = (points[r2].total - points[r1].total) / (r2 - r1)
    base = points[r1].total - slope * r1
    how = f"line {base / GiB:.2f} GiB + {slope / 2**20:.2f} MiB per row from {r1} and {r2} rows"

    def bucket(n: int, down: bool) -> int:
        """The nearest row count the engine pads to (`engine.rows(m) == m`) at or below (above) n."""
        n = max(n, shards)
        while engine.rows(n) != n:
            n += -1 if down else 1
            if n < shards:
                return 0
        return n

    guess = first_guess = bucket(int((hbm - base) // slope), True) if slope > 0 else 0
    while len(points) < compiles:
        fit = [r for r, m in points.items() if m.fits]
        lo = max(fit, default=0)
        hi = min((r for r, m in points.items() if not m.fits and r > lo), default=None)
        up = bucket(lo + 1, False) if lo else shards
        if hi is not None and up >= hi:
            break  # adjacent buckets: lo is the answer
        if guess and lo < guess and (hi is None or guess < hi):
            # the line's bucket, then (once) the one above it
            candidate, guess = guess, (bucket(guess + 1, False) if guess == first_guess else 0)
        elif hi is None:  # all fit so far: a line through the two largest, else doubling
            a, b = sorted(points)[-2:]
            slope2 = (points[b].total - points[a].total) / (b - a)
            far = int(b + (hbm - points[b].total) // slope2) if slope2 > 0 else 2 * b
            candidate = max(bucket(far, True), up)
        else:
            candidate, guess = max(bucket((lo + hi) // 2, True), up), 0
        probe(candidate, "search")
    fit = [r for r, m in points.items() if m.fits]
    best = max(fit, default=0)
    above = min((r for r, m in points.items() if not m.fits and r > best), default=None)
    exact = above is not None and bucket(best + 1, False) >= above
    return {
        "max_batch": best,
        "max_batch_per_shard": best // shards if best else 0,
        "max_batch_bytes": points[best].total if best else 0,
        "max_batch_exact": exact,
        "max_batch_how": how
        + f"; compiled at {sorted(points)} rows"
        + ("" if exact else f" (not bracketed within {compiles} compiles: a lower bound)"),
    }


def check(
    cfg,
    topology: str | None = None,
    num_slices: int = 1,
    programs: str = ",".join(PROGRAMS),
    report: str | None = None,
    analysis_layers: str = "auto",
    weights: str | None = None,
    quantization: str = "none",
    fit_batch: bool = False,
    states: str = "compute",
    hbm_bound: bool = False,
) -> int:
    """The CLI's work: compile `programs` for the slice and print whether they fit; 0 fits, 1 does not."""
    from kalm_jax import cli

    if not topology:
        raise cli.ConfigError("--topology is required (the TPU slice type, e.g. v5e-256, v5p-128, v4-32, v6e-256)")
    if hbm_bound and not report:
        raise cli.ConfigError("--hbm_bound adds to the cost rows: give --report=FILE as well")
    result = run(
        cfg,
        topology,
        num_slices,
        [s for s in programs.split(",") if s],
        cost=report is not None,
        analysis_layers=analysis_layers,
        weights=weights,
        quantization=quantization,
        fit_batch=fit_batch,
        states=states,
        hbm_bound=hbm_bound,
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
