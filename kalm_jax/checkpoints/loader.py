"""The one checkpoint loader: any checkpoint a user has -> config, model and the checkpoint's own tokenizer.

Accepted paths (see `orbax_io.load_any` for the model part):
  * a Hugging Face directory: ``config.json`` + ``*.safetensors`` (+ index), with ``tokenizer.model`` and/or
    ``tokenizer.json`` (released T5Gemma 2 / KaLM-Reranker-V1 repositories ship only ``tokenizer.json``);
  * a kalm-jax model checkpoint (``kalm_model.json`` + ``params/``, e.g. from ``training.export``);
  * a training step directory ``<workdir>/checkpoints/<step>`` or a training workdir (latest step).

The tokenizer is looked for, in this order, in the checkpoint directory, its ``tokenizer/`` subdirectory and,
for a step directory, the training workdir two levels up; in each place ``tokenizer.model`` wins over
``tokenizer.json`` (`kalm_jax.text.load`). An explicitly given tokenizer replaces the search. Either way its
ids must fit the model's vocabulary (`hf_json.check_vocab`), so a tokenizer made for another checkpoint is an
error here, not NaN scores later. Every CLI and the `Reranker` load through `load`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from kalm_jax.checkpoints import orbax_io
from kalm_jax.model.config import ModelConfig
from kalm_jax.model.t5gemma2 import T5Gemma2
from kalm_jax.text.hf_json import JSON_FILENAME, AnyTokenizer, check_vocab
from kalm_jax.text.load import first_tokenizer_dir, load_tokenizer
from kalm_jax.text.spm import MODEL_FILENAME


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: ``config, model, tokenizer = loader.load(path)`` unpacks it."""

    config: ModelConfig
    model: T5Gemma2
    tokenizer: AnyTokenizer | None
    path: Path

    def __iter__(self):
        return iter((self.config, self.model, self.tokenizer))


checkpoint_dir = orbax_io.checkpoint_dir


def tokenizer_search_dirs(path: str | os.PathLike) -> list[Path]:
    """Where the tokenizer of the checkpoint at `path` may live, most specific first."""
    p = checkpoint_dir(path)
    dirs = [p, p / "tokenizer"]
    if p.parent.name == "checkpoints":  # a training step directory: <workdir>/checkpoints/<step>
        workdir = p.parent.parent
        dirs += [workdir, workdir / "tokenizer"]
    step = orbax_io.latest_step_dir(p) if p.is_dir() else None
    if step is not None:  # a training workdir: its latest step may hold tokenizer files too
        dirs.append(step)
    return dirs


def find_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
    """The tokenizer that belongs to the checkpoint at `path` (``tokenizer.model`` or ``tokenizer.json``)."""
    dirs = tokenizer_search_dirs(path)
    found = first_tokenizer_dir(dirs)
    if found is not None:
        return load_tokenizer(found)
    raise FileNotFoundError(
        f"{path}: no {MODEL_FILENAME} or {JSON_FILENAME} found for this checkpoint (looked in "
        f"{', '.join(str(d) for d in dirs)}); pass tokenizer=PATH (--config.tokenizer=PATH on the command line)"
    )


def resolve_tokenizer(
    tokenizer: str | os.PathLike | AnyTokenizer | None, checkpoint: str | os.PathLike, vocab_size: int
) -> AnyTokenizer:
    """`tokenizer` (object, file or directory) or, when None/empty, the checkpoint's own; checked against
    the model's `vocab_size`."""
    if tokenizer is None or (isinstance(tokenizer, str) and not tokenizer):
        tok = find_tokenizer(checkpoint)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tok = load_tokenizer(tokenizer)
    else:
        tok = tokenizer
    check_vocab(tok, vocab_size, where=f"{getattr(tok, 'path', None) or 'tokenizer'} (for checkpoint {checkpoint})")
    return tok


def load(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    tokenizer: str | os.PathLike | AnyTokenizer | None | bool = None,
) -> Checkpoint:
    """Loads any supported checkpoint with its tokenizer.

    Args:
      path: HF directory (or its config.json), model checkpoint, training step directory or workdir.
      dtype: parameter dtype ("float32" / "bfloat16"); None keeps the checkpoint's (HF: float32).
      compute_dtype: activation dtype; None = `dtype`.
      tokenizer: explicit tokenizer (object, ``tokenizer.model`` / ``tokenizer.json`` file or a directory);
        None = the checkpoint's own (see the module docstring for the search order); False = none (for
        tools that only move weights, e.g. conversion; the returned tokenizer is None).
    Raises:
      FileNotFoundError for a missing path or tokenizer; ValueError / TokenizerError for a checkpoint that
      does not load or a tokenizer whose ids do not fit the model's vocabulary.
    """
    p = checkpoint_dir(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: checkpoint path does not exist")
    if tokenizer is None:  # find it before the (possibly long) weight load, so a missing one fails fast
        tokenizer = find_tokenizer(p)
    config, model = orbax_io.load_any(p, dtype=dtype, compute_dtype=compute_dtype)
    if tokenizer is False:
        return Checkpoint(config, model, None, p)
    return Checkpoint(config, model, resolve_tokenizer(tokenizer, p, config.vocab_size), p)


__all__ = [
    "Checkpoint",
    "load",
    "find_tokenizer",
    "resolve_tokenizer",
    "tokenizer_search_dirs",
    "checkpoint_dir",
]
