"""The `label` command: score training JSONL with a teacher checkpoint and write teacher scores back.

    kalm-label --config.teacher=CKPT --config.input=train.jsonl \
        --config.output=train.teacher.jsonl [--config.ratio=4] [--config.format=prob|logit]
        [--config.shard_size=1024] [--coordinator_address H:P --num_processes N --process_id I]

For every example, each positive and negative passage is scored against the example's decoder prompt
(its own `prompt` as instruction when present, else the default instruction) with the teacher's FBNL
head; `pos_scores` / `neg_scores` get the teacher's P(yes) = sigmoid(margin) (``--format prob``, the
default, matching `loss.teacher_format="prob"`) or the raw margin (``--format logit``). Passages shared
between examples are encoded once per batch. The output is written atomically; the input is never touched.

The examples are cut into shards of `shard_size` examples. With several JAX processes (docs/multihost.md)
each process labels a contiguous block of the shards still to do, with an engine over its own devices; the
blocks' scores are gathered (`distributed.allgather_json`) and process 0 alone writes the output. Every
finished shard is saved at once (atomically) in ``OUTPUT.parts/``, keyed by the teacher, the tokenizer, the
settings and the shard's examples, so a killed run started again labels only the shards not yet saved (with
any number of processes); the directory is removed once the output is written. The scores do not depend on
the number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from kalm_jax.checkpoints import loader
from kalm_jax.data.textfile import atomic_write
from kalm_jax.data.training_jsonl import TrainingExample, read_training_jsonl, write_training_jsonl
from kalm_jax.inference.engine import InferenceEngine, probability
from kalm_jax.parallel import distributed

log = logging.getLogger(__name__)

SHARD_SIZE = 1024
"""Examples per resumable shard (the default of ``--config.shard_size``)."""


def parts_dir(output_path: str | Path) -> Path:
    """Where a labelling run keeps its finished shards: ``OUTPUT.parts/`` beside the output."""
    out = Path(output_path).absolute()
    return out.with_name(out.name + ".parts")


def _shard_path(parts: Path, k: int, count: int) -> Path:
    return parts / f"shard-{k:06d}-of-{count:06d}.json"


def _digest(examples: list[TrainingExample]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_json(), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def _read_shard(path: Path, key: str, start: int, stop: int, examples: list[TrainingExample]) -> list | None:
    """The scores saved in shard file `path`, or None when it is missing or not this shard of this run."""
    try:
        obj = json.loads(path.read_text())
        scores = obj["scores"]
        if (
            obj["key"] != key
            or (obj["start"], obj["stop"]) != (start, stop)
            or obj["examples"] != _digest(examples)
            or len(scores) != len(examples)
            or any(len(s) != len(ex.pos) + len(ex.neg) for s, ex in zip(scores, examples))
        ):
            return None
        return scores
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _score(engine: InferenceEngine, chunk: list[TrainingExample], ratio: int, fmt: str) -> list[list[float]]:
    """Each example's scores (positives, then negatives) for one batch of examples."""
    texts = list(dict.fromkeys(p for ex in chunk for p in ex.pos + ex.neg))
    row = {t: i for i, t in enumerate(texts)}
    states = engine.encode(texts, ratio, storage="float32")
    prompt_rows = [engine.prompt_ids(ex.query, ex.prompt if ex.prompt else None, warn=False) for ex in chunk]
    prompt_of = np.asarray([i for i, ex in enumerate(chunk) for _ in ex.pos + ex.neg], np.int64)
    passage_of = np.asarray([row[p] for ex in chunk for p in ex.pos + ex.neg], np.int64)
    margins = engine.margins(prompt_rows, prompt_of, states, passage_of)
    scores = probability(margins) if fmt == "prob" else margins
    out, at = [], 0
    for ex in chunk:
        n = len(ex.pos) + len(ex.neg)
        out.append([float(x) for x in scores[at : at + n]])
        at += n
    return out


