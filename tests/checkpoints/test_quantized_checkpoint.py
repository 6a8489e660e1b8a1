"""Quantized checkpoints: `kalm-export --config.quantization=...` writes values and scales that the one loader
restores bit for bit; the HF export refuses quantized weights unless asked to dequantize them."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kalm_jax.checkpoints import hf, loader
from kalm_jax.cli import convert as convert_cli
from kalm_jax.cli import export as export_cli
from kalm_jax.inference.reranker import Reranker
from kalm_jax.model import quantization
from kalm_jax.model.t5gemma2 import param_tree

QUERY = "what lowers blood pressure"
DOCS = ["Regular exercise lowers blood pressure in adults.", "The moon orbits the earth.", "Salt raises it."]


def _bits(tree) -> list[tuple[str, str, bytes]]:
    return [
        (jax.tree_util.keystr(path), str(leaf.dtype), np.asarray(leaf).tobytes())
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


@pytest.fixture(scope="module")
def float_model(hub_checkpoint):
    return loader.load(hub_checkpoint[0], dtype="float32")


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_export_quantized_and_load_bit_for_bit(hub_checkpoint, float_model, tmp_path, mode, capsys):
    out = tmp_path / f"kalm-{mode}"
    assert export_cli.main([str(hub_checkpoint[0]), str(out), f"--config.quantization={mode}"]) == 0
    assert (out / "tokenizer.json").is_file()  # the tokenizer travels with it
    _, model, tok = loader.load(out)
    assert quantization.mode_of(model) == mode
    want = quantization.quantize_model(float_model.model, mode)
    assert _bits(param_tree(model)) == _bits(param_tree(want))
    # the loaded checkpoint scores exactly as the engine quantizing the float model does
    loaded = Reranker(model, tok, show_progress=False).score(QUERY, DOCS, return_margin=True)
    fresh = Reranker(float_model.model, float_model.tokenizer, quantization=mode, show_progress=False)
    np.testing.assert_array_equal(loaded, fresh.score(QUERY, DOCS, return_margin=True))


def test_quantized_checkpoint_is_not_exported_to_transformers_silently(hub_checkpoint, tmp_path, capsys):
    src = tmp_path / "int8"
    assert export_cli.main([str(hub_checkpoint[0]), str(src), "--config.quantization=int8"]) == 0
    assert convert_cli.main(["to-hf", str(src), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "quantized (int8)" in err and "--config.dequantize=True" in err
    assert not (tmp_path / "hf").exists()
    assert convert_cli.main(["to-hf", str(src), str(tmp_path / "hf"), "--config.dequantize=True"]) == 0
    _, back = hf.load(tmp_path / "hf", dtype="float32")
    _, model, _ = loader.load(src)
    want = quantization.dequantize_model(model)  # values x scales in the model's dtype (float32 here)
    got_q = np.asarray(back.encoder.q.get_value())
    bf16 = np.asarray(want.encoder.q.get_value()).astype("bfloat16").astype(np.float32)  # exported as bf16
    np.testing.assert_array_equal(got_q, bf16)
    assert quantization.mode_of(back) == "none"


def test_export_refuses_keep_lora_with_quantization(hub_checkpoint, tmp_path, capsys):
    rc = export_cli.main(
        [str(hub_checkpoint[0]), str(tmp_path / "x"), "--config.quantization=int8", "--config.keep_lora=true"]
    )
    assert rc == 2 and not (tmp_path / "x").exists()
    assert "keep_lora and quantization" in capsys.readouterr().err


def test_inspect_lists_a_quantized_checkpoint_against_the_hf_layout(hub_checkpoint, tmp_path, capsys):
    src = tmp_path / "int8"
    assert export_cli.main([str(hub_checkpoint[0]), str(src), "--config.quantization=int8"]) == 0
    capsys.readouterr()
    assert convert_cli.main(["inspect", str(src), "--config.against=hf"]) == 0
    text = capsys.readouterr().out
    assert "encoder.q.qvalue" in text and "int8" in text and "quantization scales" in text
    assert "14 weights are quantized" in text and "--config.dequantize=True" in text
    assert "OK: matches the hf layout" in text


def test_training_refuses_to_start_from_quantized_weights(hub_checkpoint, tmp_path):
    from kalm_jax.text.load import load_tokenizer
    from kalm_jax.training import loop
    from kalm_jax.training.config import default_config

    src = tmp_path / "int8"
    assert export_cli.main([str(hub_checkpoint[0]), str(src), "--config.quantization=int8"]) == 0
    config = default_config()
    config.init_from = str(src)
    with pytest.raises(ValueError, match=r"holds quantized weights \(int8\).*float checkpoint"):
        loop.initial_model(config, load_tokenizer(src / "tokenizer.json"))
