"""The `label` command: score training JSONL with a teacher checkpoint and write teacher scores back.

    python -m kalm_jax.training.label --teacher CKPT --input train.jsonl --output train.teacher.jsonl
        [--tokenizer tokenizer.model] [--ratio 4] [--format prob|logit]
        [--coordinator_address H:P --num_processes N --process_id I]   (process 0 labels; see docs/multihost.md)

For every example, each positive and negative passage is scored against the example's decoder prompt
(its own `prompt` as instruction when present, else the default instruction) with the teacher's FBNL
head; `pos_scores` / `neg_scores` get the teacher's P(yes) = sigmoid(margin) (``--format prob``, the
default, matching `loss.teacher_format="prob"`) or the raw margin (``--format logit``). Passages shared
between examples are encoded once per batch. The output is written atomically; the input is never touched.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kalm_jax import checkpointing, distributed, prompts, scoring
from kalm_jax.data.training_jsonl import read_training_jsonl, write_training_jsonl
from kalm_jax.tokenizer import Tokenizer


def label(teacher: str | Path, input_path: str | Path, output_path: str | Path, *, tokenizer: str | Path | None = None,
          ratio: int = 4, fmt: str = "prob", passage_max_tokens: int = 512, query_max_tokens: int = 128,
          batch_size: int = 64, examples_per_batch: int = 16, show_progress: bool = True) -> int:
    """Writes `output_path` = `input_path` with teacher pos_scores/neg_scores; returns the example count."""
    if fmt not in ("prob", "logit"):
        raise ValueError(f"--format must be 'prob' or 'logit', got {fmt!r}")
    if Path(output_path).absolute() == Path(input_path).absolute():
        raise ValueError("--output must differ from --input (the input is never overwritten)")
    _, model = checkpointing.load_any(teacher)
    tok_path = Path(tokenizer) if tokenizer else None
    if tok_path is None:
        t = Path(teacher)
        tok_path = next((c for c in (t / "tokenizer.model", t.parent / "tokenizer.model",
                                     t.parent.parent / "tokenizer.model") if c.is_file()), None)
        if tok_path is None:
            raise FileNotFoundError(f"{teacher}: no tokenizer.model next to the teacher; pass --tokenizer")
    tok = Tokenizer.load(tok_path)
    examples = read_training_jsonl(input_path)
    out = []
    for start in tqdm(range(0, len(examples), examples_per_batch), desc="labelling", disable=not show_progress):
        chunk = examples[start:start + examples_per_batch]
        texts = list(dict.fromkeys(p for ex in chunk for p in ex.pos + ex.neg))
        row = {t: i for i, t in enumerate(texts)}
        states, masks = [], []
        for i in range(0, len(texts), batch_size):
            ids, mask = prompts.tokenize_documents(tok, texts[i:i + batch_size], passage_max_tokens, pad_to_multiple_of=8)
            s, m, _ = scoring.encode_passages(model, ids, mask, ratio)
            states.append(s)
            masks.append(m)
        width = max(s.shape[1] for s in states)
        states = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0))) for s in states])
        masks = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in masks])
        for ex in chunk:
            passages = ex.pos + ex.neg
            instruction = ex.prompt if ex.prompt else None
            dec_ids, dec_mask = prompts.tokenize_decoder_prompts(tok, [ex.query] * len(passages), instruction,
                                                                 query_max_tokens=query_max_tokens)
            rows = np.asarray([row[p] for p in passages])
            margins = scoring.score(model, dec_ids, dec_mask, states[rows], masks[rows], tok.yes_id, tok.no_id)
            scores = scoring.probability(margins) if fmt == "prob" else margins
            scores = [float(x) for x in scores]
            out.append(dataclasses.replace(ex, pos_scores=scores[:len(ex.pos)], neg_scores=scores[len(ex.pos):]))
    return write_training_jsonl(out, output_path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write teacher scores into training JSONL (stage-3 input).")
    p.add_argument("--teacher", required=True, help="teacher checkpoint: HF dir, model checkpoint or training workdir")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: next to the teacher)")
    p.add_argument("--ratio", type=int, default=4, help="MEP ratio the teacher scores at")
    p.add_argument("--format", dest="fmt", default="prob", choices=["prob", "logit"])
    p.add_argument("--passage_max_tokens", type=int, default=512)
    p.add_argument("--query_max_tokens", type=int, default=128)
    distributed.add_arguments(p)
    args = p.parse_args(argv)
    distributed.initialize_from(args)
    if not distributed.is_primary():  # labelling is not split across processes: process 0 does all of it
        print("labelling runs on process 0 only; this process has nothing to do")
        return
    n = label(args.teacher, args.input, args.output, tokenizer=args.tokenizer, ratio=args.ratio, fmt=args.fmt,
              passage_max_tokens=args.passage_max_tokens, query_max_tokens=args.query_max_tokens)
    print(f"labelled {n} examples -> {args.output}")


if __name__ == "__main__":
    main()
