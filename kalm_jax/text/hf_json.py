"""Hugging Face ``tokenizer.json`` tokenizers behind the `kalm_jax.text.spm.Tokenizer` interface.

Released T5Gemma 2 / KaLM-Reranker-V1 Hub repositories may ship only ``tokenizer.json`` (a `tokenizers`
model) and no SentencePiece ``tokenizer.model``. `HFTokenizer` wraps such a file with the same attributes
and methods the rest of kalm-jax uses (``encode``/``encode_batch``/``decode``, the special ids,
``vocab_size``, ``fingerprint``), and `kalm_jax.text.load.load_tokenizer` picks whichever file a directory has,
preferring ``tokenizer.model``.

Encoding never adds special tokens (``add_special_tokens=False``, as in the released code). Tokens the
file declares as *added tokens* (``<bos>``, ``<start_of_turn>``, …) are matched literally inside a text,
which is how `transformers` tokenizes the KaLM prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from kalm_jax.text.spm import (
    BOS,
    END_OF_TURN,
    EOS,
    NO,
    PAD,
    START_OF_TURN,
    UNK,
    YES,
    SpecialIds,
    Tokenizer,
    TokenizerError,
    check_text,
)

JSON_FILENAME = "tokenizer.json"


class HFTokenizer(SpecialIds):
    """A `tokenizers.Tokenizer` loaded from ``tokenizer.json`` with the special ids the reranker needs.

    Attributes:
      hf: the underlying `tokenizers.Tokenizer`.
      path: the ``tokenizer.json`` file it was loaded from.
      data: the file's content (bytes).
    """

    def __init__(self, data: bytes, path: Path | None = None):
        import tokenizers

        where = str(path) if path is not None else "<in-memory tokenizer.json>"
        try:
            self.hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{where}: not a Hugging Face tokenizers file ({e})") from e
        self.data = data
        self.path = path
        self._special: dict[str, int] = {}
        for name in (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN):
            idx = self.hf.token_to_id(name)
            if idx is None:
                raise TokenizerError(f"{where}: special token {name!r} is not in the vocabulary")
            self._special[name] = idx
        for word in (YES, NO):
            enc = self.hf.encode(word, add_special_tokens=False)
            if len(enc.ids) != 1:
                raise TokenizerError(
                    f"{where}: {word!r} must encode to exactly one token (the score is "
                    f"logit('yes') - logit('no')), got {len(enc.ids)}: {enc.tokens}"
                )
            self._special[word] = enc.ids[0]

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        """Loads a ``tokenizer.json`` file, or the one inside a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / JSON_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no Hugging Face tokenizer found (expected a {JSON_FILENAME} file)")
        return cls(path.read_bytes(), path=path)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the largest id + 1 for a contiguous vocabulary)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The largest id the tokenizer can produce (ids need not be contiguous in a tokenizer.json)."""
        return max(self.hf.get_vocab(with_added_tokens=True).values(), default=-1)

    def fingerprint(self) -> str:
        """sha256 hex digest of the ``tokenizer.json`` bytes, for cache keys."""
        return hashlib.sha256(self.data).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added; literal added-token strings map to their ids."""
        return self.hf.encode(check_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for each text (the Rust tokenizer parallelises the batch)."""
        texts = [check_text(t, f"text {i}") for i, t in enumerate(texts)]
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, keeping special tokens as their strings (``skip_special_tokens=False``)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path}, vocab_size={self.vocab_size}, special={self._special})"


AnyTokenizer = Tokenizer | HFTokenizer


def check_vocab(tokenizer: AnyTokenizer, model_vocab_size: int, where: str = "tokenizer") -> None:
    """Raises if the tokenizer can produce ids the model's embedding table does not have: its largest id
    (not only its id count: a tokenizer.json may have gaps) and every special / yes / no id must be
    below `model_vocab_size`. Run before anything is compiled: an out-of-range id gives NaN scores."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"{where}: tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has only "
            f"{model_vocab_size}; this tokenizer was not made for this checkpoint"
        )
    bad = {name: i for name, i in tokenizer.special_ids.items() if not 0 <= int(i) < model_vocab_size}
    if bad:
        raise TokenizerError(
            f"{where}: special ids {bad} are not below the model's vocabulary size "
            f"{model_vocab_size}; this tokenizer was not made for this checkpoint"
        )
    max_id = getattr(tokenizer, "max_id", tokenizer.vocab_size - 1)
    if max_id >= model_vocab_size:
        raise TokenizerError(
            f"{where}: tokenizer's largest id {max_id} is not below the model's vocabulary size "
            f"{model_vocab_size} (its ids are not contiguous); this tokenizer was not made for "
            "this checkpoint"
        )


__all__ = ["HFTokenizer", "AnyTokenizer", "check_vocab", "JSON_FILENAME"]
