"""The TPU compiler's cost model per chip: FLOPs, bytes, predicted time and MFU of a compiled program, instructions
without a cost model accounted (`hlo_cost`), and layer-sampled extrapolation for programs too large to unroll."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kalm_jax.perf.aot import hlo_cost as aot_cost
from kalm_jax.perf.aot.memory import MemoryReport
from kalm_jax.perf.aot.programs import PROGRAMS, Workload, config_value
from kalm_jax.perf.aot.topology import TpuSlice
from kalm_jax.perf.flops import matmul_type, peak_for

# What the cost rows are computed from (the row's `analysis` field; `run` appends how layers were sampled).
_KERNEL_ANALYSIS = (
    "layers unrolled, the engine's attention (splash kernels accounted from their HLO operands; "
    "kalm_jax.model.options.analysis_options)"
)
ANALYSIS = {
    "encode": _KERNEL_ANALYSIS,
    "score": _KERNEL_ANALYSIS,
    "train": "layers unrolled, einsum attention (kalm_jax.model.options.analysis_options)",
}


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
        t = int(config_value(cfg, "data.decoder_length", 0)) or w.query_len
        ratios = tuple(int(r) for r in config_value(cfg, "mep.ratios", (w.ratio,)))
        return (
            w.batch_queries
            * w.group_size
            * flops.train_step_flops(mc, w.passage_len, ratios, t, lora=bool(config_value(cfg, "lora.enabled", False)))
        )
    raise ValueError(f"unknown program {program!r}; valid: {list(PROGRAMS)}")


# Instructions without a cost model (`kalm_jax.perf.aot.hlo_cost`): XLA:TPU lowers an all-gather of fsdp-sharded
# weights to async slices joined by a `ConcatBitcast` custom call, and a Pallas kernel is a `tpu_custom_call`;
# each adds -1 to `optimal_seconds` (checked: nano encode on v5e-4 reports -3.991 with 4 ConcatBitcasts).
UNKNOWN_COST_CALLS = aot_cost.UNKNOWN_COST
MIN_FLOPS_RATIO = 0.95
"""A row whose XLA FLOPs are below this share of the useful FLOPs prints no MFU (the analysis misses work)."""


def cost_fields(compiled, generation: str = "v5e") -> dict[str, Any]:
    """flops, bytes accessed and optimal_seconds from `compiled.cost_analysis()` (per device).

    `optimal_seconds` is the compiler's roofline of the modelled instructions plus the instructions it does
    not model, as `aot_cost.account` counts them from the HLO (for a chip of `generation`): the -1 of each is
    added back, a data-movement op's bytes are timed at HBM bandwidth and an attention kernel at its roofline
    (`unknown_cost_ops` counts them, `unknown_cost_flops` / `unknown_cost_bytes` / `unknown_cost_seconds` are
    what was added, `unaccounted` names those whose cost the HLO does not show, `optimal_seconds_raw` keeps
    the raw figure); a result that is still not positive becomes -1 (unknown). `xla_flops` and
    `bytes_accessed` are the compiler's own figures.
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
    quantization: str = "none",
) -> dict[str, Any]:
    """One `--report` row (JSON-ready); every figure per chip. The contract scripts rely on: `program`,
    `topology`, `xla_flops`, `useful_flops`, `bytes_accessed`, `optimal_seconds`, `predicted_mfu`.

    Every row has `unknown_cost_ops` (instructions without a cost model, `aot_cost`) and what they add
    (`unknown_cost_flops`, `unknown_cost_bytes`, `unknown_cost_seconds`); `flops` and `bytes` are the
    compiler's figures plus those (`flops_ratio` = `flops` / `useful_flops`); `predicted_mfu` is None, with
    the reason in `mfu_note`, when some are not accounted for (`unaccounted`) or `flops` fall below
    `MIN_FLOPS_RATIO` of the useful FLOPs. `bytes_estimate` is the analytic bytes per chip given
    (`aot_cost.estimate_bytes`; None for the train step), `bytes_ratio` = `bytes` / `bytes_estimate`. Where `cost`
    has `bytes_hbm_bound` (`analyse`), the row has it (None when unknown) and `bytes_hbm_bound_ratio` (over the
    estimate).

    `quantization` is the weight mode the program was lowered with (`kalm_jax.model.quantization.MODES`; the
    train step is "none"); `peak_flops` is the chip's peak for its matmuls (`kalm_jax.perf.flops.peak_for`: the
    int8 peak for "int8-dynamic", whose projection and MLP matmuls are int8 x int8, the bf16 peak otherwise;
    attention's float einsums are counted at the same peak), `matmul_type` says which."""
    useful = useful_total / num_devices
    secs = cost["optimal_seconds"]
    ok = secs > 0
    peak = peak_for(sl.generation, quantization)
    known = cost["xla_flops"] >= 0 and cost["bytes_accessed"] >= 0
    flops = cost["xla_flops"] + cost.get("unknown_cost_flops", 0.0) if known else -1.0
    total_bytes = cost["bytes_accessed"] + cost.get("unknown_cost_bytes", 0.0) if known else -1.0
    ratio = flops / useful if useful else None
    row: dict[str, Any] = {
        "program": program,
        "quantization": quantization,
        "topology": sl.name,
        "num_slices": num_slices,
        "devices": num_devices,
        "preset": preset,
        "n": w.passage_len,
        "r": w.ratio,
        "prompt_len": w.query_len,
        "xla_flops": cost["xla_flops"],
        "flops": flops,
        "useful_flops": useful,
        "flops_ratio": ratio,
        "bytes_accessed": cost["bytes_accessed"],
        "bytes": total_bytes,
        "optimal_seconds": secs,
        "optimal_seconds_raw": cost.get("optimal_seconds_raw", secs),
        "unknown_cost_ops": cost.get("unknown_cost_ops", 0),
        "unknown_cost_targets": dict(cost.get("unknown_cost_targets", {})),
        "unknown_cost_flops": cost.get("unknown_cost_flops", 0.0),
        "unknown_cost_bytes": cost.get("unknown_cost_bytes", 0.0),
        "unknown_cost_seconds": cost.get("unknown_cost_seconds", 0.0),
        "unaccounted": list(cost.get("unaccounted", [])),
        "peak_flops": peak,
        "matmul_type": matmul_type(quantization),
        "analysis": ANALYSIS.get(program, ANALYSIS["train"]),
    }
    note = (
        aot_cost.mfu_note(row, MIN_FLOPS_RATIO)
        or (None if ok else "no MFU: optimal_seconds unknown")
        or (None if peak else f"no MFU: no {row['matmul_type']} peak for {sl.generation} in kalm_jax.perf.flops.PEAKS")
    )
    row["predicted_mfu"] = None if note else useful / (secs * peak)
    row["mfu_note"] = note
    row["bytes_estimate"] = bytes_estimate
    row["bytes_ratio"] = total_bytes / bytes_estimate if bytes_estimate and total_bytes > 0 else None
    if "bytes_hbm_bound" in cost:
        bound = cost["bytes_hbm_bound"] if known and cost["bytes_hbm_bound"] >= 0 else None
        row["bytes_hbm_bound"] = bound
        row["bytes_hbm_bound_ratio"] = bound / bytes_estimate if bound and bytes_estimate else None
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
            ratios=list(config_value(cfg, "mep.ratios", ())),
            examples_per_s=pairs / secs if ok else None,
            queries_per_s=w.batch_queries / num_devices / secs if ok else None,
        )
    if memory is not None:
        row.update(
            memory_total_bytes=memory.total,
            memory_argument_bytes=memory.arguments,
            memory_temp_bytes=memory.temporaries,
            hbm_bytes=memory.hbm,
            fits=memory.fits,
        )
    return row


