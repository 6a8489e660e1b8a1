"""The benchmark suite: CLI contract at the tiny shape, the FLOP model against a hand count, attention
implementations against the einsum reference, and the PyTorch peer doing the same work as kalm-jax."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kalm_jax.inference import scoring
from kalm_jax.model.attention import dispatch, masks
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.perf import flops

TINY = get_preset("tiny")


def test_cli_tiny_writes_contract_json(tmp_path, capsys):
    from kalm_jax.cli.bench import main

    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    rc = main(
        [
            "--config.shapes=tiny",
            "--config.encode_lengths=32",
            "--config.score_lengths=32",
            "--config.ratios=1,4",
            "--config.candidates=4",
            "--config.prompt_len=16",
            "--config.encode_tokens=128",
            "--config.warmup=1",
            "--config.repeats=2",
            "--config.rotations=2",
            "--config.peak_sizes=128",
            "--config.peer_on_cpu=true",
            f"--config.out={out}",
            f"--config.markdown={md}",
        ]
    )
    assert rc == 0
    rows = json.loads(out.read_text())
    kinds = {r["kind"] for r in rows}
    assert kinds == {"encode", "score", "online_ratio", "peer", "train"}, kinds
    assert all(r["shape"] == "tiny" for r in rows)

    (enc,) = [r for r in rows if r["kind"] == "encode"]
    assert (enc["n"], enc["r"], enc["batch"]) == (32, 1, 4)
    assert enc["tokens_per_s"] == pytest.approx(4 * 32 / enc["median_s"])
    assert enc["mfu"] == pytest.approx(flops.encoder_flops(TINY, 32) * 4 / enc["median_s"] / enc["peak_flops"])
    assert enc["min_s"] <= enc["median_s"] <= enc["max_s"] and enc["compile_s"] > 0

    scores = {r["r"]: r for r in rows if r["kind"] == "score"}
    assert sorted(scores) == [1, 4]
    assert scores[4]["cached_states"] == 8 and scores[4]["cache_bytes_per_passage"] == 8 * 64 * 2 + 8 * 4
    for r, s in scores.items():
        assert s["n"] == 32 and s["batch"] == 4 and s["pairs_per_s"] == pytest.approx(4 / s["median_s"])
        # main figure: states placed on the device beforehand; the host-states figure is kept beside it
        windows = {1: 32, 4: 16}[r]  # the engine's window bucket of 32 / 8 cached states
        assert s["states"] == "device" and s["device_cache_bytes"] == 4 * windows * (64 * 2 + 4)  # bf16 + int32 mask
        assert s["pairs_per_s_host_states"] == pytest.approx(4 / s["median_s_host_states"])
        assert s["min_s_host_states"] <= s["median_s_host_states"] <= s["max_s_host_states"]

    ratios = {r["r"]: r for r in rows if r["kind"] == "online_ratio"}
    assert sorted(ratios) == [1, 4]
    for r, row in ratios.items():
        assert row["n"] == 32
        assert row["analytic_ratio"] == pytest.approx(flops.online_ratio(TINY, 32, r, 16))
        per_pair = scores[r]["median_s"] / 4
        assert row["measured_ratio"] == pytest.approx((enc["median_s"] / 4 + per_pair) / per_pair)
        assert row["measured_ratio"] > 1

    peers = {(r["op"], r["r"]): r for r in rows if r["kind"] == "peer"}
    assert set(peers) == {("encode", 1), ("score", 1), ("score", 4)}
    assert peers[("score", 4)]["speedup"] == pytest.approx(
        scores[4]["pairs_per_s"] / peers[("score", 4)]["peer_pairs_per_s"]
    )

    train = [r for r in rows if r["kind"] == "train"]
    assert {r["mode"] for r in train} == {"full", "lora"}
    for r in train:
        assert "skipped" not in r, r.get("skipped")
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] > 0

    printed = capsys.readouterr().out
    for title in ("encode", "score", "online_ratio", "peer"):
        assert title in printed
    assert "| shape | n | r | measured | analytic |" in md.read_text()
    assert "| pairs/s | TFLOP/s | MFU | median ms | host-states pairs/s | host-states ms |" in md.read_text()


def _count(mask) -> int:
    return int(np.asarray(mask).sum())


def test_flop_model_matches_hand_count():
    # tiny: H=64, I=128, N=2, K=1, D=32, W=16; layers (sliding, full) in both stacks.
    linear = 2 * 64 * 2 * 32 + 2 * 64 * 1 * 32 * 2 + 2 * 2 * 32 * 64 + 3 * 2 * 64 * 128  # q, k+v, o, GeGLU
    pair = 2 * 2 * 32 * 2  # scores + weighted values, per head
    assert flops.token_linear_flops(TINY) == linear == 73728
    assert flops.attention_pair_flops(TINY) == pair == 256

    n = 40  # longer than the window, so the sliding layer sees fewer keys
    full, sliding = np.ones((n, n), bool), masks.encoder_window(n, TINY.sliding_window)
    assert _count(sliding) == 40 * 16 - (7 * 8 // 2 + 8 * 9 // 2)  # W keys per query, minus the clipped edges
    assert flops.encoder_flops(TINY, n) == 2 * n * linear + (_count(sliding) + _count(full)) * pair

    t, c = 20, 10  # prompt longer than the window (16): the sliding layer sees fewer keys
    dslide = masks.causal_window(t, TINY.sliding_window)
    assert _count(masks.causal_window(t)) == t * (t + 1) // 2
    kv = 2 * 2 * 64 * 1 * 32
    # layer 1 (sliding): every position; layer 2 (full, the last): k/v of every position, the rest for the
    # scoring position only (it sees all t self keys and the c passage states)
    first = t * linear + c * kv + (_count(dslide) + t * c) * pair
    last = (t + c) * kv + (linear - kv) + (t + c) * pair
    expect = first + last + 2 * 2 * 64
    assert flops.decoder_flops(TINY, t, c) == expect

    assert flops.online_ratio(TINY, 64, 4, t) == pytest.approx(
        (flops.encoder_flops(TINY, 64) + flops.decoder_flops(TINY, t, 16)) / flops.decoder_flops(TINY, t, 16)
    )
    length = t + 64
    ce_full, ce_slide = masks.causal_window(length), masks.causal_window(length, TINY.sliding_window)
    ce = 2 * length * linear + (_count(ce_full) + _count(ce_slide)) * pair + 2 * 2 * 64
    assert flops.cross_encoder_flops(TINY, 64, t) == ce


def _random_mask(rng, b, t, s):
    mask = rng.random((b, t, s)) < 0.6
    mask[..., 0] = True  # no fully masked rows
    return jnp.asarray(mask)


def test_attention_implementations_agree_on_cpu():
    rng = np.random.default_rng(0)
    b, t, s, n, k, d = 2, 7, 13, 4, 2, 16
    q, kk, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((b, t, n, d), (b, s, k, d), (b, s, k, d))
    )
    mask = _random_mask(rng, b, t, s)
    ref = dispatch.attention(q, kk, v, mask, 0.25, impl="xla")
    # Independent NumPy reference (float64, GQA by repeating kv heads).
    kr, vr = np.repeat(np.asarray(kk, np.float64), n // k, 2), np.repeat(np.asarray(v, np.float64), n // k, 2)
    sc = np.einsum("btnd,bsnd->bnts", np.asarray(q, np.float64), kr) * 0.25
    sc = np.where(np.asarray(mask)[:, None], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ref), np.einsum("bnts,bsnd->btnd", p, vr), atol=1e-5)
    fused = dispatch.attention(q, kk, v, mask, 0.25, impl="dot_product")
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), atol=1e-5)
    auto = dispatch.attention(q, kk, v, mask, 0.25, impl="auto")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
    if jax.default_backend() == "cpu":
        # On a CPU backend "auto" lowers the einsum reference (the TPU kernel only for TPU lowerings).
        assert dispatch.resolve_attention_impl("auto", jnp.bfloat16, 256) == "platform"
        assert dispatch.resolve_attention_impl("auto", jnp.bfloat16, 256, softcap=50.0) == "xla"
    with pytest.raises(ValueError, match="valid"):
        dispatch.resolve_attention_impl("flash", jnp.bfloat16, 256)
    with pytest.raises(ValueError, match="softcapping"):
        dispatch.resolve_attention_impl("cudnn", jnp.bfloat16, 256, softcap=50.0)


def test_model_attention_impl_switch_keeps_margins():
    model = build_model(TINY, seed=1)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 8000, (3, 40))
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    ids[mask == 0] = 0
    dec = rng.integers(3, 8000, (3, 9))
    dmask = np.ones_like(dec)
    dmask[2, 6:] = 0
    dec[dmask == 0] = 0
    out = {}
    for impl in ("xla", "dot_product"):
        model.attention_impl = impl
        states, pmask, _ = scoring.encode_passages(model, ids, mask, 4)
        out[impl] = (states, scoring.score(model, dec, dmask, states, pmask, 7, 9))
    np.testing.assert_allclose(out["dot_product"][0], out["xla"][0], atol=1e-5)
    np.testing.assert_allclose(out["dot_product"][1], out["xla"][1], atol=1e-5)


def test_peer_pipeline_scores_what_kalm_jax_scores(tmp_path):
    """The PyTorch peer (released path: pool -> model(encoder_outputs=pooled) -> yes/no at the last token)
    gives kalm-jax's margins for the same weights, so the speed comparison is like for like."""
    torch = pytest.importorskip("torch")
    from kalm_jax.checkpoints import hf
    from kalm_jax.perf.bench import peer as peer_lib

    p = peer_lib.build("tiny", "cpu", "float32", seed=3)
    p.model.save_pretrained(tmp_path)
    _, model = hf.load(tmp_path)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 8000, (2, 24))
    mask = np.ones_like(ids)
    mask[0, 17:] = 0
    ids[mask == 0] = 0
    dec = rng.integers(3, 8000, (2, 8))
    dmask = np.ones_like(dec)
    t = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    pooled, pmask = peer_lib.encode_fn(p, 4)(t(ids), t(mask))
    margins = peer_lib.score_fn(p, 7, 9)(t(dec), t(dmask), pooled, pmask).numpy()
    states, ours_mask, _ = scoring.encode_passages(model, ids, mask, 4)
    np.testing.assert_array_equal(pmask.numpy(), ours_mask)
    np.testing.assert_allclose(pooled.numpy(), states, atol=1e-4)
    np.testing.assert_allclose(margins, scoring.score(model, dec, dmask, states, ours_mask, 7, 9), atol=1e-4)


