"""TPU AOT compilation on a CPU host: topology parsing and AOT compiles of the tiny preset for a v5e-4 slice
(needs libtpu). The splash-attention kernel itself is checked in tests/model/test_tpu_attention.py."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from kalm_jax import cli
from kalm_jax.cli import aot as aot_cli
from kalm_jax.inference.engine import InferenceEngine
from kalm_jax.model.config import get_preset
from kalm_jax.perf import aot
from kalm_jax.perf.flops import PEAK_BF16

REPO = Path(__file__).resolve().parents[2]
# What these tests read (costs, memory, compiled text) comes from fresh compiles, not the persistent cache.
pytestmark = pytest.mark.usefixtures("no_compilation_cache")


def test_tpu_slice_names():
    assert aot.tpu_slice("v5e-256").topology_name == "v5e:16x16"
    assert aot.tpu_slice("v5e-256").wrap == (True, True, False)
    v5p = aot.tpu_slice("v5p-128")
    assert (v5p.topology_name, v5p.chips, v5p.chip_config_name) == ("v5:4x4x4", 64, "megacore")
    assert aot.tpu_slice("v4-32").topology_name == "v4:2x2x4"
    assert aot.tpu_slice("v6e-256").hbm_bytes == 32 * 2**30
    with pytest.raises(ValueError, match="valid sizes for v5p"):
        aot.tpu_slice("v5p-100")
    with pytest.raises(ValueError, match="unknown TPU topology"):
        aot.tpu_slice("a100-8")


def test_aot_uses_the_one_mesh_module():
    """No private copies of the mesh axes, rules or mesh building, and no stand-in train step."""
    for name in (
        "MESH_AXES",
        "DEFAULT_RULES",
        "logical_to_spec",
        "build_mesh",
        "resolve_mesh_shape",
        "_rules",
        "lower_proxy_train",
    ):
        assert not hasattr(aot, name), name
    source = "".join(p.read_text() for p in sorted(Path(aot.__file__).parent.glob("*.py")))
    assert source.count("except ImportError") == 1  # only libtpu's install hint, no import fallbacks
    assert "stand-in" not in source


def _tpu_config(arg: str):
    return cli.load_file(str(REPO / "configs" / "tpu.py") + ":" + arg)


@pytest.mark.parametrize(
    "arg, mesh",
    [
        ("nano,v5e-256", (1, 128, 2)),
        ("large,v5p-128", (1, 64, 1)),  # the previously tabled entries
        ("nano,v5e-16", (1, 16, 1)),
        ("small,v6e-8", (1, 8, 1)),
        ("large,v4-32", (1, 16, 1)),  # untabled
        ("small,v5p-1024", (1, 128, 4)),
        ("nano,v5e-16,2", (2, 16, 1)),
    ],
)
def test_tpu_config_derives_a_mesh_for_any_slice(arg, mesh):
    cfg = _tpu_config(arg)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == mesh


def _weights_per_device(arg: str, mesh_shape: tuple[int, int, int]) -> tuple[float, dict]:
    """(per-device weight elements x devices / total elements, PartitionSpec by weight name) of the config's
    preset under its logical rules on an abstract (data, fsdp, tensor) mesh."""
    import math

    from flax import nnx
    from jax.sharding import AbstractMesh

    from kalm_jax.model.build import build_model
    from kalm_jax.model.config import get_preset
    from kalm_jax.parallel import mesh as mesh_lib

    cfg = _tpu_config(arg)
    mesh = AbstractMesh(mesh_shape, mesh_lib.MESH_AXES)
    rules = mesh_lib.rules_dict(cfg.logical_axis_rules)
    _, state = nnx.split(build_model(get_preset(str(cfg.model.preset)), abstract=True))
    axes = jax.tree.leaves(mesh_lib.logical_axes(state), is_leaf=lambda x: isinstance(x, tuple))
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    total = local = 0
    specs = {}
    for (path, value), ax in zip(flat, axes):
        spec = mesh_lib.logical_to_spec(ax, value.shape, mesh, rules)
        specs[str(getattr(path[-1], "key", path[-1]))] = spec
        split = math.prod(mesh.shape[a] for s in spec if s for a in ((s,) if isinstance(s, str) else s))
        total += math.prod(value.shape)
        local += math.prod(value.shape) // split
    return local * math.prod(mesh_shape) / total, specs


def test_tpu_config_splits_the_mlp_over_tensor():
    """v5e-256 meshes small as fsdp 128 x tensor 2: both chips of a tensor pair hold the same batch shard,
    so a weight left whole on tensor is computed twice. The MLP (~90% of small's linear FLOPs) splits over
    tensor as the query heads do (was: fsdp only, 1.93x the ideal weight bytes per chip, and the MLP
    FLOPs twice); fsdp-only meshes are unchanged. The MLP weights keep fsdp on embed, down included (with
    down's mlp on fsdp too, its gradient moved the activations by all-to-all)."""
    P = jax.sharding.PartitionSpec
    excess, specs = _weights_per_device("small,v5e-256", (1, 128, 2))
    for name in ("gate", "up", "down", "q", "o"):
        assert "tensor" in str(specs[name]) and "fsdp" in str(specs[name]), (name, specs[name])
    assert (specs["gate"], specs["down"]) == (P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")), specs
    assert excess < 1.25, excess  # the embedding (vocab on fsdp) and the kv / norm weights stay unsplit on tensor
    excess16, specs16 = _weights_per_device("nano,v5e-16", (1, 16, 1))
    assert str(specs16["gate"]) == str(jax.sharding.PartitionSpec(None, "fsdp", None))
    assert excess16 < 1.01, excess16


def test_tpu_config_keeps_the_qkv_projections_where_they_fit():
    """Remat keeps q/k/v (policy "qkv") when their estimate is at most 1/8 of a chip's HBM, then the down
    projections' outputs and the encoder's gate / up while all kept take at most 3/8: small and nano on
    v5e-256 (1 query x 16 passages per fsdp shard, tensor 2) keep all three, large there and small on
    v5e-16 (8 queries per chip) recompute everything."""
    from kalm_jax.model.config import get_preset
    from kalm_jax.perf import planning as tpu

    # 26 + 26 layers; q 2 heads x 256 + k, v 256 each per token; 16 x 512 passage tokens, 16 x 192 prompt
    # tokens per ratio (6), 16 x (512 + 256 + ... + 16) passage windows (keys and values only); bf16.
    expected = 2 * (26 * 16 * 512 * 1024 + 26 * (16 * 192 * 6 * 1024 + 16 * 1008 * 512))
    assert tpu.qkv_remat_bytes(get_preset("small"), 1, 16, 512, 192, (1, 2, 4, 8, 16, 32), 2) == expected
    # down's outputs: [tokens, 1152] per layer, 16 x 512 encoder and 16 x 192 x 6 decoder tokens; the
    # encoder's gate / up: 26 layers x 16 x 512 tokens x 2 x 6912 / 2 (tensor); bf16.
    assert tpu.mlp_out_remat_bytes(get_preset("small"), 1, 16, 512, 192, (1, 2, 4, 8, 16, 32)) == 2 * 1152 * 26 * (
        16 * 512 + 16 * 192 * 6
    )
    assert tpu.encoder_mlp_in_remat_bytes(get_preset("small"), 1, 16, 512, 2) == 2 * 26 * 16 * 512 * 2 * 3456
    policies = {
        arg: str(_tpu_config(arg).model.remat_policy)
        for arg in ("small,v5e-256", "nano,v5e-256", "large,v5e-256", "small,v5e-16", "small,v5p-64")
    }
    kept = "encoder:qkv+mlp_in+mlp_out,decoder:qkv+mlp_out"  # small on v5e-256: 5.95 GiB, <= 3/8 of 16 GiB
    # small on v5p-64 (4 queries per chip): q/k/v 9.5 + down 5.9 GiB <= 3/8 of 95 GiB, + gate / up 21.9 is not
    assert policies == {
        "small,v5e-256": kept,
        "nano,v5e-256": kept,
        "large,v5e-256": "nothing",
        "small,v5e-16": "nothing",
        "small,v5p-64": "qkv+mlp_out",
    }, policies


@pytest.fixture()
def libtpu_env(monkeypatch):
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.fail("TPU AOT tests need the libtpu wheel: pip install -e '.[test]' (or 'kalm-jax[tpu]')")
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        monkeypatch.setenv(key, value)


def test_aot_tiny_v5e4_encode_score(libtpu_env, capsys):
    """AOT compile of the engine's encode + score programs for v5e-4: the inference policy keeps tiny's
    weights replicated on a data mesh of 4, the programs fit and use the Pallas TPU kernel, and the
    per-device argument bytes are the encoder's bf16 weights (unused ones pruned) and the batch shard, the
    decoder's weights the program leaves out are counted as unread beside them; with tensor 2 the heads'
    weights are split."""
    from flax import nnx

    from kalm_jax.model.build import build_model

    config = str(REPO / "configs" / "tpu.py") + ":tiny,v5e-4"
    rc = aot_cli.main([f"--config={config}", "--topology=v5e-4", "--programs=encode,score"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in text and "fits: every program" in text
    assert "inference engine's programs; inference mesh: weights replicated on a data mesh of 4" in text
    assert "[4/4] score (the real program)" not in text and "[2/2] score (the real program)" in text

    cfg = cli.load_file(config)
    sl = aot.tpu_slice("v5e-4")
    devices = aot.topology_devices(sl)
    w = aot.workload_from_config(cfg)
    engine = aot.inference_engine("tiny", devices, w, hbm_bytes=sl.hbm_bytes)
    lowered = aot.lower_encode(engine, w)()
    hlo = lowered.as_text()
    assert "splash_mha_fwd" in hlo  # the Pallas flash kernel, not the einsum attention
    assert hlo.count('kernel_name = "kalm_fused_mlp"') == len(get_preset("tiny").encoder_layer_types)  # every MLP
    report = aot.MemoryReport.from_compiled("encode", lowered.compile(), sl.hbm_bytes, 0.0)
    state = nnx.split(build_model(get_preset("tiny"), abstract=True, param_dtype="bfloat16"))[1]
    encoder = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(state["encoder"]))
    embedding = int(np.prod(state["embedding"].get_value().shape)) * 2
    rows, length = engine.encode_shape(w.eval_batch, w.passage_len, w.ratio)
    batch_bytes = 2 * (rows // 4) * length * 4
    # XLA's argument bytes are the tiled per-device layouts with unused parameters (the decoder) pruned
    assert 0.95 * (encoder + embedding + batch_bytes) <= report.arguments <= 1.1 * (encoder + embedding + batch_bytes)
    # ... yet the engine holds the decoder's weights on each device while it runs: the report's `unread` (less
    # the tiled layouts' padding of the arguments, a third of tiny's decoder; see test_the_layer_scan_...)
    decoder = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves((state["decoder"], state["decoder_norm"])))
    unread = aot.unread_bytes(report, aot.engine_program(engine, "encode", w).args)
    assert 0.5 * decoder <= unread <= decoder, (unread, decoder)
    assert dataclasses.replace(report, unread=unread).total == report.total + unread
    assert "    unread" in text.splitlines()[text.splitlines().index("per-device memory on 1 x v5e-4") + 1]
    split = aot.inference_engine("tiny", devices, w, hbm_bytes=sl.hbm_bytes, weights="tensor:2")
    q = split._state["encoder"]["q"].get_value()
    assert q.sharding.shard_shape(q.shape)[2] == q.shape[2] // 2


def test_aot_reports_does_not_fit(libtpu_env, capsys):
    """A deliberately oversized encode batch: exit 1 with 'does not fit' and the figures, no crash."""
    config = str(REPO / "configs" / "tpu.py") + ":tiny,v5e-4"
    rc = aot_cli.main(
        [
            f"--config={config}",
            "--topology=v5e-4",
            "--programs=encode",
            "--config.eval.batch_size=65536",
            "--config.data.max_document_tokens=2048",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 1
    assert "does not fit: encode needs" in text and "HBM is 16 GiB" in text
    assert "RESOURCE_EXHAUSTED" in text
    rc = aot_cli.main([f"--config={config}", "--topology=v5e-4", "--hbm_bound"])  # a cost-row option, no --report
    assert rc == 2 and "--hbm_bound adds to the cost rows: give --report=FILE as well" in capsys.readouterr().err


def test_aot_report_counts_the_batch_the_policy_capped(libtpu_env, tmp_path, capsys, monkeypatch):
    """When the policy caps the engine's batch to keep the weights replicated, the report compiles and counts
    the capped batch: here a stand-in working set lets one row per chip fit beside the weights and not two,
    so tiny's 8 rows on v5e-4 become 4, and the row's XLA FLOPs and useful FLOPs are half of the uncapped
    run's."""
    import json

    from kalm_jax.parallel import inference_policy

    config = str(REPO / "configs" / "tpu.py") + ":tiny,v5e-4"

    def report(name: str) -> dict:
        out = tmp_path / f"{name}.json"
        rc = aot_cli.main([f"--config={config}", "--topology=v5e-4", "--programs=encode", f"--report={out}"])
        text = capsys.readouterr().out
        assert rc == 0, text
        return {"text": text, **json.loads(out.read_text())[0]}

    whole = report("whole")
    monkeypatch.setattr(inference_policy, "MIN_TOKENS", 64)
    monkeypatch.setattr(inference_policy, "working_set_bytes", lambda config, dtype, rows, *a, **k: rows // 2 * 2**40)
    capped = report("capped")
    assert (whole["batch"], capped["batch"]) == (8, 4)
    assert "batch 8;" in whole["text"] and "batch 4 (of 8 asked)" in capped["text"]
    assert capped["useful_flops"] == whole["useful_flops"] / 2
    assert capped["xla_flops"] == pytest.approx(whole["xla_flops"] / 2, rel=0.02)


def test_the_policy_on_tpu_devices_counts_no_scores_under_the_splash_kernel(libtpu_env):
    """The engine over a v6e-8 topology (the AOT report's engine) runs the splash kernel, whose scores stay on
    chip: large keeps its weights replicated at the 2048 rows asked (1024 on CPU devices, whose einsum
    attention writes its scores); with the einsum attention on TPU too (`tpu_attention="xla"`) it is 1024."""
    from kalm_jax.model.build import build_model
    from kalm_jax.model.options import ModelOptions
    from kalm_jax.perf.aot.programs import Workload, inference_engine
    from kalm_jax.perf.aot.topology import topology_devices, tpu_slice

    v6e = tpu_slice("v6e-8")
    engine = inference_engine("large", topology_devices(v6e), Workload(eval_batch=2048), hbm_bytes=v6e.hbm_bytes)
    assert (engine.policy.mode, engine.policy.rows, engine.batch_size) == ("replicated", 2048, 2048)
    assert "batch 2048;" in engine.policy.describe()
    einsum = InferenceEngine(
        build_model(
            get_preset("large"),
            abstract=True,
            param_dtype="bfloat16",
            dtype="bfloat16",
            options=ModelOptions(tpu_attention="xla"),
        ),
        devices=topology_devices(v6e),
        batch_size=2048,
        max_document_tokens=512,
        max_prompt_tokens=128,
        yes_id=1,
        no_id=2,
        device_memory=v6e.hbm_bytes,
        show_progress=False,
    )
    assert einsum.policy.rows == 1024


@pytest.mark.parametrize("program", ["encode", "score"])
def test_the_layer_scan_copies_no_weights(libtpu_env, program):
    """nano cut to 14 layers (two periods of 5 sliding + 1 full, then 2 more; large's 34 are 5 periods + 4,
    small's 26 are 4 + 2), compiled for v5e-4 as the engine runs it: the scan over whole periods reads each layer's
    weights in place in the stacked arrays. A scan over a slice of the stack copied the sliced weights into
    buffers that live through the call (here 90.6 MB of temporaries beside the 156 MB stack, 3 MB now; large on
    v6e-8 at 16 passages per chip: 6.9 GiB, 1.1 now). The decoder's last layer runs apart, so its scan covers
    12 of 13 layers: the same holds for score. The program leaves the other stack's weights out of its
    arguments; the report counts them as `unread`, since the engine holds them."""
    from flax import nnx

    from kalm_jax.perf.aot.programs import Workload, inference_engine

    v5e = aot.tpu_slice("v5e-4")
    w = Workload(eval_batch=4, passage_len=128, query_len=32)
    engine = inference_engine("nano", aot.topology_devices(v5e), w, hbm_bytes=v5e.hbm_bytes, layers=14)
    model = engine.model
    stack, other = (model.encoder, model.decoder) if program == "encode" else (model.decoder, model.encoder)
    stack_bytes, other_bytes = (
        sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(s))) for s in (stack, other)
    )
    lowered = aot.engine_program(engine, program, w).lower()
    report = aot.MemoryReport.from_compiled(program, lowered.compile(), v5e.hbm_bytes, 0.0)
    assert report.temporaries < stack_bytes / 4, (report.temporaries, stack_bytes)
    # the other stack's weights: left out of the program's arguments, held by the engine (the report's `unread`)
    unread = aot.unread_bytes(report, aot.engine_program(engine, program, w).args)
    assert 0.97 * other_bytes <= unread <= 1.01 * other_bytes, (unread, other_bytes)  # + its final norm


@pytest.mark.parametrize("weights", ["replicated", "tensor:2"])
def test_the_policy_working_set_is_at_least_the_compilers(libtpu_env, weights):
    """The policy's per-device working-set estimate (`inference_policy.working_set_bytes`) against XLA:TPU's own
    temporaries for the engine's encode program (nano, 512 passages of 512 tokens on v5e-4, weights replicated
    or split over tensor 2 with the encoder's tokens split too; score's are a third of encode's there): never
    below them, so a batch the policy lets through fits, and within 3x (2.3x and 1.3x here)."""
    from kalm_jax.perf.aot.programs import Workload, inference_engine, lower_encode

    v5e = aot.tpu_slice("v5e-4")
    w = Workload(eval_batch=512, passage_len=512, query_len=128)
    engine = inference_engine("nano", aot.topology_devices(v5e), w, hbm_bytes=v5e.hbm_bytes, weights=weights)
    with jax.set_mesh(engine.mesh):
        temps = lower_encode(engine, w)().compile().memory_analysis().temp_size_in_bytes
    assert temps <= engine.policy.working_bytes < 3 * temps, (engine.policy.working_bytes, temps)


def test_aot_two_slice_train_step(libtpu_env, capsys):
    """--num_slices=2: two v5e-4 slices joined over DCN, data axis across them; the real train step compiles."""
    config = str(REPO / "configs" / "tpu.py") + ":tiny,v5e-4,2"
    rc = aot_cli.main([f"--config={config}", "--topology=v5e-4", "--num_slices=2", "--programs=train"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert (
        "2 x v5e-4" in text and "8 devices" in text and "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in text
    )  # tiny: 4 queries, 2 per slice


def test_aot_cost_report_contract(libtpu_env, tmp_path, capsys):
    """--report: one row per program with the contract fields, per chip; the analysis variant counts every
    layer (a while loop over layers would be counted once: ratio ~0.5 at tiny's 2 layers) and the engine's
    splash kernels are accounted (FLOPs beside XLA's, optimal_seconds > 0). With --hbm_bound each row also has
    the bound on its HBM bytes, below the compiler's figure, and the progress says what is compiled twice."""
    import json

    out = tmp_path / "cost.json"
    config = str(REPO / "configs" / "tpu.py") + ":tiny,v5e-4"
    shapes = ["--config.data.max_document_tokens=128", "--config.data.max_query_tokens=32"]  # the engine's buckets
    args = ["--topology=v5e-4", "--programs=encode,score", f"--report={out}", "--hbm_bound", *shapes]
    rc = aot_cli.main([f"--config={config}", *args])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "encode analysis variant (and again with every buffer in HBM):" in text
    rows = json.loads(out.read_text())
    assert [r["program"] for r in rows] == ["encode", "score"]
    for r in rows:
        assert 0 < r["bytes_hbm_bound"] < r["bytes"] and r["bytes_hbm_bound_ratio"] > 0, r
        assert f"HBM at most {r['bytes_hbm_bound'] / 1e9:.2f} GB" in text
        for key in (
            "program",
            "topology",
            "xla_flops",
            "useful_flops",
            "bytes_accessed",
            "optimal_seconds",
            "predicted_mfu",
        ):
            assert key in r, key
        assert r["topology"] == "v5e-4" and r["optimal_seconds"] > 0 and r["bytes_accessed"] > 0
        assert r["unknown_cost_targets"]["splash attention"] > 0 and r["unaccounted"] == []
        assert r["flops"] == r["xla_flops"] + r["unknown_cost_flops"] and r["unknown_cost_flops"] > 0
        # above 1: the kernel computes whole 128-key blocks where tiny's window needs 16 keys of each row
        assert 0.9 <= r["flops"] / r["useful_flops"] <= 5, r
        assert 0 < r["predicted_mfu"] < 1
    cfg = _tpu_config("tiny,v5e-4")
    from kalm_jax.model.config import get_preset
    from kalm_jax.perf import flops

    # per chip: the global batch's useful FLOPs over the 4 chips
    assert rows[0]["useful_flops"] == pytest.approx(
        cfg.eval.batch_size * flops.encoder_flops(get_preset("tiny"), 128) / 4
    )
    assert rows[0]["tokens_per_s"] == pytest.approx(rows[0]["passages_per_s"] * 128)
    assert rows[1]["pairs_per_s"] > 0


def test_layer_samples_and_extrapolation_are_exact_for_a_per_layer_cost_model():
    """`layer_samples` picks 2, 3 and one period of 5 sliding + 1 full (never a 1-layer program);
    `extrapolate_costs` recovers the whole stack's cost from samples that follow constant + per-layer-type
    costs, and refuses a failed sample (cost -1) instead of fitting it."""
    from kalm_jax.model.config import get_preset

    types = get_preset("small").encoder_layer_types  # 26 layers: 22 sliding, 4 full
    assert aot.layer_samples(types) == (2, 3, 6)
    assert aot.layer_samples(get_preset("tiny").encoder_layer_types) == ()  # 2 layers: compile it whole
    assert aot.layer_samples(("full",) * 5) == (2, 3)
    assert aot.layer_samples(("full", "sliding", "sliding")) == ()  # samples would not be smaller
    fixed = {
        "xla_flops": 7.0,
        "bytes_accessed": 70.0,
        "optimal_seconds": 0.7,
        "optimal_seconds_raw": -1.3,
        "unknown_cost_ops": 2,
    }
    per = {"sliding_attention": (3.0, 30.0, 0.3, 0.3, 1), "full_attention": (5.0, 50.0, 0.5, 0.5, 0)}

    def cost(layers):
        out = dict(fixed)
        for t in layers:
            for key, v in zip(aot.COST_KEYS, per[t]):
                out[key] += v
        return out

    got = aot.extrapolate_costs(types, {k: cost(types[:k]) for k in (2, 3, 6)})
    want = cost(types)
    assert got["unknown_cost_ops"] == want["unknown_cost_ops"] == 24
    for key in aot.COST_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    # counts per target: the kernel's follow the layers; XLA's prefetch joins do not (large on v5e-16 at tensor
    # 2: 6, 3 and 3 in the samples, whose one fit gave the whole model 0 unknown-cost ops): the most of any sample
    targets = {2: {"ConcatBitcast": 6, "splash attention": 2}, 3: {"ConcatBitcast": 3, "splash attention": 3}}
    targets[6] = {"ConcatBitcast": 3, "splash attention": 6}
    samples = {
        k: {**cost(types[:k]), "unknown_cost_targets": t, "unknown_cost_ops": sum(t.values())}
        for k, t in targets.items()
    }
    got = aot.extrapolate_costs(types, samples)
    assert got["unknown_cost_targets"] == {"ConcatBitcast": 6, "splash attention": 26}
    assert got["unknown_cost_ops"] == 32
    with pytest.raises(ValueError, match="optimal_seconds of a sampled analysis compile is unknown"):
        aot.extrapolate_costs(
            types, {2: cost(types[:2]), 3: {**cost(types[:3]), "optimal_seconds": -1.0}, 6: cost(types[:6])}
        )


def tiny_with_layers(monkeypatch, types: tuple[str, ...]) -> None:
    """The "tiny" preset, as `config.get_preset` gives it, with the layer types `types` in each stack."""
    import dataclasses

    from kalm_jax.model import config as config_lib

    tiny = config_lib.get_preset("tiny")
    model = dataclasses.replace(tiny, encoder_layer_types=types, decoder_layer_types=types)
    monkeypatch.setattr(config_lib, "get_preset", lambda name: model if name == "tiny" else tiny)


@pytest.fixture()
def eight_layer_tiny(monkeypatch):
    """The "tiny" preset with 8 layers per stack (5 sliding + 1 full + 2 sliding): enough layers for the 2-, 3-
    and 6-layer analysis samples to be smaller than the model."""
    from kalm_jax.model import config as config_lib

    tiny_with_layers(monkeypatch, config_lib.layer_pattern(8))


def test_sampled_analysis_matches_the_whole_unrolled_compile(libtpu_env, tmp_path, capsys, monkeypatch):
    """`--analysis_layers=sampled` (2, 3 and 4 layers per stack, extrapolated per layer type) against the
    whole unrolled analysis of a 5-layer model (tiny's widths, 2 sliding + 1 full + 2 sliding: a pattern of
    period 3, window 16 < 128 tokens) on v5e-4, encode and score: the compiler's FLOPs agree to 1e-3, bytes and
    optimal_seconds to 10%; the 4-layer sample alone is far from the answer."""
    import importlib
    import json

    sliding, full = "sliding_attention", "full_attention"
    tiny_with_layers(monkeypatch, (sliding, sliding, full, sliding, sliding))

    check = importlib.import_module("kalm_jax.perf.aot.check")  # the module (the package exports its `check`)

    # Each run also compiles the real encode and score programs for the memory table: the same programs in both
    # runs, and not what this test compares, so the second run reuses the first run's reports.
    reports, compile_report = {}, check.compile_report

    def compile_once(name, lowered, *args):
        if name not in reports:
            reports[name] = compile_report(name, lowered, *args)
        return reports[name]

    monkeypatch.setattr(check, "compile_report", compile_once)
    config = str(REPO / "configs" / "tpu.py") + ":tiny,v5e-4"
    workload = [
        "--config.eval.batch_size=256",  # 64 rows per chip: the replicated weights do not dominate the bytes
        "--config.data.max_document_tokens=128",  # the engine's length bucket
        "--config.data.max_query_tokens=32",
        "--programs=encode,score",
        "--topology=v5e-4",
    ]
    rows = {}
    for how in ("all", "sampled"):
        out = tmp_path / f"{how}.json"
        rc = aot_cli.main([f"--config={config}", *workload, f"--analysis_layers={how}", f"--report={out}"])
        assert rc == 0, capsys.readouterr().out
        rows[how] = json.loads(out.read_text())
    for whole, sampled in zip(rows["all"], rows["sampled"]):
        assert sorted(sampled["analysis_samples"]) == ["2", "3", "4"]
        assert "extrapolated per layer type from [2, 3, 4]" in sampled["analysis"]
        # XLA fuses a few elementwise ops of the RoPE differently from layer to layer (4e-4 of the FLOPs here)
        assert sampled["xla_flops"] == pytest.approx(whole["xla_flops"], rel=1e-3)
        assert sampled["flops"] == pytest.approx(whole["flops"], rel=1e-3)  # the splash kernels' FLOPs too
        assert sampled["unknown_cost_flops"] > 0 and sampled["unknown_cost_ops"] >= 0
        for key in ("bytes_accessed", "optimal_seconds"):
            assert sampled[key] == pytest.approx(whole[key], rel=0.10), (whole["program"], key)
        assert sampled["analysis_samples"]["4"]["xla_flops"] < 0.9 * whole["xla_flops"]


@pytest.mark.parametrize("weights", ["replicated", "tensor:2"])
def test_engine_programs_are_what_aot_compiles(weights):
    """The AOT encode / score programs are the inference engine's: on 8 CPU devices, the program an engine
    over real bf16 weights runs in `encode_batch` / `score_batch` (the jitted function and the arrays it is
    called with, captured) lowers to the same text as `aot.lower_encode` / `lower_score` of the abstract
    engine aot builds for those devices: same functions, bucket shapes and shardings. The other layout
    lowers differently (the comparison can fail)."""
    from kalm_jax.model.build import build_model

    w = aot.Workload(passage_len=100, query_len=20, ratio=4, eval_batch=12)
    devices = jax.devices()
    assert len(devices) == 8
    engine = InferenceEngine(
        build_model(get_preset("tiny"), param_dtype="bfloat16"),
        devices=devices,
        batch_size=w.eval_batch,
        max_document_tokens=w.passage_len,
        max_prompt_tokens=w.query_len,
        yes_id=1,
        no_id=2,
        weights=weights,
    )
    calls = []

    def record(fn, *args, **kwargs):
        calls.append((fn, args))
        return InferenceEngine._call(engine, fn, *args, **kwargs)

    engine._call = record
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 8000, (w.eval_batch, w.passage_len)).astype(np.int32)
    states, smask, _ = engine.encode_batch(ids, np.ones_like(ids), w.ratio)
    dec = rng.integers(10, 8000, (w.eval_batch, w.query_len)).astype(np.int32)
    engine.score_batch(dec, np.ones_like(dec), states, smask)
    assert [fn.__name__ for fn, _ in calls] == ["encode_pool", "score_pairs"]

    def text(fn, args, mesh):
        with jax.set_mesh(mesh):
            return fn.lower(*args).as_text()

    ran = [text(fn, args, engine.mesh) for fn, args in calls]
    other = "replicated" if weights != "replicated" else "tensor:2"
    for setting, same in ((weights, True), (other, False)):
        ahead = aot.inference_engine("tiny", devices, w, weights=setting)
        lowered = [aot.lower_encode(ahead, w)().as_text(), aot.lower_score(ahead, w)().as_text()]
        for got, want in zip(lowered, ran):
            assert (got == want) is same, setting


def test_unknown_cost_ops_are_accounted_or_block_the_mfu(libtpu_env):
    """Programs with instructions XLA:TPU's cost analysis does not model, compiled for v5e-4: the fsdp
    all-gathers of an unrolled 4-layer MLP join their slices with `ConcatBitcast` (data movement: accounted
    from its shapes in the HLO, -1 s added back, the joined buffer's bytes timed at HBM bandwidth, MFU printed;
    the same program compiled without sliced prefetch has no `ConcatBitcast`, and the compiler's own bytes and
    roofline for it are the accounted ones), and a Pallas kernel is a `tpu_custom_call` whose FLOPs the HLO
    does not show (no MFU, and the row says why)."""
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from kalm_jax.perf.aot import hlo_cost as aot_cost

    sl = aot.tpu_slice("v5e-4")
    mesh = Mesh(np.array(aot.topology_devices(sl)), ("fsdp",))

    def spec(shape, *axes):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(*axes)))

    def mlp(w1, w2, x):
        for i in range(4):
            x = x + jnp.tanh(x @ w1[i]) @ w2[i]
        return x

    args = (spec((4, 640, 2048), None, "fsdp"), spec((4, 2048, 640), None, None, "fsdp"), spec((4096, 640), "fsdp"))
    compiled = jax.jit(mlp).lower(*args).compile()
    text = compiled.as_text()
    concat = [line for line in text.splitlines() if 'custom_call_target="ConcatBitcast"' in line]
    assert concat, "no ConcatBitcast in this compile: pick another program"
    out_bytes = sum(
        int(np.prod([int(d) for d in re.search(r"= bf16\[([\d,]+)\]", line).group(1).split(",")])) * 2
        for line in concat
    )
    fields = aot.cost_fields(compiled, "v5e")
    assert fields["unknown_cost_ops"] == len(concat) and fields["unaccounted"] == []
    assert fields["unknown_cost_bytes"] == out_bytes  # the joined buffer, once
    assert fields["optimal_seconds_raw"] < 0  # the raw roofline is broken by the -1s
    assert fields["optimal_seconds"] == pytest.approx(
        fields["optimal_seconds_raw"] + len(concat) + out_bytes / aot_cost.HBM_BANDWIDTH["v5e"]
    )
    unsliced = jax.jit(mlp).lower(*args).compile(compiler_options={"xla_tpu_sliced_prefetch_max_slices": 0})
    plain = aot.cost_fields(unsliced, "v5e")
    assert plain["unknown_cost_ops"] == 0 and plain["optimal_seconds"] == plain["optimal_seconds_raw"] > 0
    assert fields["bytes_accessed"] + fields["unknown_cost_bytes"] == pytest.approx(plain["bytes_accessed"], rel=1e-3)
    assert fields["optimal_seconds"] == pytest.approx(plain["optimal_seconds"], rel=1e-3)
    # charging the slices read as well (operands + output) would miss the compiler's figure by the buffer's size
    assert fields["bytes_accessed"] + 2 * out_bytes > plain["bytes_accessed"] * (1 + 1e-3)
    w = aot.Workload(eval_batch=4096)
    useful = 4 * 2 * (2 * 4096 * 640 * 2048)  # 4 layers x 2 matmuls, whole call (4 chips)
    row = aot.cost_row("encode", sl, 4, 1, "nano", w, useful, fields, None)
    assert row["unknown_cost_ops"] == len(concat) and row["mfu_note"] is None
    assert row["predicted_mfu"] == pytest.approx(useful / 4 / (fields["optimal_seconds"] * PEAK_BF16["v5e"]))

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0

    def double(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    one = Mesh(np.array(aot.topology_devices(sl)[:1]), ("fsdp",))  # Mosaic kernels are not partitioned
    x = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(one, P()))
    compiled = jax.jit(double).lower(x).compile()
    fields = aot.cost_fields(compiled, "v5e")
    assert fields["unknown_cost_ops"] == 1 and fields["unaccounted"] == ["tpu_custom_call"]
    row = aot.cost_row("encode", sl, 4, 1, "nano", w, 4 * 256 * 512, fields, None)
    assert row["predicted_mfu"] is None and "tpu_custom_call without a cost model" in row["mfu_note"]
    assert row["unknown_cost_ops"] == 1
    table = aot.format_cost_table([row])
    assert "n/a" in table and "tpu_custom_call without a cost model" in table
    # the same kernel with a cost estimate (as `kalm_jax.model.fused_mlp` carries): XLA costs it, nothing unknown
    estimate = pl.CostEstimate(flops=3 * 256 * 512, transcendentals=0, bytes_accessed=2 * 256 * 512 * 4)

    def costed(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), cost_estimate=estimate)(x)

    fields = aot.cost_fields(jax.jit(costed).lower(x).compile(), "v5e")
    assert fields["unknown_cost_ops"] == 0 and fields["unaccounted"] == []
    assert fields["xla_flops"] == estimate.flops and fields["bytes_accessed"] == estimate.bytes_accessed
    assert fields["optimal_seconds"] == fields["optimal_seconds_raw"] > 0  # no -1 to add back
    # its roofline: the estimate's bytes at about the chip's HBM bandwidth (the compiler's own figure is 10% lower)
    hbm_seconds = estimate.bytes_accessed / aot_cost.HBM_BANDWIDTH["v5e"]
    assert hbm_seconds <= fields["optimal_seconds"] < 1.2 * hbm_seconds
    # XLA's FLOPs short of the useful FLOPs (work it does not see): no MFU either
    short = aot.cost_row(
        "encode", sl, 4, 1, "nano", w, useful * 3, aot.cost_fields(jax.jit(mlp).lower(*args).compile()), None
    )
    assert short["predicted_mfu"] is None and "counts 33% of the useful FLOPs" in short["mfu_note"]


@pytest.mark.parametrize("topology", ["v4-8", "v6e-8"])
def test_the_fused_mlp_compiles_within_each_generations_vmem(libtpu_env, topology):
    """Mosaic compiles the fused MLP kernel (`kalm_jax.model.fused_mlp`) within the 16 MiB of scoped VMEM, v4's
    whole VMEM, at each block size its footprint picks: nano's MLP at 512 tokens, wider ones at 256 and 128, on
    a row count that needs padding; the model's larger presets do not fit there. With the generation's VMEM
    (`vmem_capacity`, as the engine passes it) small's whole MLP and large's half (tensor 2) compile on v6e, with
    a larger scoped limit, and still do not fit v4."""
    import jax.numpy as jnp

    from kalm_jax.model import fused_mlp

    device = aot.topology_devices(aot.tpu_slice(topology))[0]

    def arg(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))

    for hidden, width, rows, block in ((640, 2048, 8192, 512), (640, 2560, 1000, 256), (1152, 1536, 4096, 128)):
        assert fused_mlp.block_rows(hidden, width, jnp.bfloat16) == block
        args = (arg(rows, 1, hidden), arg(hidden), arg(hidden, width), arg(hidden, width), arg(width, hidden))
        compiled = jax.jit(lambda *a: fused_mlp.fused_mlp_residual(*a, 1e-6, None)).lower(*args, arg(hidden)).compile()
        assert "kalm_fused_mlp" in compiled.as_text()
    for preset in ("small", "large"):
        cfg = aot.model_config(preset)
        assert not fused_mlp.fits(cfg.hidden_size, cfg.intermediate_size, jnp.bfloat16)
    # with the generation's VMEM (what the engine passes): small whole and large's half at tensor 2 fit v6e, not v4
    capacity = fused_mlp.vmem_capacity(device.device_kind)
    for preset, tensor, block in (("small", 1, 512), ("large", 2, 256)):
        cfg = aot.model_config(preset)
        hidden, width = cfg.hidden_size, cfg.intermediate_size // tensor
        if topology == "v4-8":
            assert not fused_mlp.fits(hidden, width, jnp.bfloat16, capacity)
            continue
        assert fused_mlp.block_rows(hidden, width, jnp.bfloat16, capacity) == block
        args = (arg(1000, 1, hidden), arg(hidden), arg(hidden, width), arg(hidden, width), arg(width, hidden))
        run = jax.jit(lambda *a: fused_mlp.fused_mlp_residual(*a, 1e-6, None, capacity=capacity))
        assert "kalm_fused_mlp" in run.lower(*args, arg(hidden)).compile().as_text()


@pytest.mark.slow
def test_the_engine_fuses_a_split_mlp_within_its_generations_vmem(libtpu_env):
    """The engine's options carry its TPU generation's VMEM (`inference_policy.serving_options`), so under the
    tensor layout large's MLP (75 MiB of bf16 weights per device at tensor 2) runs in the fused kernel on v5e,
    whose VMEM holds it (Mosaic compiles it with the larger scoped limit), and stays on XLA's path on v4 (16 MiB):
    one encoder layer of large, lowered and compiled as the engine would run it."""
    from kalm_jax.perf.aot import hlo_cost as aot_cost

    w = aot.Workload(eval_batch=8, passage_len=512)
    counts = {}
    for topology in ("v5e-4", "v4-8"):
        sl = aot.tpu_slice(topology)
        devices = aot.topology_devices(sl)
        engine = aot.inference_engine("large", devices, w, hbm_bytes=sl.hbm_bytes, weights="tensor:2", layers=1)
        assert engine.policy.tensor == 2
        lowered = aot.lower_encode(engine, w)()
        counts[topology] = lowered.as_text().count('kernel_name = "kalm_fused_mlp"')
        if topology == "v5e-4":
            compiled = lowered.compile()
            text = compiled.as_text()
            kernels = [line for line in text.splitlines() if "kalm_fused_mlp" in line and "custom-call(" in line]
            assert len(kernels) == 1 and '"cost_estimate":' in kernels[0]
            unknown = [op.name for op in aot_cost.unknown_ops(text)]
            assert unknown and not any(name in kernels[0].split("=")[0] for name in unknown)  # costed: not unknown
    assert counts == {"v5e-4": 1, "v4-8": 0}


def test_the_hbm_bound_counts_each_buffer_once_in_hbm(libtpu_env):
    """`analyse(..., hbm_bound=True)` on one v5e chip, for gelu(x @ w1) @ w2 (x [8192, 640], h [8192, 2048]): the
    compile without memory-space assignment reads and writes every buffer once in HBM, so its bytes are the two
    matmuls' operands and outputs exactly; the compiler's figure for the program it would run adds four times
    each buffer it prefetches into on-chip memory (the copy's start and done each read and write it). The row
    carries the bound over the estimate, and a sampled fit with a refused bound says it is unknown."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from kalm_jax.perf.aot import cost as aot_cost_row
    from kalm_jax.perf.aot import hlo_cost as aot_cost

    sl = aot.tpu_slice("v5e-4")
    one = Mesh(np.array(aot.topology_devices(sl)[:1]), ("data",))

    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(one, P()))

    args = (spec(8192, 640), spec(640, 2048), spec(2048, 640))
    lowered = jax.jit(lambda x, w1, w2: jax.nn.gelu(x @ w1) @ w2).lower(*args)
    fields, err = aot_cost_row.analyse("encode", lambda: lowered, one, "v5e", hbm_bound=True)
    assert err is None
    x, w, h = 8192 * 640 * 2, 640 * 2048 * 2, 8192 * 2048 * 2
    assert fields["bytes_hbm_bound"] == 2 * (x + w + h)  # x, w1 -> h; h, w2 -> out (the size of x)
    text = lowered.compile().as_text()
    # a copy-start's shape is (to, from, context): the buffer is its first array
    prefetched = [
        aot_cost.shape_bytes(re.search(r" = \((\w+\[[\d,]*\])", line).group(1))
        for line in text.splitlines()
        if " copy-start(" in line
    ]
    assert prefetched, "nothing prefetched in this compile: pick another program"
    # to 1e-4: a few small instructions of the compile with the assignment (9 KB here)
    assert fields["bytes_accessed"] == pytest.approx(2 * (x + w + h) + 4 * sum(prefetched), rel=1e-4)
    row = aot.cost_row("encode", sl, 1, 1, "nano", aot.Workload(eval_batch=8), 1.0, fields, None, bytes_estimate=x + w)
    assert row["bytes_hbm_bound"] == 2 * (x + w + h)
    assert row["bytes_hbm_bound_ratio"] == pytest.approx(2 * (x + w + h) / (x + w))
    assert f"HBM at most {2 * (x + w + h) / 1e9:.2f} GB" in aot.format_cost_table([row])
    samples = {k: {**fields, "bytes_hbm_bound": -1.0 if k == 3 else fields["bytes_hbm_bound"]} for k in (2, 3, 6)}
    assert aot_cost_row.extrapolate_costs(["sliding"] * 5 + ["full"] * 3, samples)["bytes_hbm_bound"] == -1.0
    # samples that agree extrapolate to the same bound (a constant fits exactly)
    same = {k: dict(fields) for k in (2, 3, 6)}
    fitted = aot_cost_row.extrapolate_costs(["sliding"] * 5 + ["full"] * 3, same)["bytes_hbm_bound"]
    assert fitted == pytest.approx(fields["bytes_hbm_bound"])


def test_the_bytes_estimate_counts_the_tensor_layouts_collectives():
    """`estimate_bytes` under split weights adds what the layout's collectives move per layer and token: for the
    encoder's sequence parallelism 2 x (3 H + 2 H / t) (gathered input written, all-gather read, partial products
    written and read, reduce-scatter written), for the decoder's whole tokens 2 x 3 H (partial products written,
    all-reduced); nothing with replicated weights. Large at tensor 2 on 16 chips, 1,024 rows: 128 per data shard."""
    from kalm_jax.perf.aot import hlo_cost as aot_cost

    large, nano, w = aot.model_config("large"), aot.model_config("nano"), aot.Workload(eval_batch=1024)
    h, layers = large.hidden_size, large.num_encoder_layers
    encode_tokens, score_tokens = 128 * w.passage_len, 128 * w.query_len

    def extra(program, cfg=large, tensor=2):
        args = (program, cfg, w, 16, tensor)
        return aot_cost.estimate_bytes(*args) - aot_cost.estimate_bytes(*args, collectives=False)

    assert extra("encode") == layers * encode_tokens * 2 * (3 * h + h) * 2
    assert extra("score") == large.num_decoder_layers * score_tokens * 2 * 3 * h * 2
    assert extra("encode", nano, 1) == extra("score", nano, 1) == 0
    odd = aot.Workload(eval_batch=1024, passage_len=511)  # tokens not divisible by 2: no sequence parallelism
    whole = aot_cost.estimate_bytes("encode", large, odd, 16, 2)
    assert whole - aot_cost.estimate_bytes("encode", large, odd, 16, 2, collectives=False) == (
        layers * 128 * 511 * 2 * 3 * h * 2
    )


def test_attention_kernel_cost_reads_q_k_v_from_the_hlo():
    """The splash kernel's FLOPs and bytes from the shapes of one HLO line as XLA:TPU prints it (operands:
    mask metadata, q, k, v, segment ids; outputs: per-block scratch, then the attention output)."""
    from kalm_jax.perf.aot import hlo_cost as aot_cost

    text = "\n".join(
        [
            "  %c0 = s8[1,1,1]{2,1,0} constant({...})",
            "  %q = bf16[8,4,1024,256]{3,2,1,0:T(8,128)(2,1)} fusion(%a), kind=kLoop",
            "  %k = bf16[8,1,512,256]{3,2,1,0:T(8,128)(2,1)} fusion(%b), kind=kLoop",
            "  %v = bf16[8,1,512,256]{3,2,1,0:T(8,128)(2,1)} fusion(%c), kind=kLoop",
            "  %qs = s32[8,1024,128]{2,1,0} broadcast(%d), dimensions={0,1}",
            "  %splash_mha_fwd_segmented_no_residuals.7 = (f32[8,512,128]{2,1,0}, bf16[8,4,1024,256]{3,2,1,0}) "
            'custom-call(%c0, %q, %k, %v, %qs), custom_call_target="tpu_custom_call"',
        ]
    )
    (op,) = aot_cost.unknown_ops(text)
    assert op.attention_kernel and op.target == "tpu_custom_call"
    flops, nbytes = aot_cost.attention_kernel_cost(op)
    assert flops == 4 * 8 * 4 * 1024 * 512 * 256  # QK^T and PV, every query row of every head over 512 keys
    q = 8 * 4 * 1024 * 256 * 2
    kv = 2 * 8 * 512 * 256 * 2
    assert nbytes == 1 + q + 2 * kv + 8 * 1024 * 128 * 4 + q  # k / v read once per 512-row query block
    fields = aot_cost.account([op], 0.25, "v5e")  # a kernel adds no -1 to the compiler's figure
    assert fields["unaccounted"] == [] and fields["unknown_cost_targets"] == {"splash attention": 1}
    assert fields["optimal_seconds"] == pytest.approx(0.25 + max(flops / PEAK_BF16["v5e"], nbytes / 819e9))
    other = aot_cost.UnknownOp("tpu_custom_call", "my_kernel.1", 8, "f32[2]", ("f32[2]",))
    assert aot_cost.account([other], 0.0, "v5e")["unaccounted"] == ["tpu_custom_call"]


def test_analysis_accounts_the_engines_attention_kernel_as_xla_costs_the_einsum(libtpu_env):
    """nano with 2 layers per stack, encode and score compiled for v5e-4: the analysis variant keeps the
    engine's splash kernel, and the FLOPs accounted for its kernels plus XLA's own equal XLA's FLOPs for the
    same program with the einsum attention (whose attention XLA costs itself); the kernel keeps the encoder's
    512 x 512 scores on chip, so the accounted encode moves fewer bytes (the score program's 128 x 256 scores
    are small: there the kernel's transposes weigh as much). Every kernel is accounted and the row prints an
    MFU."""
    from kalm_jax.perf import flops

    sl = aot.tpu_slice("v5e-4")
    devices = aot.topology_devices(sl)
    w = aot.Workload(passage_len=512, query_len=128, ratio=4, eval_batch=8)
    kernel_engine, einsum_engine = (
        aot.inference_engine("nano", devices, w, hbm_bytes=sl.hbm_bytes, analysis=True, layers=2, einsum_attention=e)
        for e in (False, True)
    )
    for program, lower, kernels in (("encode", aot.lower_encode, 2), ("score", aot.lower_score, 1)):
        with_kernel, _ = aot.analyse(program, lower(kernel_engine, w), kernel_engine.mesh, "v5e")
        with_einsum, _ = aot.analyse(program, lower(einsum_engine, w), einsum_engine.mesh, "v5e")
        assert with_kernel["unknown_cost_targets"]["splash attention"] == kernels  # the score's last layer: einsum
        assert "splash attention" not in with_einsum["unknown_cost_targets"]
        assert with_kernel["unaccounted"] == []
        assert with_kernel["xla_flops"] + with_kernel["unknown_cost_flops"] == pytest.approx(
            with_einsum["xla_flops"], rel=2e-3
        ), program
        assert with_kernel["xla_flops"] < 0.95 * with_einsum["xla_flops"]  # the kernels' FLOPs are not XLA's
        kernel_bytes = with_kernel["bytes_accessed"] + with_kernel["unknown_cost_bytes"]
        einsum_bytes = with_einsum["bytes_accessed"] + with_einsum["unknown_cost_bytes"]
        assert kernel_bytes < (0.9 if program == "encode" else 1.1) * einsum_bytes, program
        mc = aot.model_config("nano", 2)
        useful = w.eval_batch * (
            flops.encoder_flops(mc, w.passage_len)
            if program == "encode"
            else flops.decoder_flops(mc, w.query_len, flops.cached_states(w.passage_len, w.ratio))
        )
        row = aot.cost_row(program, sl, 4, 1, "nano", w, useful, with_kernel, None)
        assert row["predicted_mfu"] is not None and row["mfu_note"] is None, row["mfu_note"]
        assert row["flops"] == with_kernel["xla_flops"] + with_kernel["unknown_cost_flops"]


def _q_sized_writes(block, b: int, t: int, cfg, device) -> int:
    """How many [B, T, N, D]-sized arrays (q's size) the compiled TPU program of the encoder attention block
    writes, counted over the entry computation's results (tuple members apart; the kernel's output included)."""
    from kalm_jax.model import layers
    from kalm_jax.model.attention import masks
    from kalm_jax.model.options import ModelOptions

    h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    sharding = jax.sharding.SingleDeviceSharding(device)

    def arg(shape, dtype=jax.numpy.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    w = {"q": arg((h, n, d)), "k": arg((h, k, d)), "v": arg((h, k, d)), "o": arg((n, d, h))}
    w |= {name: arg((d,)) for name in ("q_norm", "k_norm")} | {
        name: arg((h,)) for name in ("pre_attn_norm", "post_attn_norm")
    }

    def fn(x, w, keys):
        cos, sin = layers.rope_table(t, d, cfg.rope_local_theta, cfg.rope_local_factor)
        mask = masks.Mask(keys, masks.encoder_window(t, cfg.sliding_window), queries=keys)
        return x + block(x, w, mask, cos, sin, cfg, ModelOptions())

    lowered = jax.jit(fn).trace(arg((b, t, h)), w, arg((b, t), jax.numpy.int32)).lower(lowering_platforms=("tpu",))
    text = lowered.compile().as_text()
    entry = text[text.index("\nENTRY") :]
    q_size = b * t * n * d
    halves = 0  # q-sized results count 2, the RoPE halves 1 each
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (.+?) (fusion|custom-call|copy|transpose)\(", line)
        if m:
            for dims in re.findall(r"bf16\[([\d,]+)\]", m.group(1)):
                size = int(np.prod([int(x) for x in dims.split(",")]))
                halves += 2 if size == q_size else 1 if 2 * size == q_size else 0
    return halves // 2


def test_tpu_q_norm_rope_and_scale_are_one_pass_over_q(libtpu_env, monkeypatch):
    """The encoder attention block compiled for a v5e chip (nano's shapes, 8 passages of 512 tokens): q is written
    by its projection, once more normalised, rotated and scaled for the kernel (RoPE as a matmul with the signed
    half swap, `layers.rope_rotation_matmul`), and by the kernel. The sliced-halves RoPE, as on CPU, costs two
    more passes (the rotated halves, then their concatenation into the kernel's heads-major layout)."""
    from kalm_jax.model import layers

    cfg = get_preset("nano")
    device = aot.topology_devices(aot.tpu_slice("v5e-4"))[0]
    fused = _q_sized_writes(layers.self_attention_block, 8, 512, cfg, device)
    monkeypatch.setattr(layers, "apply_rope", lambda x, cos, sin: layers.rope_rotation_halves(x, cos[None], sin[None]))
    sliced = _q_sized_writes(layers.self_attention_block, 8, 512, cfg, device)
    assert fused == 3, fused  # projection, norm + RoPE + scale, kernel output
    assert sliced >= fused + 2, (fused, sliced)


def test_sampled_analysis_keeps_the_whole_models_layout(libtpu_env, eight_layer_tiny, tmp_path, capsys, monkeypatch):
    """A model truncated to 2, 3 or 6 layers has fewer weights than the whole, so the inference policy left to
    itself may lay it out otherwise than the real program (large on v5e-16: tensor 2 for the samples, 4 for the
    model). Here the policy splits the whole 8-layer tiny over tensor 2 and would keep a truncated one
    replicated: every sample is still analysed on the real program's tensor 2 layout."""
    import importlib

    from kalm_jax.parallel import inference_policy

    check = importlib.import_module("kalm_jax.perf.aot.check")  # the module, not `aot.check` the function
    decide, built = inference_policy.decide, []

    def whole_model_split(config, state, **kwargs):
        if kwargs.get("setting") is None:
            kwargs["setting"] = "tensor:2" if len(config.encoder_layer_types) == 8 else "replicated"
        return decide(config, state, **kwargs)

    def recording(preset, devices, w, **kwargs):
        engine = inference_engine(preset, devices, w, **kwargs)
        built.append((kwargs.get("layers"), engine.policy.mode, engine.policy.tensor))
        return engine

    inference_engine = check.inference_engine
    monkeypatch.setattr(inference_policy, "decide", whole_model_split)
    monkeypatch.setattr(check, "inference_engine", recording)
    config = str(REPO / "configs" / "tpu.py") + ":tiny,v5e-4"
    args = ["--topology=v5e-4", "--programs=encode", "--analysis_layers=sampled", f"--report={tmp_path / 'c.json'}"]
    rc = aot_cli.main([f"--config={config}", *args])
    assert rc == 0, capsys.readouterr().out
    assert sorted(built, key=str) == [(2, "tensor", 2), (3, "tensor", 2), (6, "tensor", 2), (None, "tensor", 2)]


def test_aot_report_samples_the_train_step_by_default(libtpu_env, monkeypatch, tmp_path, capsys):
    """The real sharded train step (kalm_jax.training.step.make_train_step, full fine-tuning, two MEP ratios)
    AOT-compiles for v5e-4 and fits; `--report` without `--analysis_layers` (auto): the train step's analysis
    is compiled at 2 and 3 layers per stack and extrapolated (nano's whole unrolled train step outgrows a 24 GB
    host), encode is unrolled whole. A tiny of 4 sliding layers per stack: one layer type, so 2 and 3 layers
    determine its cost model (`test_sampled_analysis_matches_the_whole_unrolled_compile` checks the fit of two
    types against the whole compile); 8 layers of two types took 2.6x as long to compile here."""
    import json

    tiny_with_layers(monkeypatch, ("sliding_attention",) * 4)

    out = tmp_path / "cost.json"
    config = str(REPO / "configs" / "tpu.py") + ":tiny,v5e-4"
    rc = aot_cli.main([f"--config={config}", "--topology=v5e-4", "--programs=encode,train", f"--report={out}"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "make_train_step (lora=False, ratios=(1, 4)" in text and "stand-in" not in text
    assert "fits: every program compiled within HBM" in text
    encode, train = json.loads(out.read_text())
    assert (encode["program"], train["program"]) == ("encode", "train")
    assert "analysis_samples" not in encode and "extrapolated" not in encode["analysis"]
    assert sorted(train["analysis_samples"]) == ["2", "3"]
    assert "extrapolated per layer type from [2, 3]" in train["analysis"]
    samples = train["analysis_samples"]  # 4 layers: the 3-layer sample plus one more layer's FLOPs
    per_layer = samples["3"]["xla_flops"] - samples["2"]["xla_flops"]
    assert per_layer > 0 and train["xla_flops"] == pytest.approx(samples["3"]["xla_flops"] + per_layer, rel=1e-6)
    assert "train analysis variant, 3 layer(s) per stack" in text and "[5/5]" in text
    assert train["predicted_mfu"] is not None
