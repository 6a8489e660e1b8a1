"""The inference engine's resource behaviour: bounded compilations, padding that does not explode for odd
ratios, a budget for the whole decoder prompt, out-of-memory recognition, and exact on-device re-pooling."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kalm_jax.inference.engine import Buckets, InferenceEngine, is_oom, probability
from kalm_jax.inference.engine import probability as engine_probability
from kalm_jax.inference.reranker import Reranker
from kalm_jax.model import mep


@pytest.fixture(scope="module")
def rr(hub_checkpoint):
    return Reranker.from_pretrained(hub_checkpoint[0], dtype="float32", show_progress=False)


@pytest.fixture(scope="module")
def docs(scifact_texts):
    return [t[: 40 + 23 * i] for i, t in enumerate(scifact_texts[100:140])]


class CompileCounter:
    """Counts XLA backend compilations (JAX's own monitoring events)."""

    def __init__(self):
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.n += 1


@pytest.fixture(scope="module")
def compiles():
    return CompileCounter()


def test_probability_never_compiles(compiles):
    before = compiles.n
    for n in range(1, 301):
        p = probability(np.linspace(-30, 30, n, dtype=np.float32))
        assert p.dtype == np.float32 and p.shape == (n,)
    assert compiles.n == before
    np.testing.assert_allclose(
        probability([-1000.0, 0.0, 1000.0, 2.0]), [0.0, 0.5, 1.0, 1 / (1 + np.exp(-2.0))], rtol=1e-6
    )
    np.testing.assert_array_equal(engine_probability([0.0]), [0.5])


def test_finer_states_served_to_a_coarser_reranker_compile_a_bounded_number_of_programs(rr, docs, compiles):
    states = rr.encode_passages(docs, ratio=1)
    rr.rank("warm up", states)
    before = compiles.n
    rng = np.random.default_rng(0)
    for i in range(40):  # 40 calls over subsets of different sizes and lengths
        rows = rng.choice(len(docs), size=int(rng.integers(1, len(docs))), replace=False)
        rr.rank(f"query number {i} " * int(rng.integers(1, 6)), states.select(rows))
    # Bucketed shapes: batch rows, windows and prompt lengths fall into a handful of buckets (was 1125).
    assert compiles.n - before <= 24, compiles.n - before


def test_states_repooled_on_the_device_equal_states_encoded_at_the_coarser_ratio(rr, docs):
    fine = rr.encode_passages(docs[:9], ratio=1)
    coarse = rr.encode_passages(docs[:9], ratio=4)
    q = "glioblastoma stem cells"
    np.testing.assert_allclose(
        rr.score(q, fine, return_margin=True), rr.score(q, coarse, return_margin=True), atol=1e-5
    )


@pytest.mark.parametrize("ratio", [31, 33, 1000])
def test_odd_ratios_pad_to_a_multiple_of_the_ratio_not_the_lcm(rr, docs, ratio):
    assert Buckets().document_length(200, 31) == 279 and Buckets().document_length(200, 32) == 256
    assert Buckets().document_length(1200, 1000) == 2000
    states = rr.encode_passages(docs[:4], ratio=ratio)
    ids, mask = rr.engine.document_ids(docs[:4]), None
    longest = max(len(x) for x in ids)
    assert states.states.shape[1] == -(-longest // ratio)
    from kalm_jax.text import prompts

    ids, mask = prompts.pad_batch(ids, rr.tokenizer.pad_id)
    ref, ref_mask, ref_counts = mep.pool(rr.model.encode(ids, mask), mask, ratio)
    np.testing.assert_allclose(states.dense(), np.asarray(ref), atol=2e-5)
    np.testing.assert_array_equal(states.counts, np.asarray(ref_counts))


def test_a_ratio_longer_than_every_document_pools_each_to_one_state_without_padding_to_the_ratio(rr, docs):
    # A document of n <= r tokens is one window: it is padded to the 128 bucket only (3 tokens at ratio 10**6
    # were padded to 10**6 tokens, an encoder allocation of 7.28 TiB); longer documents still pad to the ratio.
    assert Buckets().document_length(3, 10**6) == 128 and Buckets().document_length(200, 10**6) == 256
    assert Buckets().document_length(128, 128) == 128 and Buckets().document_length(300, 200) == 400
    from kalm_jax.text import prompts

    big = 10**6
    pooled, pmask, counts = mep.pool(np.ones((1, 3, 4), np.float32), np.ones((1, 3), np.int32), 10**12)
    assert pooled.shape == (1, 1, 4) and int(counts[0, 0]) == 3 and int(pmask[0, 0]) == 1
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15]]
    states = rr.engine.encode_ids(seqs, big, storage="float32")
    assert states.states.shape[:2] == (3, 1) and states.ratio == big
    np.testing.assert_array_equal(states.counts, [[3], [2], [6]])
    ids, mask = prompts.pad_batch(seqs, rr.tokenizer.pad_id)  # unpadded: the batch's own longest row
    ref, ref_mask, ref_counts = mep.pool(rr.model.encode(ids, mask), mask, big)
    np.testing.assert_allclose(states.dense(), np.asarray(ref), atol=2e-5)
    np.testing.assert_array_equal(states.counts, np.asarray(ref_counts))
    texts = rr.encode_passages(docs[:4], ratio=big)
    lengths = [len(x) for x in rr.engine.document_ids(docs[:4])]
    assert texts.states.shape[:2] == (4, 1)
    np.testing.assert_array_equal(texts.counts[:, 0], lengths)
    margins = rr.engine.margins([rr.engine.prompt_ids("cells")], np.zeros(4, np.int64), texts, np.arange(4))
    assert margins.shape == (4,) and np.isfinite(margins).all()


