"""The TPU ahead-of-time report with quantized weights, kept fast: the report's quantized rows lower the inference
engine's own quantized programs (checked on 8 CPU devices, lowering only), their MFU uses the peak of their
matmuls, and the largest-batch search brackets the answer. The compiles for real TPU topologies are in
benchmarks/ (they take minutes per program)."""

from __future__ import annotations

import importlib
import re

import jax
import pytest

from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.perf import aot, flops

aot_check = importlib.import_module("kalm_jax.perf.aot.check")  # the module (`aot.check` is its function)

# A StableHLO dot_general whose two operands are int8: "(tensor<...xi8>, tensor<...xi8>) -> tensor<...xi32>".
INT8_DOT = re.compile(r"stablehlo\.dot_general.*:\s*\(tensor<[^>]*xi8>, tensor<[^>]*xi8>\)")
DOT = re.compile(r"stablehlo\.dot_general")


def _int8_args(text: str) -> int:
    """int8 arguments of the lowered program's entry (`func.func public @main(...)`): the quantized weights."""
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    return len(re.findall(r"%arg\d+: tensor<[\dx]*xi8>", main))


def _int8_dots(text: str) -> int:
    return sum(1 for line in text.splitlines() if INT8_DOT.search(line))


def _report_lowerings(monkeypatch, modes: str, w: aot.Workload, states: str = "compute") -> dict[str, str]:
    """What `aot.run` lowers for encode and score in each of `modes` (the real program and, with the report, the
    analysis variant), on the 8 CPU devices standing in for a v5e-8 slice: compiling is replaced by recording
    the lowered text (a TPU compile takes minutes per program; the lowering is what decides the mode)."""
    texts: dict[str, str] = {}
    last: list[str] = []

    def record(label, lower, mesh):
        with jax.set_mesh(mesh):
            texts[label] = lower().as_text()

    def fake_compile(label, lower, mesh, hbm):
        record(label, lower, mesh)
        last.append(label)
        return aot.MemoryReport(label, 1, 1, 0, 1, 1, hbm, 0.0)

    def fake_analyse(name, lower, mesh, generation, hbm_bound=False):
        assert last[-1].split()[0] == name and not hbm_bound  # the report's runs here do not ask for the bound
        record(f"analysis {last[-1]}", lower, mesh)  # the analysis variant of the row just compiled
        fields = {"xla_flops": 1e9, "bytes_accessed": 1e9, "optimal_seconds": 1e-3, "optimal_seconds_raw": 1e-3}
        return {**fields, "unknown_cost_ops": 0}, None

    monkeypatch.setattr(aot_check, "topology_devices", lambda sl, n=1: jax.devices())
    monkeypatch.setattr(aot_check, "compile_report", fake_compile)
    monkeypatch.setattr(aot_check, "analyse", fake_analyse)
    cfg = {
        "model": {"preset": "tiny"},
        "eval": {"batch_size": w.eval_batch, "ratio": w.ratio},
        "data": {"max_document_tokens": w.passage_len, "max_query_tokens": w.query_len},
    }
    result = aot.run(
        cfg,
        "v5e-8",
        programs=("encode", "score"),
        out=lambda _: None,
        cost=True,
        quantization=modes,
        weights="tensor:2",
        states=states,
    )
    assert [(r["program"], r["quantization"]) for r in result.cost] == [
        (p, m) for m in modes.split(",") for p in ("encode", "score")
    ]
    suffix = {"encode": "", "score": "" if states == "compute" else f" {states}-states"}
    assert [m.name for m in result.memory] == [
        (p if m == "none" else f"{p} {m}") + suffix[p] for m in modes.split(",") for p in ("encode", "score")
    ]
    assert [r.get("device_states") for r in result.cost] == [
        states if p == "score" and states != "compute" else None for m in modes.split(",") for p in ("encode", "score")
    ]
    return texts


def _engine(model, w, mode: str, **options) -> InferenceEngine:
    """The engine a client would build for workload `w` on this host's devices (weights split tensor:2)."""
    return InferenceEngine(
        model,
        devices=jax.devices(),
        batch_size=w.eval_batch,
        max_document_tokens=w.passage_len,
        max_prompt_tokens=w.query_len,
        yes_id=1,
        no_id=2,
        weights="tensor:2",
        quantization=mode,
        show_progress=False,
        **options,
    )


