"""Training: losses vs PyTorch, sharding invariance over meshes, LoRA, checkpoints (exact resume after
SIGKILL, corrupt-latest fallback, restore onto another mesh), config and mesh errors."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from child_process import child_env

from kalm_jax.checkpoints import orbax_io
from kalm_jax.inference import scoring
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.parallel import mesh as sharding
from kalm_jax.training import losses
from kalm_jax.training.checkpoints import Checkpointer
from kalm_jax.training.config import default_config, validate
from kalm_jax.training.state import model_kwargs, split_params
from kalm_jax.training.step import batch_structs, make_train_step

REPO = Path(__file__).resolve().parents[2]
B, G, S, T = 8, 2, 16, 16


def small_config(**mesh):
    c = default_config()
    c.data.batch_size, c.data.group_size, c.data.max_document_tokens, c.data.decoder_length = B, G, S, T
    c.mep.ratios = (1, 4)
    c.loss.listwise = 0.5
    c.loss.distill = 0.25
    c.total_steps = 10
    c.optimizer.warmup_steps = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh.get("data", 1), mesh.get("fsdp", 1), mesh.get("tensor", 1)
    return c


def synthetic_batch(seed=0) -> dict:
    """A batch of the pipeline's contract: deduplicated passages (last rows padding), shared passages."""
    rng = np.random.default_rng(seed)
    b = {k: np.zeros(shape, dt) for k, (shape, dt) in batch_structs(B, G, S, T).items()}
    n_unique = B * G - 3
    lengths = rng.integers(4, S + 1, n_unique)
    for i, n in enumerate(lengths):
        b["enc_ids"][i, :n] = rng.integers(200, 8000, n)
        b["enc_mask"][i, :n] = 1
    b["passage_index"] = rng.integers(0, n_unique, (B, G)).astype(np.int32)
    for i in range(B):
        n = int(rng.integers(6, T + 1))
        b["dec_ids"][i, :n] = rng.integers(200, 8000, n)
        b["dec_mask"][i, :n] = 1
    b["labels"][:, 0] = 1.0
    b["teacher"] = rng.uniform(size=(B, G)).astype(np.float32)
    b["teacher_mask"] = (rng.uniform(size=(B, G)) < 0.7).astype(np.float32)
    b["teacher"][b["teacher_mask"] == 0] = np.nan
    return b


# ---------------------------------------------------------------------- losses vs torch
def test_losses_match_torch():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 5)).astype(np.float32) * 3
    y = np.zeros((4, 5), np.float32)
    y[:, 0] = 1
    tm = torch.tensor(m)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(tm, torch.tensor(y)).item()
    assert float(losses.pointwise_nll(jnp.asarray(m), jnp.asarray(y))) == pytest.approx(ref, rel=1e-6)
    ref = torch.nn.functional.cross_entropy(tm / 0.5, torch.zeros(4, dtype=torch.long)).item()
    assert float(losses.listwise_ce(jnp.asarray(m), jnp.asarray(y), 0.5)) == pytest.approx(ref, rel=1e-6)
    t = rng.uniform(size=(4, 5)).astype(np.float32)
    mask = (rng.uniform(size=(4, 5)) < 0.6).astype(np.float32)
    t_nan = np.where(mask > 0, t, np.nan).astype(np.float32)
    keep = torch.tensor(mask > 0)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(tm[keep], torch.tensor(t)[keep]).item()
    assert float(losses.distill_bce(jnp.asarray(m), jnp.asarray(t_nan), jnp.asarray(mask))) == pytest.approx(
        ref, rel=1e-6
    )
    logits = torch.tensor(rng.normal(size=(4, 5, 50)).astype(np.float32))
    logp = torch.log_softmax(logits, -1)
    ref = torch.nn.functional.nll_loss(logp.reshape(-1, 50), torch.tensor(np.where(y > 0, 7, 9).reshape(-1))).item()
    got = losses.full_vocab_nll(jnp.asarray(logp[..., 7].numpy()), jnp.asarray(logp[..., 9].numpy()), jnp.asarray(y))
    assert float(got) == pytest.approx(ref, rel=1e-6)
    assert float(losses.teacher_probability(jnp.asarray([0.0]), "logit")[0]) == 0.5


