"""The `label` command: score training JSONL with a teacher checkpoint and write teacher scores back.

    python -m kalm_jax.training.label --config.teacher=CKPT --config.input=train.jsonl \
        --config.output=train.teacher.jsonl [--config.ratio=4] [--config.format=prob|logit]
        [--coordinator_address H:P --num_processes N --process_id I]   (process 0 labels; see docs/multihost.md)

For every example, each positive and negative passage is scored against the example's decoder prompt
(its own `prompt` as instruction when present, else the default instruction) with the teacher's FBNL
head; `pos_scores` / `neg_scores` get the teacher's P(yes) = sigmoid(margin) (``--format prob``, the
default, matching `loss.teacher_format="prob"`) or the raw margin (``--format logit``). Passages shared
between examples are encoded once per batch. The output is written atomically; the input is never touched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kalm_jax import cli, distributed, loader
from kalm_jax.data.training_jsonl import read_training_jsonl, write_training_jsonl
from kalm_jax.engine import InferenceEngine, probability


def label(teacher: str | Path, input_path: str | Path, output_path: str | Path, *, tokenizer: str | Path | None = None,
          ratio: int = 4, fmt: str = "prob", max_document_tokens: int = 512, max_query_tokens: int = 128,
          batch_size: int = 64, examples_per_batch: int = 16, dtype: str | None = None,
          show_progress: bool = True) -> int:
    """Writes `output_path` = `input_path` with teacher pos_scores/neg_scores; returns the example count.

    The teacher and its tokenizer come from `kalm_jax.loader.load` (any checkpoint: HF directory with
    tokenizer.model or tokenizer.json, export, training workdir or step); scoring goes through the
    inference engine.
    """
    if fmt not in ("prob", "logit"):
        raise ValueError(f"--format must be 'prob' or 'logit', got {fmt!r}")
    if Path(output_path).absolute() == Path(input_path).absolute():
        raise ValueError("--output must differ from --input (the input is never overwritten)")
    examples = read_training_jsonl(input_path)
    _, model, tok = loader.load(teacher, dtype=dtype, tokenizer=tokenizer)
    engine = InferenceEngine(model, tok, batch_size=batch_size, max_document_tokens=max_document_tokens,
                             max_query_tokens=max_query_tokens, show_progress=False)
    out = []
    for start in tqdm(range(0, len(examples), examples_per_batch), desc="labelling", disable=not show_progress):
        chunk = examples[start:start + examples_per_batch]
        texts = list(dict.fromkeys(p for ex in chunk for p in ex.pos + ex.neg))
        row = {t: i for i, t in enumerate(texts)}
        states = engine.encode(texts, ratio, storage="float32")
        prompt_rows = [engine.prompt_ids(ex.query, ex.prompt if ex.prompt else None, warn=False) for ex in chunk]
        prompt_of = np.asarray([i for i, ex in enumerate(chunk) for _ in ex.pos + ex.neg], np.int64)
        passage_of = np.asarray([row[p] for ex in chunk for p in ex.pos + ex.neg], np.int64)
        margins = engine.margins(prompt_rows, prompt_of, states, passage_of)
        scores = probability(margins) if fmt == "prob" else margins
        at = 0
        for ex in chunk:
            n = len(ex.pos) + len(ex.neg)
            s = [float(x) for x in scores[at:at + n]]
            at += n
            out.append(dataclasses.replace(ex, pos_scores=s[:len(ex.pos)], neg_scores=s[len(ex.pos):]))
    return write_training_jsonl(out, output_path)


def main(config, coordinator_address=None, num_processes=None, process_id=None) -> int:
    """The CLI: settings from configs/label.py and `--config.KEY=VALUE` overrides (`kalm_jax.cli`)."""
    for key in ("teacher", "input", "output"):
        if not config[key]:
            raise cli.ConfigError(f"--config.{key} is required")
    distributed.initialize(coordinator_address, num_processes, process_id)
    if not distributed.is_primary():  # labelling is not split across processes: process 0 does all of it
        print("labelling runs on process 0 only; this process has nothing to do")
        return 0
    n = label(config.teacher, config.input, config.output, tokenizer=config.tokenizer or None, ratio=config.ratio,
              fmt=config.format, max_document_tokens=config.max_document_tokens,
              max_query_tokens=config.max_query_tokens, batch_size=config.batch_size, dtype=config.dtype or None)
    print(f"labelled {n} examples -> {config.output}")
    return 0


def cli_main(argv=None) -> int:
    """The command line (`kalm-label`, `python -m kalm_jax.training.label`); returns the exit status."""
    return cli.run(main, "label.py", argv=argv, flags=cli.DISTRIBUTED_FLAGS, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    import sys

    sys.exit(cli_main())