def test_h100_suite_runs_its_code_path_on_a_tiny_shape(tmp_path, monkeypatch):
    """bench.py:h100 is the fixed grid (nano, large; n 512/4096; r 1,4,8; 100 candidates; no train) and
    writes one JSON and one markdown table; flags given explicitly shrink it so CPU runs the same path."""
    from kalm_jax.cli.bench import main
    from kalm_jax.perf.bench import suite

    assert (
        suite.H100.shapes,
        suite.H100.encode_lengths,
        suite.H100.score_lengths,
        suite.H100.ratios,
        suite.H100.candidates,
        suite.H100.train,
    ) == (("nano", "large"), (512, 4096), (512, 4096), (1, 4, 8), 100, False)
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "--config=bench.py:h100",
            "--config.shapes=tiny",
            "--config.encode_lengths=32",
            "--config.score_lengths=32",
            "--config.ratios=4",
            "--config.candidates=4",
            "--config.prompt_len=16",
            "--config.encode_tokens=64",
            "--config.repeats=1",
            "--config.peak_sizes=128",
            "--config.peer=off",
        ]
    )
    assert rc == 0
    rows = json.loads((tmp_path / "bench_h100.json").read_text())
    assert {r["kind"] for r in rows} == {"encode", "score", "online_ratio", "peer"}  # no train rows in this suite
    enc = next(r for r in rows if r["kind"] == "encode")
    assert enc["repeats"] == 1 and enc["batch"] == 2
    assert "**score**" in (tmp_path / "bench_h100.md").read_text()