# ---------------------------------------------------------------------- sharding invariance
MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def test_same_loss_and_grads_on_every_mesh():
    batch = synthetic_batch()
    model = build_model(get_preset("tiny"), **model_kwargs(small_config()))
    results = []
    for d, f, t in MESHES:
        cfg = small_config(data=d, fsdp=f, tensor=t)
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[: d * f * t])
        ts = make_train_step(get_preset("tiny"), cfg, mesh, yes_id=10, no_id=11, donate=False)
        state = ts.init_state(model)
        loss, metrics, grads = ts.grad_fn(state, ts.place_batch(batch))
        results.append((float(loss), {k: float(v) for k, v in metrics.items()}, jax.device_get(grads)))
    loss0, metrics0, grads0 = results[0]
    assert np.isfinite(loss0) and loss0 > 0
    assert {"loss/r1", "loss/r4", "loss_pointwise", "loss_listwise", "loss_distill"} <= set(metrics0)
    for (loss, metrics, grads), mesh in zip(results[1:], MESHES[1:]):
        assert loss == pytest.approx(loss0, abs=1e-5), mesh
        for k in metrics0:
            assert metrics[k] == pytest.approx(metrics0[k], abs=1e-5), (mesh, k)
        for (path, g0), g in zip(jax.tree_util.tree_flatten_with_path(grads0)[0], jax.tree.leaves(grads)):
            np.testing.assert_allclose(g, g0, atol=1e-5, rtol=0, err_msg=f"{mesh} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("per_pass", [0, 3])
def test_train_step_scores_every_ratio_like_the_serving_engine(per_pass):
    """A decoder pass scores several MEP ratios (each row's passage padded to the longest with masked
    windows): each ratio's loss equals torch's BCE over the margins the serving engine computes at that
    ratio alone."""
    from kalm_jax.inference.engine import InferenceEngine

    batch = synthetic_batch(seed=3)
    cfg = small_config(fsdp=2, tensor=2)
    cfg.mep.ratios = (1, 2, 4, 32)  # 32 > S: a single window per passage
    cfg.mep.ratios_per_pass = per_pass  # 0: one pass; 3: passes of (1, 2, 4) and (32,)
    cfg.loss.listwise = cfg.loss.distill = 0.0
    model = build_model(get_preset("tiny"), **model_kwargs(cfg))
    ts = make_train_step(
        get_preset("tiny"), cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:4]), yes_id=10, no_id=11, donate=False
    )
    _, metrics, _ = ts.grad_fn(ts.init_state(model), ts.place_batch(batch))
    engine = InferenceEngine(model, None, yes_id=10, no_id=11, show_progress=False)
    n_unique = int((batch["enc_mask"].sum(1) > 0).sum())
    states = engine.encode_ids(
        [row[m > 0].tolist() for row, m in zip(batch["enc_ids"][:n_unique], batch["enc_mask"][:n_unique])], 1
    )
    prompts = [row[m > 0].tolist() for row, m in zip(batch["dec_ids"], batch["dec_mask"])]
    for r in cfg.mep.ratios:
        margins = engine.margins(
            prompts, np.repeat(np.arange(B), G), states, batch["passage_index"].reshape(-1), ratio=r
        ).reshape(B, G)
        ref = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.tensor(margins), torch.tensor(batch["labels"])
        ).item()
        assert float(metrics[f"loss/r{r}"]) == pytest.approx(ref, abs=2e-5), r
        assert float(metrics[f"accuracy/r{r}"]) == np.mean(np.argmax(margins, -1) == 0), r


