"""TFDS (array_record) + Grain training pipeline on mined scifact data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kalm_jax.data.beir import load_beir
from kalm_jax.data.negatives import mine_hard_negatives
from kalm_jax.data.pipeline import (
    PipelineConfig,
    batch_shapes,
    decoder_length,
    sample_group,
    steps_per_epoch,
    training_iterator,
)
from kalm_jax.data.textfile import DataError
from kalm_jax.data.tfds_builder import data_source, prepare
from kalm_jax.data.training_jsonl import write_training_jsonl
from kalm_jax.text import prompts

N = 800
CFG = PipelineConfig(batch_size=8, group_size=4, max_document_tokens=64, max_query_tokens=24, seed=7)


@pytest.fixture(scope="module")
def examples(data_dir, scifact_index):
    train = load_beir(data_dir / "scifact", "train")
    run = scifact_index.search(train.queries, k=100, show_progress=False)
    exs = mine_hard_negatives(train, run, num_negatives=8, seed=0, show_progress=False)[:N]
    rng = np.random.default_rng(0)
    for i, ex in enumerate(exs):
        if i % 2:
            ex.pos_scores = rng.uniform(0.5, 1, len(ex.pos)).round(4).tolist()
            ex.neg_scores = rng.uniform(0, 0.5, len(ex.neg)).round(4).tolist()
        if i % 5 == 0:
            ex.prompt = "Given a scientific claim, retrieve documents that support or refute the claim."
        if i % 7 == 0:
            ex.neg = ex.neg[:2]
            ex.neg_ids = ex.neg_ids[:2]
            if ex.neg_scores:
                ex.neg_scores = ex.neg_scores[:2]
    return exs


@pytest.fixture(scope="module")
def prepared(examples, tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    write_training_jsonl(examples[: N // 2], root / "a.jsonl")
    write_training_jsonl(examples[N // 2 :], root / "b.jsonl.gz")
    prepare({"train": [root / "a.jsonl", root / "b.jsonl.gz"]}, root / "data", "scifact")
    return root / "data"


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(a[k], b[k], equal_nan=True) for k in a) and a.keys() == b.keys()


def test_prepared_source(prepared, examples):
    src = data_source(prepared, "scifact")
    assert len(src) == N
    ids = sorted(int(src[i]["example_id"]) for i in range(len(src)))
    assert ids == list(range(N))
    rec = next(src[i] for i in range(len(src)) if int(src[i]["example_id"]) == 3)
    assert rec["query"].decode() == examples[3].query
    assert [p.decode() for p in rec["neg"]] == examples[3].neg
    assert rec["source"].decode().endswith("a.jsonl:4")
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        data_source(prepared, "scifact", "validation")


def test_batch_contents_and_static_shapes(prepared, tokenizer, examples):
    it = training_iterator(prepared, tokenizer, CFG, name="scifact", process_index=0, process_count=1)
    dec_len = decoder_length(tokenizer, CFG)
    assert dec_len % 8 == 0
    shapes = batch_shapes(CFG, dec_len)
    for batch in _batches(it, 12):
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
        assert (batch["labels"][:, 0] == 1).all() and (batch["labels"][:, 1:] == 0).all()
        n_unique = int(batch["enc_mask"].any(axis=1).sum())
        assert batch["passage_index"].max() == n_unique - 1
        assert (batch["enc_ids"][n_unique:] == tokenizer.pad_id).all()
        for b, eid in enumerate(batch["example_id"]):
            ex = examples[int(eid)]
            texts = [
                tokenizer.decode(batch["enc_ids"][r][batch["enc_mask"][r] == 1].tolist())
                for r in batch["passage_index"][b]
            ]
            expect = [tokenizer.decode(tokenizer.encode(prompts.document_text(p))[:64]) for p in ex.pos + ex.neg]
            assert texts[0] in expect[: len(ex.pos)]
            assert all(t in expect[len(ex.pos) :] for t in texts[1:])
            negs = batch["passage_index"][b, 1:]
            if len(ex.neg) >= CFG.group_size - 1:
                assert len(set(negs.tolist())) == CFG.group_size - 1
            else:  # every negative once, the rest with replacement
                assert len(set(texts[1:])) == len(set(ex.neg))
            dec = tokenizer.decode(batch["dec_ids"][b][batch["dec_mask"][b] == 1].tolist())
            query = prompts.truncate_query(tokenizer, ex.query, CFG.max_query_tokens)
            assert dec == prompts.decoder_text(query, ex.prompt)
            if ex.pos_scores is None:
                assert np.isnan(batch["teacher"][b]).all() and (batch["teacher_mask"][b] == 0).all()
            else:
                assert batch["teacher"][b, 0] in np.float32(ex.pos_scores)
                assert set(batch["teacher"][b, 1:].tolist()) <= set(np.float32(ex.neg_scores).tolist())
                assert (batch["teacher_mask"][b] == 1).all()


def test_two_hosts_disjoint_union(prepared, tokenizer):
    cfg = PipelineConfig(batch_size=8, group_size=2, max_document_tokens=16, max_query_tokens=8, seed=3, num_epochs=1)
    seen = []
    for host in range(2):
        it = training_iterator(prepared, tokenizer, cfg, name="scifact", process_index=host, process_count=2)
        ids = [i for batch in it for i in batch["example_id"].tolist()]
        assert len(ids) == steps_per_epoch(N, cfg, 2) * cfg.batch_size == N // 2
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(N))


def test_resume_from_state(prepared, tokenizer):
    it = training_iterator(prepared, tokenizer, CFG, name="scifact", process_index=1, process_count=2)
    _batches(it, 5)
    state = it.get_state()
    expected = _batches(it, 3)
    resumed = training_iterator(prepared, tokenizer, CFG, name="scifact", process_index=1, process_count=2, state=state)
    assert all(_same(a, b) for a, b in zip(expected, _batches(resumed, 3)))
    fresh = training_iterator(prepared, tokenizer, CFG, name="scifact", process_index=1, process_count=2)
    assert not _same(next(fresh), expected[0])


def test_seed_determinism_and_epochs(prepared, tokenizer):
    def first(seed, n=2):
        cfg = PipelineConfig(**{**CFG.__dict__, "seed": seed})
        return _batches(
            training_iterator(prepared, tokenizer, cfg, name="scifact", process_index=0, process_count=1), n
        )

    a, b, c = first(1), first(1), first(2)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not _same(a[0], c[0])
    # A second epoch reorders the records and resamples each group.
    cfg = PipelineConfig(batch_size=N, group_size=4, max_document_tokens=16, max_query_tokens=8, seed=1, num_epochs=2)
    it = training_iterator(prepared, tokenizer, cfg, name="scifact", process_index=0, process_count=1)
    e1, e2 = _batches(it, 2)
    assert sorted(e1["example_id"].tolist()) == sorted(e2["example_id"].tolist())
    assert e1["example_id"].tolist() != e2["example_id"].tolist()

    def groups(batch):
        return {
            int(e): tuple(map(bytes, batch["enc_ids"][batch["passage_index"][b]]))
            for b, e in enumerate(batch["example_id"])
        }

    g1, g2 = groups(e1), groups(e2)
    assert sum(g1[e] != g2[e] for e in g1) > len(g1) // 2
    with pytest.raises(StopIteration):
        next(it)


def _global_stream(prepared, tokenizer, global_batch, shards, processes, steps, *, states=None, **kw):
    """The first `steps` global batches as `processes` hosts with `shards` batch shards each assemble them:
    per step, (example_id, its G passages' token rows) of every row in global row order. Also each host's
    iterator (for its state)."""
    cfg = PipelineConfig(
        **{
            "batch_size": global_batch // processes,
            "group_size": 2,
            "max_document_tokens": 16,
            "max_query_tokens": 8,
            "seed": 5,
            "batch_shards": shards,
            **kw,
        }
    )
    its = [
        training_iterator(
            prepared,
            tokenizer,
            cfg,
            name="scifact",
            process_index=p,
            process_count=processes,
            state=None if states is None else states[p],
        )
        for p in range(processes)
    ]
    out = []
    for _ in range(steps):
        rows = []
        for it in its:
            b = next(it)
            for i, eid in enumerate(b["example_id"].tolist()):
                rows.append((eid, tuple(map(bytes, b["enc_ids"][b["passage_index"][i]]))))
        out.append(rows)
    return out, its


MESHES = [(1, 1), (8, 1), (4, 1), (2, 2), (4, 2), (1, 4), (2, 4)]  # (batch shards per host, processes)


def test_global_batch_is_independent_of_batch_shards_and_processes(prepared, tokenizer):
    """Step k's global batch holds the same records, in the same row order, with the same sampled groups, for
    every (batch shards, process count), i.e. every mesh, and any worker count: one permutation of the records
    per (seed, epoch)."""
    ref, _ = _global_stream(prepared, tokenizer, 8, 1, 1, 3)
    for shards, processes in MESHES[1:]:
        got, _ = _global_stream(prepared, tokenizer, 8, shards, processes, 3)
        assert got == ref, f"{shards} batch shards x {processes} processes"
    got, _ = _global_stream(prepared, tokenizer, 8, 2, 2, 3, worker_count=2)  # workers batch every 2nd record
    assert got == ref, "2 worker processes"
    assert len({eid for rows in ref for eid, _ in rows}) == 24  # no record twice within the epoch


def test_epoch_is_one_permutation_for_every_mesh(prepared, tokenizer):
    """With num_epochs=1 the global stream is a permutation of all records (100 batches of 8, nothing dropped),
    the same for every mesh, and different for another seed."""
    orders = []
    for shards, processes, workers in [(8, 1, 0), (2, 2, 0), (1, 4, 0), (4, 1, 3)]:  # 3 workers: 100 % 3 != 0
        cfg = PipelineConfig(
            batch_size=8 // processes,
            group_size=2,
            max_document_tokens=8,
            max_query_tokens=4,
            seed=5,
            batch_shards=shards,
            num_epochs=1,
            worker_count=workers,
        )
        hosts = [
            [
                b["example_id"].tolist()
                for b in training_iterator(
                    prepared, tokenizer, cfg, name="scifact", process_index=p, process_count=processes
                )
            ]
            for p in range(processes)
        ]
        assert len({len(h) for h in hosts}) == 1 and len(hosts[0]) == steps_per_epoch(N, cfg, processes) == N // 8
        orders.append([e for step in zip(*hosts) for rows in step for e in rows])
    assert sorted(orders[0]) == list(range(N))
    assert orders[0] == orders[1] == orders[2] == orders[3]
    assert orders[0] != list(range(N))  # shuffled


def test_resume_on_another_mesh_continues_the_same_order(prepared, tokenizer):
    """The iterator state is the position in the global stream: saved by any host of one mesh, it resumes every
    host of another mesh (other batch shards, other process count) on the next global batch."""
    straight, _ = _global_stream(prepared, tokenizer, 8, 8, 1, 5)
    head, its = _global_stream(prepared, tokenizer, 8, 8, 1, 2)
    state = its[0].get_state()
    for shards, processes in [(1, 2), (2, 4), (4, 1)]:
        tail, _ = _global_stream(prepared, tokenizer, 8, shards, processes, 3, states=[state] * processes)
        assert head + tail == straight, f"{shards} batch shards x {processes} processes"
    head, its = _global_stream(prepared, tokenizer, 8, 2, 2, 2)
    states = [it.get_state() for it in its]
    assert states[0] == states[1]  # one mesh-independent state, whichever host saved it
    tail, _ = _global_stream(prepared, tokenizer, 8, 1, 1, 3, states=states[:1])
    assert head + tail == straight
    with pytest.raises(ValueError, match="seed"):  # another order: refused, never silently restarted
        _global_stream(prepared, tokenizer, 8, 1, 1, 1, states=[state], seed=6)


def test_checkpoint_reads_any_process_file_and_translates_grain_states(prepared, tokenizer, tmp_path):
    """`Checkpointer` sets the iterator from this process's `data_iter` file or, when another process count wrote
    the step, from any process's; a state in Grain's per-process format (before the global order) continues at
    global batch = step; a state of another order is a `SettingsMismatch`; no file at all is a corrupt step."""
    from kalm_jax.training.checkpoints import Checkpointer, CorruptCheckpoint, SettingsMismatch

    straight, _ = _global_stream(prepared, tokenizer, 8, 1, 1, 4)
    _, its = _global_stream(prepared, tokenizer, 8, 4, 2, 1)
    step = tmp_path / "1"
    (step / "data_iter").mkdir(parents=True)
    (step / "data_iter" / "process_1-of-2.json").write_bytes(its[1].get_state())
    _, its = _global_stream(prepared, tokenizer, 8, 8, 1, 0)
    Checkpointer._restore_data_iter(step, 1, its[0])
    assert _global_stream(prepared, tokenizer, 8, 8, 1, 3, states=[its[0].get_state()])[0] == straight[1:]
    legacy = {
        "version": 2,
        "last_seen_indices": {"0": 13},
        "last_worker_index": -1,
        "worker_count": 0,
        "sampler": "ShardedBatchSampler(...)",
        "data_source": "...",
    }
    (step / "data_iter" / "process_1-of-2.json").write_text(json.dumps(legacy))
    Checkpointer._restore_data_iter(step, 2, its[0])
    assert its[0].global_batches == 2
    _, other = _global_stream(prepared, tokenizer, 8, 8, 1, 0, seed=6)
    (step / "data_iter" / "process_1-of-2.json").write_bytes(other[0].get_state())
    with pytest.raises(SettingsMismatch, match="seed 6 when saved, 5 now"):
        Checkpointer._restore_data_iter(step, 1, its[0])
    (step / "data_iter" / "process_1-of-2.json").unlink()
    with pytest.raises(CorruptCheckpoint, match="no data-iterator state"):
        Checkpointer._restore_data_iter(step, 1, its[0])


def test_sample_group_rule():
    rng = np.random.default_rng(0)
    pos, neg = sample_group(2, 20, 16, rng)
    assert 0 <= pos < 2 and len(set(neg.tolist())) == 15 and neg.max() < 20
    pos, neg = sample_group(1, 3, 16, rng)
    assert len(neg) == 15 and set(neg[:3].tolist()) == {0, 1, 2} and neg.max() < 3


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    good = '{"query": "q", "pos": ["p"], "neg": ["n"]}'
    (tmp_path / "t.jsonl").write_text(good + "\n" + good + "\n" + '{"query": "q", "pos": ["p"], "neg": "n"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:3: 'neg' must be a list of strings"):
        prepare({"train": [tmp_path / "t.jsonl"]}, tmp_path / "data", "bad")
    out = prepare({"train": [tmp_path / "t.jsonl"]}, tmp_path / "data2", "bad", on_error="skip")
    assert len(data_source(tmp_path / "data2", "bad")) == 2 and out.is_dir()
    # Same name, different inputs: refuse to reuse stale data.
    (tmp_path / "t.jsonl").write_text(good + "\n")
    with pytest.raises(ValueError, match="already prepared from other inputs"):
        prepare({"train": [tmp_path / "t.jsonl"]}, tmp_path / "data2", "bad", on_error="skip")


def test_worker_processes_resume(prepared, tokenizer):
    cfg = PipelineConfig(
        batch_size=4, group_size=4, max_document_tokens=32, max_query_tokens=16, seed=5, worker_count=2
    )
    it = training_iterator(prepared, tokenizer, cfg, name="scifact", process_index=0, process_count=1)
    _batches(it, 3)
    state = it.get_state()
    expected = _batches(it, 2)
    resumed = training_iterator(prepared, tokenizer, cfg, name="scifact", process_index=0, process_count=1, state=state)
    assert all(_same(a, b) for a, b in zip(expected, _batches(resumed, 2)))


def test_cli_prepares_train_and_validation_lists(examples, tmp_path, capsys):
    """`--config.train=a,b` is the tuple of train files; the CLI prints each split's size."""
    from kalm_jax.cli.tfds_build import main

    write_training_jsonl(examples[:30], tmp_path / "a.jsonl")
    write_training_jsonl(examples[30:50], tmp_path / "b.jsonl.gz")
    write_training_jsonl(examples[50:60], tmp_path / "v.jsonl")
    assert (
        main(
            [
                f"--config.train={tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl.gz'}",
                f"--config.validation={tmp_path / 'v.jsonl'}",
                f"--config.data_dir={tmp_path / 'data'}",
                "--config.name=cli",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train: 50 examples" in out and "validation: 10 examples" in out, out
    assert len(data_source(tmp_path / "data", "cli", "validation")) == 10