def test_a_failing_cell_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """One cell that raises (here: the score cell at r = 4) becomes a `skipped: failed: ...` row; the other
    cells are still measured and written, and the exit status is 1."""
    from kalm_jax.cli.bench import main
    from kalm_jax.perf.bench import suite

    real = suite.score_row

    def flaky(ctx, n, r, settings, peak):
        if r == 4:
            raise RuntimeError("cuDNN refused the mask")
        return real(ctx, n, r, settings, peak)

    monkeypatch.setattr(suite, "score_row", flaky)
    out = tmp_path / "rows.json"
    rc = main(
        [
            "--config.shapes=tiny",
            "--config.encode_lengths=32",
            "--config.score_lengths=32",
            "--config.ratios=1,4",
            "--config.candidates=2",
            "--config.prompt_len=8",
            "--config.encode_tokens=64",
            "--config.repeats=1",
            "--config.warmup=0",
            "--config.rotations=1",
            "--config.peak_sizes=128",
            "--config.peer=off",
            "--config.train=false",
            f"--config.out={out}",
        ]
    )
    assert rc == 1
    rows = json.loads(out.read_text())
    failed = [r for r in rows if str(r.get("skipped", "")).startswith("failed:")]
    assert [(r["kind"], r["r"]) for r in failed] == [("score", 4)]
    assert "cuDNN refused the mask" in failed[0]["skipped"]
    assert {(r["kind"], r.get("r")) for r in rows if "skipped" not in r} >= {
        ("encode", 1),
        ("score", 1),
        ("online_ratio", 1),
    }
    assert "cuDNN refused the mask" in capsys.readouterr().err