def test_margins_refuse_float_and_boolean_pair_indices(rr, docs):
    states = rr.encode_passages(docs[:3], ratio=4)
    prompt = [rr.engine.prompt_ids("cells")]
    ok = rr.engine.margins(prompt, [0, 0], states, [2, 1])
    same = rr.engine.margins(prompt, np.zeros(2, np.uint8), states, np.array([2, 1], np.int32))
    np.testing.assert_array_equal(same, ok)
    for name, args in (
        ("passage_of", ([0], [1.7])),
        ("passage_of", ([0, 0], np.array([1.0, 2.0]))),
        ("prompt_of", ([0.0], [1])),
    ):
        with pytest.raises(TypeError, match=rf"{name}: row indices must be integers, got float"):
            rr.engine.margins(prompt, args[0], states, args[1])
    for name, args in (("passage_of", ([0, 0, 0], np.array([True, False, True]))), ("prompt_of", ([True], [1]))):
        with pytest.raises(TypeError, match=rf"{name}: boolean indices are refused"):
            rr.engine.margins(prompt, args[0], states, args[1])


def test_a_huge_instruction_is_cut_to_the_prompt_budget(rr):
    instruction = "Find passages about cells. " * 4000  # ~60 kB
    with pytest.warns(UserWarning, match="instruction of .* tokens cut to .* tokens"):
        ids = rr.engine.prompt_ids("a query", instruction)
    assert len(ids) <= rr.engine.max_prompt_tokens
    with pytest.warns(UserWarning, match="instruction"):
        margins = rr.score("a query", ["a passage", "another passage"], instruction=instruction, return_margin=True)
    assert np.isfinite(margins).all()
    engine = InferenceEngine(rr.model, rr.tokenizer, max_prompt_tokens=64, share_weights=False)
    with pytest.raises(ValueError, match="system instruction"):
        engine.prompt_ids("q", system="You judge documents. " * 100)


def test_out_of_memory_is_recognised_on_every_backend():
    assert is_oom(MemoryError())
    assert is_oom(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 363 GB"))
    assert is_oom(RuntimeError("Out of memory allocating 389758992384 bytes."))  # the CPU client's wording
    assert not is_oom(ValueError("out of memory"))
    assert not is_oom(jax.errors.JaxRuntimeError("INVALID_ARGUMENT: bad shape"))


def test_bad_arguments_name_themselves(rr):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        InferenceEngine(rr.model, rr.tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="max_document_tokens must be a positive integer, got 2.5"):
        InferenceEngine(rr.model, rr.tokenizer, max_document_tokens=2.5)
    with pytest.raises(ValueError, match="devices is empty"):
        InferenceEngine(rr.model, rr.tokenizer, devices=[])
    with pytest.raises(TypeError, match="instruction must be a str"):
        rr.score("q", ["p"], instruction=3)
    with pytest.raises(TypeError, match="pass its values"):
        rr.score("q", {"a": "p"})
    with pytest.raises(TypeError, match=r"ids\[0\] is None"):
        rr.encode_passages(["p", "q"], ids=[None, 1])
    with pytest.raises(ValueError, match="ids must be unique"):
        rr.encode_passages(["p", "q"], ids=["a", "a"])
    states = rr.encode_passages(["p", "q"])
    with pytest.raises(ValueError, match="hidden size 3"):
        rr.engine.margins(
            [[2, 3]],
            [0],
            type(states)(np.zeros((1, 1, 3), np.float32), np.ones((1, 1), np.int8), np.ones((1, 1), np.int32), 4),
            [0],
        )


def test_repool_guarantee_per_storage(rr, docs):
    fine = rr.encode_passages(docs[:12], ratio=1, storage="float32")
    direct = rr.encode_passages(docs[:12], ratio=4, storage="float32").dense()
    np.testing.assert_allclose(fine.repool(4).dense(), direct, rtol=1e-5, atol=1e-6)  # float32: exact
    bf16 = fine.to_storage("bfloat16").repool(4)
    assert bf16.storage == "bfloat16"
    # bf16: one rounding of the stored finer windows plus one of the result, each <= 2^-8 relative.
    bound = 2 * 2.0**-8 * np.abs(fine.dense()).max()
    assert np.abs(bf16.dense() - direct).max() <= bound
    int8 = fine.to_storage("int8")
    got = int8.repool(4).dense()
    step = float(np.max(int8.scale))  # one quantisation step of the coarsest window scale
    assert np.abs(got - direct).max() <= step