def test_report_rows_lower_the_engines_quantized_programs(monkeypatch):
    """Each quantized row of the report is the engine's program in that mode: what `aot.run` lowers for
    encode / score at "int8" and "int8-dynamic" equals the lowering of `InferenceEngine(real tiny model,
    quantization=mode)`'s own programs on the same devices and layout, and differs from the float engine's.
    int8-dynamic's projection / MLP dots take two int8 operands (7 per layer: q, k, v, o, gate, up, down);
    int8's take none (weights dequantized into a float dot), though its weights are int8 arguments; the
    analysis variant (cost rows) is quantized alike."""
    w = aot.Workload(passage_len=64, query_len=16, ratio=4, eval_batch=8)
    texts = _report_lowerings(monkeypatch, "none,int8,int8-dynamic", w)
    tiny = get_preset("tiny")
    model = build_model(tiny, param_dtype="bfloat16")
    layers = len(tiny.encoder_layer_types)
    for mode in ("none", "int8", "int8-dynamic"):
        engine = _engine(model, w, mode)
        assert engine.quantization == mode
        for name, lower in (("encode", aot.lower_encode), ("score", aot.lower_score)):
            with jax.set_mesh(engine.mesh):
                own = lower(engine, w)().as_text()
            label = name if mode == "none" else f"{name} {mode}"
            assert texts[label] == own, label  # the report lowered the engine's own program
            if mode != "none":
                assert texts[label] != texts[name], label  # ... which is not the float program
            int8_dots, analysis_dots = _int8_dots(own), _int8_dots(texts[f"analysis {label}"])
            if mode == "int8-dynamic":
                assert int8_dots >= 7 * layers and analysis_dots >= 7 * layers, (label, int8_dots, analysis_dots)
            else:
                assert int8_dots == 0 and analysis_dots == 0, label
            # the quantized weights of the stack the program runs (7 per stack), int8 arguments, none in float
            assert _int8_args(own) == (0 if mode == "none" else 7), (label, _int8_args(own))
            assert len(DOT.findall(own)) >= 7 * layers


def test_report_rows_with_int8_states_lower_the_engines_int8_state_program(monkeypatch):
    """`kalm-aot --states=int8`: the score rows (float and int8 weights) are the lowering of `InferenceEngine(real
    tiny model, quantization=mode, device_states="int8")`'s own score program: its passage states are an int8
    argument [rows, C, H] with an fp32 scale [rows, C], converted to float inside; it differs from the
    compute-dtype-states program, and encode is unchanged."""
    w = aot.Workload(passage_len=64, query_len=16, ratio=4, eval_batch=8)
    texts = _report_lowerings(monkeypatch, "none,int8", w, states="int8")
    plain = _report_lowerings(monkeypatch, "none", w)
    tiny = get_preset("tiny")
    model = build_model(tiny, param_dtype="bfloat16")
    states_arg = re.compile(r"%arg\d+: tensor<8x16x64xi8>")
    for mode in ("none", "int8"):
        engine = _engine(model, w, mode, device_states="int8")
        with jax.set_mesh(engine.mesh):
            own = aot.lower_score(engine, w)().as_text()
        label = ("score" if mode == "none" else f"score {mode}") + " int8-states"
        assert texts[label] == own, label
        main = next(line for line in own.splitlines() if "func.func public @main" in line)
        assert states_arg.search(main) and "tensor<8x16xf32>" in main, main
        assert _int8_args(own) == (1 if mode == "none" else 8), (label, _int8_args(own))  # + 7 int8 weights
        assert "(tensor<8x16x64xi8>) -> tensor<8x16x64xbf16>" not in own  # dequantized in fp32 ...
        assert re.search(r"\(tensor<8x16x64xi8>\) -> tensor<8x16x64xf32>", own)  # ... then cast
        analysis = texts[f"analysis {label}"]
        assert states_arg.search(next(x for x in analysis.splitlines() if "func.func public @main" in x))
    assert texts["score int8-states"] != plain["score"]
    assert texts["encode"] == plain["encode"]