def test_side_by_side_same_weights_interleaved(tmp_path):
    """bench.py:side_by_side: kalm-jax (through the engine) and the PyTorch peer on identical weights give
    the same pooled states and margins; both sides are timed in every round."""
    pytest.importorskip("torch")
    from kalm_jax.cli.bench import main

    out = tmp_path / "sbs.json"
    rc = main(
        [
            "--config=bench.py:side_by_side",
            "--config.shapes=tiny",
            "--config.dtype=float32",
            "--config.score_lengths=48",
            "--config.ratios=4",
            "--config.candidates=3",
            "--config.prompt_len=12",
            "--config.rounds=2",
            "--config.repeats=1",
            f"--config.out={out}",
        ]
    )
    assert rc == 0
    enc, sc, host = json.loads(out.read_text())
    assert (enc["op"], sc["op"]) == ("encode", "score") and enc["rounds"] == sc["rounds"] == 2
    # tiny: H 64, I 128; the matmul timed beside the peer's in every round
    assert (host["path"], host["op"], host["matmul_shape"]) == ("host", "matmul", [3 * 48, 64, 128])
    assert len(host["ours_round_s"]) == len(host["peer_round_s"]) == 2
    assert host["ours_gflops_per_s"] == pytest.approx(2 * 3 * 48 * 64 * 128 / host["ours_median_s"] / 1e9)
    rounds = [p / o for o, p in zip(host["ours_round_s"], host["peer_round_s"])]
    assert host["speedup"] == pytest.approx(sum(rounds) / 2)  # the median of two rounds
    assert len(enc["ours_round_s"]) == len(enc["peer_round_s"]) == 2
    assert enc["max_abs_state_diff"] < 1e-4 and sc["max_abs_margin_diff"] < 1e-4
    assert sc["ours_pairs_per_s"] == pytest.approx(3 / sc["ours_median_s"])
    assert enc["ours_tokens_per_s"] == pytest.approx(3 * 48 / enc["ours_median_s"])


