"""The one place that knows tokenizer files: which names a tokenizer has, how a file or directory is loaded,
which files travel with it, and how it is written beside a checkpoint.

A directory's tokenizer is ``tokenizer.model`` (SentencePiece, this project's native format) when it has
one, else ``tokenizer.json`` (a Hugging Face `tokenizers` file; released T5Gemma 2 / KaLM-Reranker-V1
repositories ship only this). Where a checkpoint's tokenizer is looked for is the checkpoint loader's
business (`kalm_jax.checkpoints.loader.tokenizer_search_dirs`); it passes the directories here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from kalm_jax.text.hf_json import JSON_FILENAME, AnyTokenizer, HFTokenizer
from kalm_jax.text.spm import MODEL_FILENAME, Tokenizer

TOKENIZER_FILENAMES = (MODEL_FILENAME, JSON_FILENAME)
"""The files a tokenizer is loaded from, preferred first."""

TOKENIZER_FILES = (
    *TOKENIZER_FILENAMES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Every tokenizer file that travels with a checkpoint (copied beside an export when found beside its source)."""


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a loadable tokenizer file."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILENAMES)


def load_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
    """The tokenizer at `path`: a ``tokenizer.model`` / ``tokenizer.json`` file, or a directory holding one
    (``tokenizer.model`` wins when it has both)."""
    p = Path(path)
    if p.is_file():
        return HFTokenizer.load(p) if p.suffix == ".json" else Tokenizer.load(p)
    if (p / MODEL_FILENAME).is_file():
        return Tokenizer.load(p / MODEL_FILENAME)
    if (p / JSON_FILENAME).is_file():
        return HFTokenizer.load(p / JSON_FILENAME)
    raise FileNotFoundError(f"{p}: no tokenizer found (expected {MODEL_FILENAME} or {JSON_FILENAME})")


def first_tokenizer_dir(dirs: Iterable[str | os.PathLike | None]) -> Path | None:
    """The first of `dirs` that holds a loadable tokenizer file, or None."""
    for d in dirs:
        if d is not None and has_tokenizer(d):
            return Path(d)
    return None


def tokenizer_files(*dirs: str | os.PathLike | None) -> dict[str, Path]:
    """Tokenizer files (`TOKENIZER_FILES`) found in the first of `dirs` that has any: name -> path."""
    for d in dirs:
        if d is None or not Path(d).is_dir():
            continue
        found = {n: Path(d) / n for n in TOKENIZER_FILES if (Path(d) / n).is_file()}
        if found:
            return found
    return {}


def files_to_write(tokenizer: AnyTokenizer | str | os.PathLike) -> dict[str, Path | bytes]:
    """The files that represent `tokenizer` (a loaded tokenizer, a tokenizer file or a directory with
    tokenizer files) beside a checkpoint: name -> source path or content."""
    if isinstance(tokenizer, Tokenizer):
        return {MODEL_FILENAME: tokenizer.proto_bytes}
    if isinstance(tokenizer, HFTokenizer):
        return {JSON_FILENAME: tokenizer.data}
    p = Path(tokenizer)
    if p.is_file():
        return {MODEL_FILENAME if p.suffix == ".model" else p.name: p}
    if p.is_dir():
        found = tokenizer_files(p)
        if found:
            return dict(found)
        raise FileNotFoundError(f"{p}: no tokenizer files ({', '.join(TOKENIZER_FILENAMES)}, ...)")
    raise FileNotFoundError(f"{p}: tokenizer not found")


def source_file(tokenizer: AnyTokenizer) -> Path | None:
    """The file a tokenizer was loaded from (``tokenizer.model`` or ``tokenizer.json``), if it still exists."""
    path = getattr(tokenizer, "path", None)
    return Path(path) if path is not None and Path(path).is_file() else None


def copy_tokenizer(tokenizer: AnyTokenizer, directory: str | os.PathLike) -> Path:
    """Writes the tokenizer's file into `directory` under its standard name; returns the written path."""
    directory = Path(directory)
    target = directory / (MODEL_FILENAME if isinstance(tokenizer, Tokenizer) else JSON_FILENAME)
    if getattr(tokenizer, "path", None) is None:
        target.write_bytes(tokenizer.proto_bytes if isinstance(tokenizer, Tokenizer) else tokenizer.data)
        return target
    src = source_file(tokenizer)
    if src is None:
        raise FileNotFoundError(f"tokenizer {tokenizer!r}: its source file is gone; cannot copy it")
    if src.resolve() != target.resolve():
        shutil.copyfile(src, target)
    return target


__all__ = [
    "TOKENIZER_FILENAMES",
    "TOKENIZER_FILES",
    "has_tokenizer",
    "load_tokenizer",
    "first_tokenizer_dir",
    "tokenizer_files",
    "files_to_write",
    "source_file",
    "copy_tokenizer",
]