def test_remat_policies_save_what_they_name_and_keep_the_gradients():
    """Each `model.remat_policy` gives the same loss and gradients as no remat; the lowered gradient program
    recomputes fewer matmuls the more a policy keeps (nothing > qkv > projections); a policy per stack keeps
    the encoder's gate / up only (between qkv and qkv+mlp_in)."""
    batch = synthetic_batch()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    results, dots = {}, {}
    per_stack = "encoder:qkv+mlp_in,decoder:qkv"
    for policy in (None, "nothing", "qkv", "qkv+mlp_out", per_stack, "qkv+mlp_in", "projections"):
        cfg = small_config()
        cfg.model.remat = policy is not None
        cfg.model.remat_policy = policy or "nothing"
        checked = cfg.copy_and_resolve_references()
        checked.data.decoder_length = 0  # the synthetic prompts are T tokens, shorter than a real prompt template
        validate(checked)
        model = build_model(get_preset("tiny"), **model_kwargs(cfg))
        assert model.remat_policy == cfg.model.remat_policy
        ts = make_train_step(get_preset("tiny"), cfg, mesh, yes_id=10, no_id=11, donate=False)
        state, placed = ts.init_state(model), ts.place_batch(batch)
        dots[policy] = ts.grad_fn.lower(state, placed).as_text().count("stablehlo.dot_general")
        if policy in (None, "projections"):
            loss, _, grads = ts.grad_fn(state, placed)
            results[policy] = (float(loss), jax.device_get(grads))
    assert (
        dots["nothing"] > dots["qkv"] > dots["qkv+mlp_out"] > dots["projections"] >= dots[None]
        and dots["qkv"] > dots[per_stack] > dots["qkv+mlp_in"]
    ), dots
    (loss0, grads0), (loss, grads) = results[None], results["projections"]
    assert loss == pytest.approx(loss0, rel=1e-6)
    for (path, g0), g in zip(jax.tree_util.tree_flatten_with_path(grads0)[0], jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, g0, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
    cfg = small_config()
    cfg.model.remat_policy = "qkv+everything"
    with pytest.raises(
        ValueError, match=r"model.remat_policy: unknown remat policy 'qkv\+everything': \['everything'\]"
    ):
        validate(cfg)
    cfg.model.remat_policy = "encoder:qkv,decodr:qkv"
    with pytest.raises(ValueError, match=r"'decodr:qkv' is not 'encoder:POLICY' or 'decoder:POLICY'"):
        validate(cfg)
    cfg.model.remat_policy = "decoder:mlp"
    with pytest.raises(ValueError, match=r"unknown remat policy 'mlp'"):
        validate(cfg)


def test_loss_falls_when_fitting_a_batch():
    cfg = small_config(data=2, fsdp=2, tensor=2)
    cfg.optimizer.lr = 3e-3
    ts = make_train_step(get_preset("tiny"), cfg, sharding.make_mesh(cfg.mesh), yes_id=10, no_id=11)
    state = ts.init_state(build_model(get_preset("tiny"), **model_kwargs(cfg)))
    batch = ts.place_batch(synthetic_batch())
    seen = []
    for _ in range(10):
        state, metrics = ts.fn(state, batch)
        seen.append(float(metrics["loss"]))
    assert seen[-1] < 0.5 * seen[0], seen


def test_mesh_and_batch_errors():
    with pytest.raises(ValueError, match="needs 12 devices but 8"):
        sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="do not divide the 8"):
        sharding.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
    cfg = small_config(data=8)
    cfg.data.batch_size = 6
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by the 8 batch shards"):
        make_train_step(get_preset("tiny"), cfg, sharding.make_mesh(cfg.mesh), yes_id=10, no_id=11)


def test_config_typo_lists_valid_keys():
    cfg = default_config()
    cfg.optimizer.unlock()
    cfg.optimizer.learning_rate = 1.0
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer.learning_rate'.*'lr'"):
        validate(cfg)
    sys.path.insert(0, str(REPO / "configs"))
    try:
        import train as train_configs
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match="valid: sizes"):
        train_configs.get_config("tiyn")
    for name in ("tiny", "nano", "small", "large", "stage1", "stage2,small", "stage3,nano"):
        validate(train_configs.get_config(name))


# ---------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_merged_export_matches(tmp_path):
    cfg = small_config(data=2, fsdp=2, tensor=2)
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha = True, 4, 8.0
    cfg.optimizer.lr = 1e-2
    mesh = sharding.make_mesh(cfg.mesh)
    ts = make_train_step(get_preset("tiny"), cfg, mesh, yes_id=10, no_id=11)
    model = build_model(get_preset("tiny"), **model_kwargs(cfg))
    state = ts.init_state(model)
    before = jax.device_get(state["params"])
    for seed in range(2):
        state, metrics = ts.fn(state, ts.place_batch(synthetic_batch(seed)))
    after = jax.device_get(state["params"])
    lora_b, base = split_params(after, ts.trainable)
    lora_b0, base0 = split_params(before, ts.trainable)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(base0)):
        np.testing.assert_array_equal(a, b)  # frozen weights bit-identical
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora_b), jax.tree.leaves(lora_b0))]
    assert all(changed), "every LoRA factor should move"
    assert ts.abstract_state["opt_state"] is not None
    opt_leaves = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ts.abstract_state["opt_state"]))
    lora_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora_b))
    assert opt_leaves < 3 * lora_size  # no optimiser state for frozen weights

    adapted = ts.model(jax.device_get(state))
    batch = synthetic_batch(5)
    states, pmask, _ = scoring.encode_passages(adapted, batch["enc_ids"][:B], batch["enc_mask"][:B], 2)
    want = scoring.score(adapted, batch["dec_ids"], batch["dec_mask"], states, pmask, 10, 11)
    from kalm_jax.training.export import export

    src = orbax_io.save_model(adapted, tmp_path / "adapted")
    _, merged = orbax_io.load_model(export(src, tmp_path / "merged"))
    assert not merged.has_lora
    states_m, pmask_m, _ = scoring.encode_passages(merged, batch["enc_ids"][:B], batch["enc_mask"][:B], 2)
    got = scoring.score(merged, batch["dec_ids"], batch["dec_mask"], states_m, pmask_m, 10, 11)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want).max() > 1e-3