def _fake_side_by_side_rows(encode: float, score: float, array_encode: float | None = None) -> list[dict]:
    """Rows as side_by_side.run(array_level=True) makes them, with the given median speedups."""
    rows = []
    for path, enc in (("engine", encode), ("array-level", encode if array_encode is None else array_encode)):
        for op, speedup in (("encode", enc), ("score", score)):
            rows.append(
                {
                    "kind": "side_by_side",
                    "shape": "nano",
                    "path": path,
                    "op": op,
                    "n": 512,
                    "r": 4,
                    "batch": 16,
                    "speedup": speedup,
                    "speedup_min": speedup * 0.95,
                    "speedup_max": speedup * 1.05,
                    "rounds": 3,
                }
            )
    return rows


@pytest.mark.parametrize(
    "encode,score,array_encode,failing",
    [
        (1.8, 5.2, None, []),
        (1.7, 5.0, None, []),  # the minimums themselves pass
        (1.69, 5.2, None, ["encode through the engine", "encode through the array-level"]),
        (1.8, 4.9, None, ["score through the engine", "score through the array-level"]),
        (1.8, 5.2, 0.73, ["encode through the array-level"]),
    ],
)
def test_side_by_side_check_exit_logic(monkeypatch, capsys, encode, score, array_encode, failing):
    """bench.py:side_by_side_check runs the side-by-side with the array-level path and exits 1 with one line
    naming every row below its minimum (encode 1.7x, score 5x); timings are faked here (CI never times)."""
    from kalm_jax.cli.bench import main
    from kalm_jax.perf.bench import side_by_side

    calls = []

    def fake_run(name, **kwargs):
        calls.append((name, kwargs))
        return _fake_side_by_side_rows(encode, score, array_encode)

    monkeypatch.setattr(side_by_side, "run", fake_run)
    rc = main(["--config=bench.py:side_by_side_check"])
    ((name, kwargs),) = calls
    assert (name, kwargs["n"], kwargs["r"], kwargs["candidates"], kwargs["prompt_len"]) == ("nano", 512, 4, 16, 64)
    assert (kwargs["dtype"], kwargs["rounds"], kwargs["array_level"]) == ("float32", 3, True)
    err = capsys.readouterr().err.strip().splitlines()
    if not failing:
        assert rc == 0 and not any("FAILED" in line for line in err)
        return
    assert rc == 1
    line = err[-1]
    assert line.startswith("side-by-side check FAILED: ")
    assert all(f in line for f in failing) and line.count("below") == len(failing), line


def test_side_by_side_check_refuses_rows_without_measurements():
    from kalm_jax.perf.bench import side_by_side

    with pytest.raises(ValueError, match="no side-by-side rows"):
        side_by_side.check([{"kind": "encode", "speedup": 9.0}], {"encode": 1.7, "score": 5.0})


def test_side_by_side_check_times_the_array_level_functions(tmp_path):
    """The check's real code path at a tiny shape: engine and array-level rows, each timed in every round
    beside the peer, with the peer's states and margins (minimums set to 0: tiny timings mean nothing)."""
    pytest.importorskip("torch")
    from kalm_jax.cli.bench import main

    out = tmp_path / "check.json"
    rc = main(
        [
            "--config=bench.py:side_by_side_check",
            "--config.shapes=tiny",
            "--config.score_lengths=48",
            "--config.candidates=3",
            "--config.prompt_len=12",
            "--config.rounds=2",
            "--config.repeats=1",
            "--config.min_encode_speedup=0",
            "--config.min_score_speedup=0",
            f"--config.out={out}",
        ]
    )
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [(r["path"], r["op"]) for r in rows] == [
        ("engine", "encode"),
        ("engine", "score"),
        ("array-level", "encode"),
        ("array-level", "score"),
        ("host", "matmul"),
    ]
    for r in rows:
        assert len(r["ours_round_s"]) == len(r["peer_round_s"]) == 2
        assert r.get("max_abs_state_diff", 0) < 1e-4 and r.get("max_abs_margin_diff", 0) < 1e-4
    assert rows[0]["peer_round_s"] == rows[2]["peer_round_s"]  # one peer timing per round, shared by both paths