HBM_ONLY = {"xla_msa_enable": False}
"""libtpu's compiler options that turn memory-space assignment off: every buffer stays in HBM and nothing is
prefetched into on-chip memory (`analyse`'s `hbm_bound`)."""


def analyse(
    name: str, lower: Callable[[], Any], mesh, generation: str = "v5e", hbm_bound: bool = False
) -> tuple[dict[str, Any], str | None]:
    """Compiles the analysis variant and returns its cost fields (or -1s and the compiler's refusal).

    `hbm_bound`: also compiles it with memory-space assignment off (`HBM_ONLY`) and adds `bytes_hbm_bound`,
    that compile's bytes plus its accounted kernels' bytes (-1 when the compiler refuses the option). The
    compiler's `bytes accessed` counts every operand and output wherever it lives, so the buffers the
    assignment keeps in on-chip memory count as bytes, and each prefetch into it counts four times its size
    (the copy's start and done each read and write it). With every buffer in HBM the figure is the program's
    HBM traffic, and so an upper bound on that of the program with the assignment, which only keeps buffers
    on chip."""
    import jax

    try:
        with jax.set_mesh(mesh):
            lowered = lower()
        fields = cost_fields(lowered.compile(), generation)
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
    if hbm_bound:
        try:
            whole = cost_fields(lowered.compile(compiler_options=HBM_ONLY), generation)
            fields["bytes_hbm_bound"] = whole["bytes_accessed"] + whole.get("unknown_cost_bytes", 0.0)
        except Exception:  # noqa: BLE001 - a libtpu without the option, or the program no longer fits
            fields["bytes_hbm_bound"] = -1.0
    return fields, None


