"""verify_release's logic on a tiny checkpoint with a reference table computed by PyTorch transformers."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from kalm_jax.checkpoints import verify_release
from kalm_jax.checkpoints.verify_release import DOCUMENTS, QUERY, WEB_INSTRUCTION, Reference
from kalm_jax.cli import verify_release as verify_release_cli
from kalm_jax.text import prompts


@pytest.fixture(scope="module")
def release(tmp_path_factory, tokenizer):
    """A tiny HF checkpoint with its tokenizer, and PyTorch margins for the model-card example."""
    from torch_reference import build_tiny_hf, torch_forward

    d = tmp_path_factory.mktemp("release")
    model = build_tiny_hf(d, vocab=4096, eoi=4093, heads=4, kv_heads=2, window=4, seed=3)
    shutil.copy(tokenizer.path, d / "tokenizer.model")
    ids, mask = prompts.tokenize_documents(tokenizer, list(DOCUMENTS), 1024)
    margins = {}
    for instruction in (None, WEB_INSTRUCTION):
        dec, dmask = prompts.tokenize_decoder_prompts(tokenizer, [QUERY] * 2, instruction=instruction)
        _, logits = torch_forward(model, ids, mask, dec, dmask, pool_ratio=4)
        last = logits[np.arange(2), dmask.sum(1) - 1]
        margins[instruction] = tuple(float(x) for x in last[:, tokenizer.yes_id] - last[:, tokenizer.no_id])
    return d, margins


def table(margins, scale=1.0):
    """A reference table in the published shape: margins for the default case, P(yes) only for the other."""
    m0 = tuple(x * scale for x in margins[None])
    p1 = tuple(float(1 / (1 + np.exp(-x * scale))) for x in margins[WEB_INSTRUCTION])
    p0 = tuple(float(1 / (1 + np.exp(-x))) for x in m0)
    return {
        "tiny": (
            Reference("default instruction", None, p0, m0, "torch"),
            Reference("web-search instruction", WEB_INSTRUCTION, p1, None, "torch"),
        )
    }


def test_passes_against_matching_reference(release, monkeypatch, capsys):
    path, margins = release
    monkeypatch.setattr(verify_release, "REFERENCES", table(margins))
    monkeypatch.setattr(verify_release, "HIDDEN_TO_VARIANT", {64: "tiny"})
    assert verify_release_cli.main([str(path), "--config.dtype=float32"]) == 0
    out = capsys.readouterr().out
    assert "variant tiny" in out and out.count("PASS") == 5 and "FAIL" not in out
    assert "4/4 rows within rtol=0.01" in out
    assert "* reference margin = logit(published P(yes))" in out


def test_fails_when_margins_are_off_by_more_than_rtol(release, monkeypatch, capsys):
    path, margins = release
    monkeypatch.setattr(verify_release, "REFERENCES", table(margins, scale=1.03))
    assert verify_release_cli.main([str(path), "--config.variant=tiny", "--config.dtype=float32"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 5 and "FAIL: 0/4 rows" in out
    assert (
        verify_release_cli.main([str(path), "--config.variant=tiny", "--config.dtype=float32", "--config.rtol=0.05"])
        == 0
    )


def test_unknown_size_and_missing_reference(release, capsys, tmp_path):
    path, _ = release
    assert verify_release_cli.main([str(path), "--config.dtype=float32"]) == 2
    assert "hidden size 64 is not a released KaLM-Reranker-V1 size" in capsys.readouterr().err
    assert verify_release_cli.main([str(path), "--config.variant=small", "--config.dtype=float32"]) == 2
    assert "no published reference outputs for variant 'small'" in capsys.readouterr().err
    assert verify_release_cli.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_published_table_is_self_consistent():
    """The published margins and P(yes) agree (sigmoid), and the logit-derived margins are sane."""
    for refs in (verify_release.REFERENCES["nano"], verify_release.REFERENCES["large"]):
        for ref in refs:
            assert len(ref.scores) == len(DOCUMENTS)
            if ref.margins is not None:
                np.testing.assert_allclose(1 / (1 + np.exp(-np.array(ref.margins))), ref.scores, rtol=2e-3)
    web = verify_release.REFERENCES["nano"][1]
    assert dataclasses.replace(web).instruction == WEB_INSTRUCTION
    assert verify_release._logit(web.scores[0]) == pytest.approx(5.906, abs=1e-3)