# ---------------------------------------------------------------------- CLI: resume, kill, corrupt
N = 4


@pytest.fixture(scope="module")
def train_jsonl(data_dir, scifact_index, tmp_path_factory):
    from kalm_jax.data.beir import load_beir
    from kalm_jax.data.negatives import mine_hard_negatives
    from kalm_jax.data.training_jsonl import write_training_jsonl

    ds = load_beir(data_dir / "scifact", "train")
    qids = sorted(ds.qrels)[:40]
    run = scifact_index.search({q: ds.queries[q] for q in qids}, k=20, show_progress=False)
    ex = mine_hard_negatives(ds, run, num_negatives=3, sample_end=20, show_progress=False)
    path = tmp_path_factory.mktemp("train") / "train.jsonl"
    write_training_jsonl(ex, path)
    return path


def cli(workdir: Path, jsonl: Path, tokenizer, data_dir, steps: int = 2 * N) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={REPO}/configs/train.py:tiny",
        f"--workdir={workdir}",
        f"--config.total_steps={steps}",
        f"--config.checkpoint.every={N}",
        "--config.eval.num_queries=0",
        f"--config.data.train_jsonl=('{jsonl}',)",
        f"--config.tokenizer={tokenizer.path}",
        "--config.data.batch_size=4",
        "--config.data.group_size=2",
        "--config.data.max_document_tokens=32",
        "--config.data.max_query_tokens=8",
        "--config.mep.ratios=(1,4)",
        "--config.optimizer.warmup_steps=2",
        f"--config.data.data_dir={data_dir}",
        "--config.tensorboard=False",
    ]


def env():
    return child_env()


def final_params(workdir: Path) -> dict:
    _, model = orbax_io.load_any(workdir)
    return orbax_io.param_tree(model)


@pytest.fixture(scope="module")
def straight_run(train_jsonl, tokenizer, data_dir, tmp_path_factory):
    w = tmp_path_factory.mktemp("straight")
    subprocess.run(cli(w, train_jsonl, tokenizer, data_dir), check=True, env=env(), capture_output=True, timeout=600)
    return w