def label(
    teacher: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    ratio: int = 4,
    fmt: str = "prob",
    max_document_tokens: int = 512,
    max_query_tokens: int = 128,
    batch_size: int = 64,
    examples_per_batch: int = 16,
    dtype: str | None = None,
    quantization: str | None = None,
    device_states: str = "compute",
    shard_size: int = SHARD_SIZE,
    show_progress: bool = True,
) -> int:
    """Writes `output_path` = `input_path` with teacher pos_scores/neg_scores; returns the example count.

    The teacher and its tokenizer come from `kalm_jax.checkpoints.loader.load` (any checkpoint: HF directory with
    tokenizer.model or tokenizer.json, export, training workdir or step); scoring goes through the
    inference engine. In a multi-process job every process calls it (see the module docstring).
    """
    if fmt not in ("prob", "logit"):
        raise ValueError(f"--format must be 'prob' or 'logit', got {fmt!r}")
    if Path(output_path).absolute() == Path(input_path).absolute():
        raise ValueError("--output must differ from --input (the input is never overwritten)")
    for name, value in (("shard_size", shard_size), ("examples_per_batch", examples_per_batch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    examples = read_training_jsonl(input_path)
    _, model, tok = loader.load(teacher, dtype=dtype, tokenizer=tokenizer)
    engine = InferenceEngine(
        model,
        tok,
        batch_size=batch_size,
        max_document_tokens=max_document_tokens,
        max_query_tokens=max_query_tokens,
        show_progress=False,
        quantization=quantization,
        device_states=device_states,
    )
    bounds = [(a, min(a + shard_size, len(examples))) for a in range(0, len(examples), shard_size)]
    parts = parts_dir(output_path)
    proc, procs = jax.process_index(), jax.process_count()
    # process 0 decides what is left (shards saved by an earlier run under the same key are kept) and tells all
    done: dict[int, list] = {}
    plan = None
    if distributed.is_primary():
        key = hashlib.sha256(
            json.dumps(
                {
                    "teacher": engine.model_fingerprint,
                    "tokenizer": tok.fingerprint(),
                    "ratio": int(ratio),
                    "format": fmt,
                    "max_document_tokens": int(max_document_tokens),
                    "max_query_tokens": int(max_query_tokens),
                    "examples_per_batch": int(examples_per_batch),
                    "compute_dtype": str(np.dtype(engine.model.dtype)),
                    # int8 states score slightly differently; the default keeps the keys earlier runs wrote
                    **({"device_states": device_states} if device_states != "compute" else {}),
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        for k, (a, b) in enumerate(bounds):
            scores = _read_shard(_shard_path(parts, k, len(bounds)), key, a, b, examples[a:b])
            if scores is not None:
                done[k] = scores
        plan = {"key": key, "todo": [k for k in range(len(bounds)) if k not in done]}
    plan = distributed.allgather_json(plan)[0]
    todo = plan["todo"]
    mine = todo[len(todo) * proc // procs : len(todo) * (proc + 1) // procs]  # this process's contiguous block
    scored: dict[str, list] = {}
    pairs = 0
    for k in tqdm(mine, desc="labelling", unit="shard", disable=not show_progress):
        a, b = bounds[k]
        scores = []
        for start in range(a, b, examples_per_batch):
            scores += _score(engine, examples[start : min(start + examples_per_batch, b)], ratio, fmt)
        with atomic_write(_shard_path(parts, k, len(bounds))) as f:
            json.dump(
                {"key": plan["key"], "start": a, "stop": b, "examples": _digest(examples[a:b]), "scores": scores}, f
            )
        scored[str(k)] = scores
        pairs += sum(len(s) for s in scores)
    print(
        f"labelling: process {proc} of {procs} scored {pairs} pairs in {len(mine)} shards "
        f"({len(bounds) - len(todo)} of {len(bounds)} shards already done)",
        flush=True,
    )
    gathered = distributed.allgather_json(scored)
    if distributed.is_primary():
        for part in gathered:
            done.update((int(k), v) for k, v in part.items())
        out = []
        for k, (a, b) in enumerate(bounds):
            for ex, s in zip(examples[a:b], done[k]):
                out.append(dataclasses.replace(ex, pos_scores=s[: len(ex.pos)], neg_scores=s[len(ex.pos) :]))
        write_training_jsonl(out, output_path)
        shutil.rmtree(parts, ignore_errors=True)
    distributed.barrier("label_written")
    return len(examples)
