"""Prompt strings against the literal released strings (`kalm_reranker.py` of
https://huggingface.co/KaLM-Embedding/KaLM-Reranker-V1-Nano and the model cards)."""

from __future__ import annotations

import numpy as np
import pytest

from kalm_jax.text import prompts

SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
EXPECTED_DEFAULT = (
    "<bos><start_of_turn>user\n"
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".\n\n'
    "<Instruct>: Given a query, retrieve documents that answer the query.\n"
    "<Query>: What is the capital of China?<end_of_turn>\n"
    "<start_of_turn>model\n\n\n\n"
)


def test_constants_are_the_released_strings():
    assert prompts.DEFAULT_SYSTEM_INSTRUCTION == SYSTEM
    assert prompts.DEFAULT_INSTRUCTION == "Given a query, retrieve documents that answer the query."


def test_document_text():
    assert prompts.document_text("The capital of China is Beijing.") == "<Document>: The capital of China is Beijing."
    assert prompts.document_text("") == "<Document>: "


def test_decoder_text_default():
    assert prompts.decoder_text("What is the capital of China?") == EXPECTED_DEFAULT
    assert prompts.decoder_text("What is the capital of China?", None, None) == EXPECTED_DEFAULT


def test_decoder_text_custom_instruction_and_system():
    got = prompts.decoder_text("q?", "Given a web search query, retrieve passages that answer the query.", "Sys.")
    assert got == (
        "<bos><start_of_turn>user\nSys.\n\n"
        "<Instruct>: Given a web search query, retrieve passages that answer the query.\n"
        "<Query>: q?<end_of_turn>\n<start_of_turn>model\n\n\n\n"
    )


NO_LINE = "<bos><start_of_turn>user\n" + SYSTEM + "\n\n<Query>: q?<end_of_turn>\n<start_of_turn>model\n\n\n\n"
DEFAULT_LINE = (
    "<bos><start_of_turn>user\n" + SYSTEM + "\n\n<Instruct>: Given a query, retrieve documents that answer "
    "the query.\n<Query>: q?<end_of_turn>\n<start_of_turn>model\n\n\n\n"
)
# Every spelling of "no instruction" / "the default" and the prompt it must give
# (one rule: prompts.resolve_instruction).
SPELLINGS = [
    (None, DEFAULT_LINE),
    ("default", DEFAULT_LINE),
    (False, NO_LINE),
    ("", NO_LINE),
    ("none", NO_LINE),
    ("None", NO_LINE),
    (" none ", NO_LINE),
    ("Find the claim.", DEFAULT_LINE.replace(prompts.DEFAULT_INSTRUCTION, "Find the claim.")),
]


def test_stage1_without_instruction():
    assert prompts.decoder_text("q?", instruction=prompts.NO_INSTRUCTION) == NO_LINE
    for spelling, want in SPELLINGS:
        assert prompts.decoder_text("q?", instruction=spelling) == want, spelling


@pytest.fixture(scope="module")
def tiny_reranker(tokenizer):
    from kalm_jax.inference.reranker import Reranker
    from kalm_jax.model.build import build_model
    from kalm_jax.model.config import get_preset

    return lambda instruction=None: Reranker(
        build_model(get_preset("tiny"), seed=0), tokenizer, instruction=instruction
    )


@pytest.mark.parametrize(
    "spelling,want",
    [s for s in SPELLINGS if isinstance(s[0], str)],
    ids=[repr(s[0]) for s in SPELLINGS if isinstance(s[0], str)],
)
def test_no_instruction_means_the_same_in_the_reranker_training_and_eval(tokenizer, tiny_reranker, spelling, want):
    """The exact prompt of each spelling through the three entry points: `Reranker(instruction=...)` (and per call),
    training's `data.instruction` (the pipeline's tokenized group, and a per-example `prompt` field) and eval.py's
    instruction labels. Before the fix `Reranker(instruction="")` kept an empty `<Instruct>:` line and training's
    "none" trained on the literal text "none"."""
    import dataclasses

    from kalm_jax.data import pipeline
    from kalm_jax.evaluation.rerank import tokenize_prompts
    from kalm_jax.evaluation.settings import Settings
    from kalm_jax.training.config import default_config
    from kalm_jax.training.loop import instruction_of

    want_ids = tokenizer.encode(want)
    reranker = tiny_reranker(spelling)
    assert reranker._prompt("q?", None) == want_ids
    assert tiny_reranker()._prompt("q?", spelling) == want_ids

    c = default_config()
    c.data.instruction = spelling
    pcfg = pipeline.PipelineConfig(
        batch_size=1, group_size=2, max_document_tokens=16, max_query_tokens=16, instruction=instruction_of(c)
    )
    element = {
        "pos": [b"a"],
        "neg": [b"b"],
        "source": b"t.jsonl:1",
        "query": b"q?",
        "has_prompt": False,
        "prompt": b"",
        "has_scores": False,
        "example_id": 0,
    }
    for el, cfg in (
        (element, pcfg),
        (dict(element, has_prompt=True, prompt=spelling.encode()), dataclasses.replace(pcfg, instruction=None)),
    ):
        out = pipeline.SampleAndTokenize(tokenizer, cfg, pipeline.decoder_length(tokenizer, cfg)).random_map(
            el, np.random.default_rng(0)
        )
        assert out["dec_ids"][: out["dec_mask"].sum()].tolist() == want_ids

    settings = Settings.from_config(
        {"data_dir": "d", "datasets": "x", "output_dir": "o", "ratios": "4", "instructions": spelling or "none"}
    )
    label = settings.instructions[0]
    got = tokenize_prompts(reranker.engine, {"q": "q?"}, settings.instruction_value(label))["q"]
    assert got.tolist() == want_ids