ANALYSIS_LAYERS = ("auto", "all", "sampled")
COST_KEYS = ("xla_flops", "bytes_accessed", "optimal_seconds", "optimal_seconds_raw", "unknown_cost_ops")
_ACCOUNTED_KEYS = ("unknown_cost_flops", "unknown_cost_bytes", "unknown_cost_seconds")


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
    for key in COST_KEYS:
        y = np.array([float(sampled[k].get(key, -1.0)) for k in ks])
        if key in ("xla_flops", "bytes_accessed", "optimal_seconds") and (y <= 0).any():
            raise ValueError(f"the {key} of a sampled analysis compile is unknown: {dict(zip(ks, y.tolist()))}")
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        out[key] = float(target @ coef)
    for key in _ACCOUNTED_KEYS:  # what the unknown-cost instructions add, when every sample says
        if all(key in sampled[k] for k in ks):
            coef, *_ = np.linalg.lstsq(a, np.array([float(sampled[k][key]) for k in ks]), rcond=None)
            out[key] = float(target @ coef)
    if all("bytes_hbm_bound" in sampled[k] for k in ks):  # `analyse`'s bound; -1 where a sample's was refused
        y = np.array([float(sampled[k]["bytes_hbm_bound"]) for k in ks])
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        out["bytes_hbm_bound"] = -1.0 if (y < 0).any() else float(target @ coef)
    out["unaccounted"] = sorted({t for k in ks for t in sampled[k].get("unaccounted", [])})
    # The op counts per target: a kernel runs in each layer and is fitted like the costs; how XLA slices its
    # prefetch copies (`DATA_MOVEMENT`) does not follow the layers, so a fit of their counts can fall to 0 for a
    # model that has them: the most any sample had.
    names = sorted({t for k in ks for t in sampled[k].get("unknown_cost_targets", {})})
    counts = {}
    for name in names:
        y = np.array([float(sampled[k].get("unknown_cost_targets", {}).get(name, 0)) for k in ks])
        if name in aot_cost.DATA_MOVEMENT:
            counts[name] = int(y.max())
        else:
            coef, *_ = np.linalg.lstsq(a, y, rcond=None)
            counts[name] = max(0, int(round(float(target @ coef))))
    out["unknown_cost_targets"] = counts
    out["unknown_cost_ops"] = sum(counts.values()) if counts else max(0, int(round(out["unknown_cost_ops"])))
    return out


def format_cost_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width table of `--report` rows (per chip; the compiler's predictions, not measurements; TFLOP and
    GB: the compiler's figures plus what the instructions it does not model add, `aot_cost.account`)."""
    head = (
        f"{'program':<8}{'weights':>13}{'topology':>9}{'preset':>7}{'n':>6}{'r':>4}{'TFLOP':>9}{'useful TF':>10}"
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
        if r.get("bytes_hbm_bound_ratio"):
            gb, ratio = r["bytes_hbm_bound"] / 1e9, r["bytes_hbm_bound_ratio"]
            bound = f" (HBM at most {gb:.2f} GB, {ratio:.2f}x the estimate)"
        else:
            bound = " (HBM bound: the compiler refused it)" if "bytes_hbm_bound" in r else ""
        lines.append(
            f"{r['program']:<8}{r.get('quantization', 'none'):>13}{r['topology']:>9}{r['preset']:>7}"
            f"{r['n']:>6}{r['r']:>4}"
            f"{r.get('flops', r['xla_flops']) / 1e12:9.3f}{r['useful_flops'] / 1e12:10.3f}{r['flops_ratio'] or 0:7.3f}"
            f"{r.get('bytes', r['bytes_accessed']) / 1e9:8.2f}{est}{r.get('unknown_cost_ops', 0):5d}"
            f"{r['optimal_seconds'] * 1e3:9.2f}{mfu}  {tput}{bound}"
        )
        if r.get("bytes_estimate_collectives"):
            gb = r["bytes_estimate_collectives"] / 1e9
            lines.append(f"    the estimate counts {gb:.2f} GB of the tensor layout's collectives")
        if r.get("mfu_note"):
            lines.append(f"    {r['mfu_note']}")
        if r.get("analysis_error"):
            lines.append(f"    compiler: {r['analysis_error'][:300]}")
    return "\n".join(lines)