def test_int8_dynamic_rows_use_the_int8_peak():
    """A row's MFU divides by the peak of its matmuls: the int8 peak (2x bf16 on v5e / v6e) for int8-dynamic,
    the bf16 peak for float, weight-only int8 and fp8; a chip without an int8 figure prints no MFU and says why."""
    assert flops.PEAK_INT8["v5e"] == 2 * flops.PEAK_BF16["v5e"]
    assert flops.PEAK_INT8["v6e"] == 2 * flops.PEAK_BF16["v6e"]
    w = aot.Workload(eval_batch=64)
    fields = {"xla_flops": 1e12, "bytes_accessed": 1e9, "optimal_seconds": 0.01, "unknown_cost_ops": 0}
    for gen in ("v5e", "v6e"):
        sl = aot.tpu_slice(f"{gen}-4")
        for mode, peak in (
            ("none", flops.PEAK_BF16[gen]),
            ("int8", flops.PEAK_BF16[gen]),
            ("fp8", flops.PEAK_BF16[gen]),
            ("int8-dynamic", flops.PEAK_INT8[gen]),
        ):
            row = aot.cost_row("score", sl, 4, 1, "nano", w, 4e12, fields, None, quantization=mode)
            assert row["quantization"] == mode and row["peak_flops"] == peak, (gen, mode)
            assert row["predicted_mfu"] == pytest.approx(1e12 / (0.01 * peak))
    v4 = aot.cost_row("score", aot.tpu_slice("v4-8"), 4, 1, "nano", w, 4e12, fields, None, quantization="int8-dynamic")
    assert v4["predicted_mfu"] is None and v4["mfu_note"] == "no MFU: no int8 peak for v4 in kalm_jax.perf.flops.PEAKS"
    assert "int8-dynamic" in aot.format_cost_table([v4]) and "no int8 peak for v4" in aot.format_cost_table([v4])


class _Engine:
    """The engine's row buckets (`InferenceEngine.rows`) over 4 batch shards, without a model."""

    def rows(self, n: int) -> int:
        from kalm_jax.inference.programs import batch_bucket, bucket

        return bucket(batch_bucket(n), 4)


@pytest.mark.parametrize(
    "base, per_row, curve",
    [
        (3.0, 0.02, 0.0),  # linear: the line's bucket and the one above it settle it
        (3.0, 0.02, 4e-5),  # memory grows faster than the line: bisection below the line's guess
        (15.5, 0.001, 0.0),  # only small batches fit
        (3.34, 0.00216, -2e-8),  # the line through small batches overstates the memory per row (large at n = 4096)
    ],
)
def test_largest_batch_brackets_the_largest_bucket_that_fits(monkeypatch, base, per_row, curve):
    """`largest_batch` against a memory model (GiB per device = base + per_row x rows + curve x rows^2, 16 GiB
    HBM): the answer is the largest engine bucket within HBM, found exactly (the next bucket up compiled and
    refused) within the compile budget, whether the memory curves up (the line's guess overshoots) or down (it
    undershoots: the search must not climb one bucket per compile)."""
    gib = aot.GiB
    compiled: list[int] = []

    def memory(rows):
        return int((base + per_row * rows + curve * rows * rows) * gib)

    def fake_compile(label, lower, mesh, hbm):
        rows = lower()
        compiled.append(rows)
        return aot.MemoryReport(label, memory(rows), 0, 0, 0, 0, hbm, 0.0)

    monkeypatch.setattr(aot_check, "compile_report", fake_compile)
    engine = _Engine()
    buckets = [m for m in range(4, 20000) if engine.rows(m) == m]
    want = max(m for m in buckets if memory(m) <= 16 * gib)
    first = fake_compile("score", lambda: engine.rows(100), None, 16 * gib)
    got = aot_check.largest_batch(lambda rows: lambda: rows, engine, 100, first, None, 16 * gib)
    assert got["max_batch"] == want and got["max_batch_exact"], (got, want)
    assert got["max_batch_per_shard"] == want // 4
    assert got["max_batch_bytes"] == memory(want)
    assert len(compiled) <= 8, compiled