def test_long_query_truncated_before_insertion(tokenizer):
    # Digits are split into single tokens, so a 600-digit query truncated to 128 tokens is its first 128 digits.
    query = "1234567890" * 60
    assert len(tokenizer.encode(query)) == 600
    expected = (
        "<bos><start_of_turn>user\n" + SYSTEM + "\n\n"
        "<Instruct>: Given a query, retrieve documents that answer the query.\n"
        "<Query>: " + ("1234567890" * 13)[:128] + "<end_of_turn>\n<start_of_turn>model\n\n\n\n"
    )
    short = prompts.truncate_query(tokenizer, query, 128)
    assert prompts.decoder_text(short) == expected
    ids, mask = prompts.tokenize_decoder_prompts(tokenizer, [query], max_query_tokens=128)
    # Prompt tokens do not count toward the query limit.
    n = int(mask.sum())
    assert n == 128 + prompts.decoder_template_tokens(tokenizer)
    assert tokenizer.decode(ids[0, :n].tolist()) == expected
    assert prompts.truncate_query(tokenizer, "short query", 128) == "short query"


def test_truncation_of_words(tokenizer):
    query = "What is the role of tumour necrosis factor in the progression of chronic inflammatory diseases?" * 5
    short = prompts.truncate_query(tokenizer, query, 10)
    assert query.startswith(short) and len(tokenizer.encode(short)) == 10


def test_tokenize_decoder_prompts_padding(tokenizer):
    ids, mask = prompts.tokenize_decoder_prompts(tokenizer, ["What is the capital of China?", "x"])
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape[1] % 8 == 0
    for row, q in enumerate(["What is the capital of China?", "x"]):
        expect = tokenizer.encode(prompts.decoder_text(q))
        n = len(expect)
        assert ids[row, :n].tolist() == expect and ids[row, 0] == tokenizer.bos_id
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (ids[row, n:] == tokenizer.pad_id).all()
    fixed, fmask = prompts.tokenize_decoder_prompts(tokenizer, ["x"], length=160)
    assert fixed.shape == (1, 160) and fmask.sum() == len(tokenizer.encode(prompts.decoder_text("x")))
    # Fixed length shorter than the query allows: the query is cut further so the prompt fits.
    tight = prompts.decoder_template_tokens(tokenizer) + 5
    cut, cmask = prompts.tokenize_decoder_prompts(tokenizer, ["1234567890" * 3], length=tight)
    assert cmask.sum() == tight and tokenizer.decode(cut[0].tolist()).count("<Query>: 12345<end_of_turn>") == 1
    with pytest.raises(ValueError, match="template alone"):
        prompts.tokenize_decoder_prompts(tokenizer, ["x"], length=8)


def test_tokenize_documents(tokenizer):
    docs = ["The capital of China is Beijing.", "Gravity attracts bodies toward one another. " * 50]
    ids, mask = prompts.tokenize_documents(tokenizer, docs, max_length=64)
    assert ids.shape == (2, 64) and mask[1].sum() == 64
    first = tokenizer.encode("<Document>: The capital of China is Beijing.")
    assert ids[0, : len(first)].tolist() == first and mask[0].sum() == len(first)
    assert tokenizer.bos_id not in ids[0].tolist()[: len(first)]
    ids8, _ = prompts.tokenize_documents(tokenizer, docs[:1], max_length=1024, pad_to_multiple_of=8)
    assert ids8.shape[1] == -(-len(first) // 8) * 8
    fixed, _ = prompts.tokenize_documents(tokenizer, docs[:1], max_length=32, length=32)
    assert fixed.shape == (1, 32)
