"""HF export (`hf.save`), the conversion CLI and the PyTorch scoring recipe, checked against transformers."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from torch_reference import torch_forward

from kalm_jax.checkpoints import hf, orbax_io
from kalm_jax.cli import convert as convert_cli
from kalm_jax.inference import scoring
from kalm_jax.model.build import build_model
from kalm_jax.model.config import get_preset
from kalm_jax.model.t5gemma2 import LoRAParam
from kalm_jax.text import prompts

TOL = 1e-4
REPO = Path(__file__).resolve().parents[2]


def _raw(d: Path) -> dict[str, tuple[str, tuple, bytes]]:
    st = hf.SafetensorsDir(d)
    out = {n: (*st.raw_entry(n)[:2], st.raw_bytes(n)) for n in st.names()}
    st.close()
    return out


def _assert_bit_exact(src: Path, out: Path):
    a, b = _raw(src), _raw(out)
    assert sorted(a) == sorted(b)
    diff = [n for n in a if a[n] != b[n]]
    assert not diff, f"tensors differ after the round trip: {diff[:5]}"


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if name in p.name]


# ---------------------------------------------------------------------- HF -> JAX -> HF
@pytest.fixture(scope="module")
def tiny_hf_bf16(tiny_hf, tmp_path_factory):
    import copy

    import torch

    d = tmp_path_factory.mktemp("tiny_hf_bf16")
    copy.deepcopy(tiny_hf[1]).to(torch.bfloat16).save_pretrained(d)
    return d


def test_round_trip_fp32_sharded_is_bit_exact(tiny_hf, tmp_path):
    src = tiny_hf[0]
    cfg, model = hf.load(src, dtype="float32")
    assert len(model.hf_passthrough) > 0  # the vision tower is present and must be carried
    out = hf.save(model, cfg, tmp_path / "out", dtype="float32", max_shard_bytes="100KB")
    _assert_bit_exact(src, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in _raw(out).values())
    for shard in shards[:-1]:  # every shard but an oversized single tensor respects the limit
        header, start = hf.read_safetensors_header(out / shard)
        assert len([k for k in header if k != "__metadata__"]) == 1 or os.path.getsize(out / shard) - start <= 100_000
    written = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert written["encoder"]["vision_config"] == source["encoder"]["vision_config"]
    assert hf.read_config(out) == cfg and written["dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["bos_token_id"] == 2


@pytest.mark.parametrize("load_dtype", ["bfloat16", "float32"])
def test_round_trip_bf16_is_bit_exact(tiny_hf_bf16, tmp_path, load_dtype):
    cfg, model = hf.load(tiny_hf_bf16, dtype=load_dtype)
    out = hf.save(model, cfg, tmp_path / "out")  # bf16 is the default
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    _assert_bit_exact(tiny_hf_bf16, out)


# ---------------------------------------------------------------------- JAX (LoRA-trained) -> HF -> torch
def _randomize(model, seed: int):
    """Random norms and eoi vector (they start at zero, which would hide layout mistakes)."""
    rng = np.random.default_rng(seed)
    for stack in (model.encoder, model.decoder):
        for name in ("q_norm", "k_norm", "pre_attn_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm"):
            v = getattr(stack, name)
            v.set_value(jnp.asarray(rng.normal(0, 0.3, v.get_value().shape), jnp.float32))
    for v in (model.encoder_norm, model.decoder_norm, model.eoi_embedding):
        v.set_value(jnp.asarray(rng.normal(0, 0.5, v.get_value().shape), jnp.float32))


def _lora_trained_tiny():
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=3)
    _randomize(model, 3)
    model.add_lora(4, 8.0, ("q", "k", "v", "o", "gate", "down"), rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=LoRAParam)
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(3, 4000, (4, 24)), jnp.int32)
    dec = jnp.asarray(rng.integers(3, 4000, (4, 12)), jnp.int32)
    labels = jnp.asarray([1.0, 0.0, 1.0, 0.0])

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            ones = jnp.ones_like(enc)
            margins = m.score_margin(dec, jnp.ones_like(dec), m.encode(enc, ones), ones, 17, 42)
            return optax.sigmoid_binary_cross_entropy(margins, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
        opt.update(model, grads)
        return loss

    for _ in range(2):
        step(model, opt)
    assert float(jnp.abs(model.decoder.q_lora_b.get_value()).max()) > 0  # the adapters really moved
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """A LoRA-trained tiny JAX model and its fp32 HF export (with the scifact tokenizer)."""
    model = _lora_trained_tiny()
    before = jax.tree.map(np.asarray, orbax_io.param_tree(model))
    out = hf.save(model, None, tmp_path_factory.mktemp("export") / "hf", dtype="float32", tokenizer=tokenizer)
    assert model.has_lora  # the caller's model is not merged or otherwise changed
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, orbax_io.param_tree(model)))
    return model, out


@pytest.fixture(scope="module")
def torch_model(exported):
    from transformers import T5Gemma2ForConditionalGeneration

    model, info = T5Gemma2ForConditionalGeneration.from_pretrained(
        exported[1], attn_implementation="eager", output_loading_info=True
    )
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    # A text-only export: only the (unused) vision tower is left to transformers' initialisation.
    assert all(
        k.startswith(("model.encoder.vision_tower", "model.encoder.multi_modal_projector"))
        for k in info["missing_keys"]
    )
    return model.eval()


def test_lora_merged_export_matches_merge_lora(exported):
    model, out = exported
    merged = nnx.clone(model)
    merged.merge_lora()
    st = hf.SafetensorsDir(out)
    for name, ref in hf.iter_hf_tensors(merged, "float32"):
        np.testing.assert_allclose(st.get(name), ref, rtol=0, atol=1e-6, err_msg=name)


# The model's own methods compiled as one program each (run eagerly, every operation compiles on its own).
@nnx.jit
def _encode_and_logits(model, enc_ids, enc_mask, dec_ids, dec_mask):
    states = model.encode(enc_ids, enc_mask)
    return states, model.decoder_logits(dec_ids, dec_mask, states, enc_mask)


@functools.partial(nnx.jit, static_argnums=(5, 6))
def _score_margin(model, dec, dmask, states, smask, yes_id, no_id):
    return model.score_margin(dec, dmask, states, smask, yes_id, no_id)


def test_exported_logits_match_transformers(exported, torch_model):
    model, _ = exported
    rng = np.random.default_rng(5)
    enc_ids = rng.integers(3, 4000, (3, 21))
    enc_mask = np.ones_like(enc_ids)
    enc_mask[1, 14:] = 0
    enc_ids[enc_mask == 0] = 0
    enc_ids[2, 3] = model.config.eoi_token_index
    dec_ids = rng.integers(3, 4000, (3, 11))
    dec_mask = np.ones_like(dec_ids)
    dec_mask[0, 7:] = 0
    dec_ids[dec_mask == 0] = 0
    ref_states, ref_logits = torch_forward(torch_model, enc_ids, enc_mask, dec_ids, dec_mask)
    states, logits = map(np.asarray, _encode_and_logits(model, enc_ids, enc_mask, dec_ids, dec_mask))
    assert np.abs(states - ref_states)[enc_mask.astype(bool)].max() <= TOL
    assert np.abs(logits - ref_logits)[dec_mask.astype(bool)].max() <= TOL
    assert np.abs(ref_logits).max() > 0.1


def _recipe():
    spec = importlib.util.spec_from_file_location("pytorch_score", REPO / "examples" / "pytorch_score.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("ratio", [1, 4])
def test_pytorch_recipe_matches_score_margin(exported, torch_model, tokenizer, scifact_texts, ratio):
    import torch

    recipe = _recipe()
    model, out = exported
    tok = recipe.PromptTokenizer(out)
    assert (tok.yes_id, tok.no_id, tok.pad_id) == (tokenizer.yes_id, tokenizer.no_id, tokenizer.pad_id)
    passages = [t for t in scifact_texts[:40] if len(t) > 200][:3]
    queries = ["What causes antibiotic resistance in bacteria?", "<b>Vitamin D</b> & bone density, 2x?"]

    # Identical token ids to kalm_jax's prompt tokenization.
    ids, mask = prompts.tokenize_documents(tokenizer, passages, max_length=40)
    t_ids, t_mask = tok.batch([recipe.document_text(p) for p in passages], max_length=40)
    np.testing.assert_array_equal(t_ids.numpy(), ids)
    q_ids, q_mask = prompts.tokenize_decoder_prompts(tokenizer, [q for q in queries for _ in passages])
    tq_ids, tq_mask = tok.batch([recipe.decoder_text(q) for q in queries for _ in passages], multiple=8)
    np.testing.assert_array_equal(tq_ids.numpy(), q_ids)
    np.testing.assert_array_equal(tq_mask.numpy(), q_mask)

    # PyTorch: encoder -> MEP -> decoder with encoder_outputs=pooled -> margin.
    pooled_t, pmask_t = recipe.encode_passages(torch_model, tok, passages, ratio, max_length=40)
    rep = len(queries)
    margins_t = recipe.score(torch_model, tok, tq_ids, tq_mask, pooled_t.repeat(rep, 1, 1), pmask_t.repeat(rep, 1))

    # JAX: the jitted encode+pool and score_margin on the pooled passages.
    pooled, pmask, _ = scoring.encode_passages(model, ids, mask, ratio)
    np.testing.assert_allclose(pooled, pooled_t.numpy(), atol=TOL, rtol=0)
    np.testing.assert_array_equal(pmask, pmask_t.numpy())
    margins = np.asarray(
        _score_margin(
            model,
            q_ids,
            q_mask,
            np.tile(pooled, (rep, 1, 1)),
            np.tile(pmask, (rep, 1)),
            tokenizer.yes_id,
            tokenizer.no_id,
        )
    )
    np.testing.assert_allclose(margins_t.numpy(), margins, atol=TOL, rtol=0)
    assert np.ptp(margins) > 1e-3  # passages and queries really get different scores

    if ratio == 4:  # the one-call entry point (what the script's CLI runs) gives the same numbers
        m, p = recipe.rerank(str(out), queries[0], passages, ratio=4, max_length=40)
        np.testing.assert_allclose(m.numpy(), margins[: len(passages)], atol=TOL, rtol=0)
        np.testing.assert_allclose(p.numpy(), torch.sigmoid(m).numpy())


# ---------------------------------------------------------------------- CLI: Orbax <-> HF
def test_training_workdir_to_hf_to_orbax_is_identical(exported, tokenizer, tmp_path, capsys):
    model, _ = exported
    # The layout train.py writes: <workdir>/checkpoints/<step>/{params/, kalm_model.json}.
    workdir = tmp_path / "run"
    orbax_io.save_model(model, workdir / "checkpoints" / "7")
    (workdir / "tokenizer.model").write_bytes(tokenizer.proto_bytes)
    assert convert_cli.main(["to-hf", str(workdir), str(tmp_path / "hf"), "--config.dtype=float32"]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer.proto_bytes
    assert convert_cli.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "tokenizer.model").is_file()
    _, back = orbax_io.load_model(tmp_path / "back")
    merged = nnx.clone(model)
    merged.merge_lora()
    a, b = orbax_io.param_tree(merged), orbax_io.param_tree(back)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6), a, b)

    # Without LoRA the fp32 trip Orbax -> HF -> Orbax is bit-exact.
    orbax_io.save_model(merged, tmp_path / "plain")
    assert convert_cli.main(["to-hf", str(tmp_path / "plain"), str(tmp_path / "hf2"), "--config.dtype=float32"]) == 0
    assert convert_cli.main(["from-hf", str(tmp_path / "hf2"), str(tmp_path / "back2")]) == 0
    _, back2 = orbax_io.load_model(tmp_path / "back2")
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(np.asarray(y), np.asarray(x)),
        orbax_io.param_tree(merged),
        orbax_io.param_tree(back2),
    )


def test_hf_with_vision_through_orbax_and_back_is_bit_exact(tiny_hf, tmp_path):
    src = tiny_hf[0]
    assert convert_cli.main(["from-hf", str(src), str(tmp_path / "ckpt")]) == 0
    assert convert_cli.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--config.dtype=float32"]) == 0
    _assert_bit_exact(src, tmp_path / "hf")
    assert convert_cli.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "text"), "--config.text_only=true"]) == 0
    names = set(_raw(tmp_path / "text"))
    assert names == {s.hf_name for s in hf.tensor_specs(hf.read_config(src))}


# ---------------------------------------------------------------------- inspect, bad input, interruption
def test_inspect_names_offending_tensors(tiny_hf, tmp_path, capsys):
    from safetensors.numpy import save_file

    src = tiny_hf[0]
    st = hf.SafetensorsDir(src)
    tensors = {n: st.get(n) for n in st.names()}
    tensors["model.decoder.layers.1.mlp.up_proj.weight"] = tensors["model.decoder.layers.1.mlp.up_proj.weight"][:100]
    del tensors["model.encoder.layers.0.self_attn.k_norm.weight"]
    tensors["model.decoder.layers.1.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((src / "config.json").read_text())

    assert convert_cli.main(["inspect", str(bad), "--config.against=hf", "--config.summary=true"]) == 1
    text = capsys.readouterr().out
    assert "3 problems" in text
    assert "model.decoder.layers.1.mlp.up_proj.weight has shape (100, 64), expected (128, 64)" in text
    assert "missing tensor model.encoder.layers.0.self_attn.k_norm.weight" in text
    assert "unexpected tensor model.decoder.layers.1.self_attn.extra_proj.weight" in text
    # The lone file, checked against an explicit config, and the intact source: listing + counts, exit 0.
    assert (
        convert_cli.main(
            [
                "inspect",
                str(bad / "model.safetensors"),
                "--config.against=hf",
                "--config.hf_config",
                str(src / "config.json"),
            ]
        )
        == 1
    )
    assert convert_cli.main(["inspect", str(src), "--config.against=hf"]) == 0
    text = capsys.readouterr().out
    assert "model.encoder.layers.0.self_attn.q_proj.weight" in text and "[128, 64]" in text
    assert "vision tower + projector" in text and "OK: matches" in text


def test_inspect_orbax_checkpoint(exported, tmp_path, capsys):
    orbax_io.save_model(exported[0], tmp_path / "ckpt")
    assert convert_cli.main(["inspect", str(tmp_path / "ckpt"), "--config.against=hf"]) == 0
    text = capsys.readouterr().out
    assert "decoder.q_lora_b" in text and "LoRA factors are folded" in text and "OK: matches" in text


def test_wrong_shapes_fail_before_writing(tmp_path):
    model = build_model(get_preset("tiny"))
    wrong = model.config.replace(intermediate_size=96)
    with pytest.raises(ValueError, match=r"encoder\.gate has shape \(2, 64, 128\), but the config needs \(2, 64, 96\)"):
        hf.save(model, wrong, tmp_path / "out")
    model.decoder.k.set_value(jnp.zeros((2, 64, 2, 32)))
    with pytest.raises(ValueError, match=r"decoder\.k has shape \(2, 64, 2, 32\)"):
        hf.save(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory


def test_interrupted_write_leaves_no_complete_looking_directory(monkeypatch, tmp_path):
    model = build_model(get_preset("tiny"))
    first = hf.save(model, None, tmp_path / "out", dtype="float32", max_shard_bytes="64KB")
    before = _raw(first)

    real, calls = hf.hf_tensor, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt("simulated interruption mid-write")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "hf_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        hf.save(model, None, tmp_path / "new", max_shard_bytes="64KB")
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path, "new") == []
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # replacing an existing export: the old one survives intact
        hf.save(model, None, first, max_shard_bytes="64KB", overwrite=True)
    assert _raw(first) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(hf, "hf_tensor", real)

    model.decoder_norm.set_value(model.decoder_norm.get_value().at[3].set(jnp.nan))
    with pytest.raises(ValueError, match="model.decoder.norm.weight holds non-finite values"):
        hf.save(model, None, tmp_path / "nan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError, match="overwrite"):
        hf.save(model, None, first)


@pytest.mark.slow
def test_train_py_checkpoint_to_hf_and_back(data_dir, tmp_path):
    """A real `train.py` run (one step) -> to-hf -> from-hf gives the trained parameters bit for bit."""
    import subprocess
    import sys

    workdir = tmp_path / "run"
    env = dict(os.environ, KALM_DATA_DIR=str(data_dir), PYTHONPATH=str(REPO))
    subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            f"--config={REPO / 'configs' / 'train.py'}:tiny",
            f"--workdir={workdir}",
            "--config.total_steps=1",
            "--config.checkpoint.every=1",
            # No dev evaluation (before and after the step): it does not change the saved parameters whose
            # round trip this test checks.
            "--config.eval.num_queries=0",
            "--config.log_every=1",
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    assert convert_cli.main(["to-hf", str(workdir), str(tmp_path / "hf"), "--config.dtype=float32"]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (workdir / "tokenizer.model").read_bytes()
    assert convert_cli.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    _, trained = orbax_io.load_any(workdir)
    _, back = orbax_io.load_model(tmp_path / "back")
    if trained.has_lora:
        trained.merge_lora()
    a, b = orbax_io.param_tree(trained), orbax_io.param_tree(back)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(y), np.asarray(x)), a, b)