def test_straight_run_learns_and_writes_metrics(straight_run):
    lines = [json.loads(x) for x in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 2 * N + 1))
    assert all(np.isfinite(x["loss"]) for x in lines)
    assert {"loss/r1", "loss/r4", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(lines[0])
    assert sorted(int(p.name) for p in (straight_run / "checkpoints").iterdir() if p.name.isdigit()) == [N, 2 * N]


def test_sigkill_and_resume_is_bitwise_exact(straight_run, train_jsonl, tokenizer, data_dir, tmp_path):
    w = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(w, train_jsonl, tokenizer, data_dir), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = w / "checkpoints" / str(N)
    deadline = time.time() + 400
    while not (first / "commit_success.txt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (first / "commit_success.txt").exists()
    assert not (w / "checkpoints" / str(2 * N)).exists(), "the run finished before it could be killed"
    subprocess.run(cli(w, train_jsonl, tokenizer, data_dir), check=True, env=env(), capture_output=True, timeout=600)
    a, b = final_params(straight_run), final_params(w)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    steps = [json.loads(x)["step"] for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 2 * N + 1))


def test_corrupt_latest_falls_back_onto_another_mesh(straight_run, tmp_path, caplog):
    import shutil

    w = tmp_path / "copy"
    shutil.copytree(straight_run, w)
    meta = json.loads((w / "checkpoints" / str(N) / "kalm_model" / "kalm_model.json").read_text())
    want = orbax_io.param_tree(orbax_io.load_model(w / "checkpoints" / str(N))[1])
    for f in (w / "checkpoints" / str(2 * N) / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:37])
    cfg = json.loads((w / "config.json").read_text())
    tc = small_config(data=2, fsdp=2, tensor=2)
    tc.data.batch_size, tc.data.max_document_tokens = cfg["data"]["batch_size"], cfg["data"]["max_document_tokens"]
    tc.loss.listwise = tc.loss.distill = 0.0
    tc.total_steps = 2 * N
    tc.optimizer.warmup_steps = 2
    model_cfg = orbax_io.build_abstract(meta).config
    ts = make_train_step(model_cfg, tc, sharding.make_mesh(tc.mesh), yes_id=10, no_id=11)
    ck = Checkpointer(w, tc.checkpoint)
    with caplog.at_level(logging.WARNING):
        state, step = ck.restore(ts.abstract_state, None)
    ck.close()
    assert step == N
    assert any("cannot be restored" in r.message for r in caplog.records)
    assert (w / "corrupt_checkpoints" / str(2 * N)).is_dir()
    assert state["params"]["embedding"].sharding.spec == ts.state_shardings["params"]["embedding"].spec
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(x, np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------- label (stage-3 input)
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_label_writes_teacher_probabilities(train_jsonl, tokenizer, tmp_path, quantization):
    import shutil

    from kalm_jax.data.training_jsonl import read_training_jsonl
    from kalm_jax.model import quantization as quantize
    from kalm_jax.text import prompts
    from kalm_jax.training.label import label

    teacher = orbax_io.save_model(build_model(get_preset("tiny"), seed=3), tmp_path / "teacher")
    shutil.copyfile(tokenizer.path, teacher / "tokenizer.model")
    src = tmp_path / "in.jsonl"
    lines = 1 if quantization else 3  # the quantized teacher: one example keeps the reference cheap
    src.write_text("".join(train_jsonl.read_text().splitlines(keepends=True)[:lines]))
    out = tmp_path / "out.jsonl"
    n = label(
        teacher, src, out, max_document_tokens=32, max_query_tokens=16, show_progress=False, quantization=quantization
    )
    assert n == lines
    _, model = orbax_io.load_model(teacher)
    if quantization:
        model = quantize.quantize_model(model, quantization)
    from kalm_jax.model import mep

    @jax.jit  # the reference, one compile per (passage, prompt) length instead of op-by-op dispatch
    def reference_margin(ids, mask, dec, dmask):
        states = model.encode(ids, mask)
        pooled, pmask, _ = mep.pool(states, mask, 4)
        return model.score_margin(dec, dmask, pooled, pmask, tokenizer.yes_id, tokenizer.no_id)

    for ex in read_training_jsonl(out):
        passages = ex.pos + ex.neg
        assert len(ex.pos_scores) == len(ex.pos) and len(ex.neg_scores) == len(ex.neg)
        for text, got in zip(passages, ex.pos_scores + ex.neg_scores):
            ids, mask = prompts.tokenize_documents(tokenizer, [text], 32)
            dec, dmask = prompts.tokenize_decoder_prompts(
                tokenizer, [ex.query], max_query_tokens=16, pad_to_multiple_of=None
            )
            margin = reference_margin(ids, mask, dec, dmask)
            assert got == pytest.approx(float(jax.nn.sigmoid(margin[0])), abs=1e-5)
    assert src.read_text().count("pos_scores") == 0  # input untouched


def test_cli_override_typo_lists_valid_keys(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            f"--config={REPO}/configs/train.py:tiny",
            f"--workdir={tmp_path}",
            "--config.optimizer.lrr=1",
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "optimizer has no 'lrr'" in r.stderr and "'lr'" in r.stderr and "'warmup_steps'" in r.stderr


def test_sigterm_saves_and_exits(train_jsonl, tokenizer, data_dir, tmp_path):
    w = tmp_path / "term"
    proc = subprocess.Popen(
        cli(w, train_jsonl, tokenizer, data_dir, steps=200),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = w / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received" in err
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 200
    assert orbax_io.latest_step_dir(w).name == str(done)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(train_jsonl, tokenizer, data_dir, tmp_path):
    w = tmp_path / "nan"
    args = cli(w, train_jsonl, tokenizer, data_dir, steps=6) + [
        "--config.optimizer.lr=1e30",
        "--config.optimizer.warmup_steps=0",
        "--config.optimizer.clip_norm=0",
        "--config.checkpoint.every=1",
    ]
    r = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "non-finite loss" in r.stderr and "Last good checkpoint" in r.stderr
    bad = int(r.stderr.split("non-finite loss")[1].split("at step ")[1].split()[0])
    steps = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == bad - 1
    params = final_params(w)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_stage_presets_train_one_epoch_and_mep_v3_is_the_papers_ratio_set():
    from kalm_jax.cli import load_file
    from kalm_jax.training.config import DEFAULT_RATIOS, resolve_total_steps

    stage = load_file(f"{REPO}/configs/train.py:stage2,small")
    assert stage.epochs == 1.0 and tuple(stage.mep.ratios) == DEFAULT_RATIOS
    assert tuple(load_file(f"{REPO}/configs/train.py:stage2,small,mep_v3").mep.ratios) == (2, 8, 32, 128)
    assert resolve_total_steps(stage, 809) == 7  # ceil(809 scifact train groups / batch 128)
    tiny = load_file(f"{REPO}/configs/train.py:tiny")
    assert tiny.epochs == 0 and resolve_total_steps(tiny, 809) == tiny.total_steps
    with pytest.raises(ValueError, match="unknown config preset"):
        load_file(f"{REPO}/configs/train.py:stage2,mep_v4")


# ---------------------------------------------------------------------- one run per workdir; a full disk
def test_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(train_jsonl, tokenizer, data_dir, tmp_path):
    """A second train.py on a workdir a running train.py holds exits 2 at once naming the holder's pid, and writes
    nothing; once the holder is SIGKILLed the lock is free (the next run gets past it). Before the fix both ran."""
    w = tmp_path / "locked"
    holder = subprocess.Popen(
        cli(w, train_jsonl, tokenizer, data_dir, steps=10_000),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while (
            holder.poll() is None
            and time.time() < deadline
            and (not (w / ".lock").exists() or f"pid {holder.pid} " not in (w / ".lock").read_text())
        ):
            time.sleep(0.05)
        assert holder.poll() is None, "the first run exited"
        t0 = time.perf_counter()
        r = subprocess.run(
            cli(w, train_jsonl, tokenizer, data_dir), env=env(), capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 2, r.stderr[-3000:]
        assert f"is in use by another training run (pid {holder.pid} on " in r.stderr, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert time.perf_counter() - t0 < 120
        assert f"pid {holder.pid} " in (w / ".lock").read_text()  # the holder's record is kept
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = subprocess.run(
        cli(w, tmp_path / "missing.jsonl", tokenizer, data_dir), env=env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "data.train_jsonl: no such files" in r.stderr, r.stderr[-3000:]
    assert "in use by another" not in r.stderr


def _can_mount_tmpfs() -> bool:
    import shutil

    if shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run(
            ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -Urm to mount a small tmpfs (user namespaces)")
@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_checkpoint_stops_training_with_disk_full_error(
    async_save, train_jsonl, tokenizer, data_dir, tmp_path
):
    """`<workdir>/checkpoints` on a 64 KiB tmpfs (a real ENOSPC inside Orbax/TensorStore): train.py stops at the
    first failed save with `DiskFullError` naming the step directory, exit 2, and leaves no
    `*.orbax-checkpoint-tmp*` behind. Before the fix: raw RESOURCE_EXHAUSTED tracebacks, training went on, the
    partial step stayed."""
    w = tmp_path / "full"
    (w / "checkpoints").mkdir(parents=True)
    args = cli(w, train_jsonl, tokenizer, data_dir, steps=8) + [
        "--config.checkpoint.every=2",
        f"--config.checkpoint.async_save={async_save}",
    ]
    script = (
        'mount -t tmpfs -o size=64k tmpfs "$0/checkpoints" || exit 99; "$@"; rc=$?; '
        'ls -A "$0/checkpoints" > "$0/listing.txt"; exit $rc'
    )
    r = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, str(w), *args], env=env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{w}/checkpoints/2: the disk is full; checkpoint step 2 was not saved" in r.stderr, r.stderr[-3000:]
    assert "orbax-checkpoint-tmp" not in (w / "listing.txt").read_text()
    steps = [json.loads(x)["step"] for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2 if not async_save else 2 <= steps[-1] <= 4  # at the latest when the next save starts
