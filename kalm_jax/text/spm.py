"""SentencePiece tokenizer with the Gemma special-token layout used by T5Gemma 2 / KaLM-Reranker-V1.

`Tokenizer.load` wraps a supplied Gemma 3 ``tokenizer.model`` (or any SentencePiece model with the same
special tokens) and reads the special ids from the model itself. `Tokenizer.train` builds a model from a
corpus so the whole pipeline runs without a downloaded tokenizer; it reserves the Gemma layout
(pad=0, eos=1, bos=2, unk=3, and by default ``<start_of_turn>``=105 / ``<end_of_turn>``=106) and
guarantees that "yes" and "no" are single pieces.

Encoding never adds special tokens. Like Hugging Face tokenizers with added special tokens, the literal
strings ``<bos>``, ``<eos>``, ``<pad>``, ``<start_of_turn>`` and ``<end_of_turn>`` inside a text become
their single special ids; everything between them is encoded by SentencePiece segment by segment.

CLI (settings in configs/tokenizer.py): ``kalm-tokenizer --config.out=DIR --config.beir=DATA/scifact
--config.vocab_size=8000``
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from kalm_jax import atomic

MODEL_FILENAME = "tokenizer.model"

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
YES, NO = "yes", "no"

SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, START_OF_TURN, END_OF_TURN)
"""Strings that map to one special id when they appear literally in a text."""

GEMMA_RESERVED: tuple[str, ...] = ("<mask>", "[multimodal]") + tuple(f"<unused{i}>" for i in range(99))
"""Pieces Gemma 3 keeps at ids 4..104, so that the turn markers land on 105 and 106."""


class TokenizerError(ValueError):
    """A tokenizer model lacks a required special token or single-piece answer word."""


def check_text(text, where: str = "text") -> str:
    """`text` if it is a str that is valid Unicode; TypeError / TokenizerError naming the position otherwise
    (a lone surrogate, e.g. from a bad decode with errors='surrogateescape', cannot be tokenized)."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"{where} is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
            f"{e.start} (decode the source text with errors='replace')"
        ) from None
    return text


class SpecialIds:
    """Special-token id properties over `self._special` (name -> id), shared by the tokenizer adapters."""

    _special: dict[str, int]

    @property
    def pad_id(self) -> int:
        return self._special[PAD]

    @property
    def eos_id(self) -> int:
        return self._special[EOS]

    @property
    def bos_id(self) -> int:
        return self._special[BOS]

    @property
    def unk_id(self) -> int:
        return self._special[UNK]

    @property
    def start_of_turn_id(self) -> int:
        return self._special[START_OF_TURN]

    @property
    def end_of_turn_id(self) -> int:
        return self._special[END_OF_TURN]

    @property
    def yes_id(self) -> int:
        return self._special[YES]

    @property
    def no_id(self) -> int:
        return self._special[NO]

    @property
    def special_ids(self) -> dict[str, int]:
        """Name -> id for pad, eos, bos, unk, the turn markers, "yes" and "no"."""
        return dict(self._special)


class Tokenizer(SpecialIds):
    """A `sentencepiece.SentencePieceProcessor` plus the special ids the reranker needs.

    Attributes:
      sp: the underlying processor.
      path: the ``tokenizer.model`` file it was loaded from (None when built from bytes).
    """

    def __init__(self, model_proto: bytes, path: Path | None = None):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._proto_bytes = model_proto
        self.path = path
        where = str(path) if path is not None else "<in-memory tokenizer>"
        self._special: dict[str, int] = {}
        for name in (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN):
            self._special[name] = self._single_piece_id(name, where)
        for word in (YES, NO):
            ids = self.sp.encode(word)
            if len(ids) != 1:
                pieces = [self.sp.id_to_piece(i) for i in ids]
                raise TokenizerError(
                    f"{where}: {word!r} must encode to exactly one token (the score is "
                    f"logit('yes') - logit('no')), got {len(ids)}: {pieces}"
                )
            self._special[word] = ids[0]
        by_length = sorted(SPECIAL_TOKENS, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in by_length) + ")")
        self._id_to_special = {self._special[t]: t for t in SPECIAL_TOKENS}

    def _single_piece_id(self, piece: str, where: str) -> int:
        idx = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(idx) != piece:
            raise TokenizerError(f"{where}: special token {piece!r} is not a piece of this SentencePiece model")
        return idx

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Loads a ``tokenizer.model`` file, or the one inside a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no SentencePiece model found (expected a {MODEL_FILENAME} file)")
        data = path.read_bytes()
        try:
            proto = sp_model.ModelProto()
            proto.ParseFromString(data)
            if not proto.pieces:
                raise ValueError("no pieces")
        except Exception as e:  # noqa: BLE001 - protobuf raises several types
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
        return cls(data, path=path)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        out_dir: str | Path,
        vocab_size: int = 8000,
        *,
        model_type: str = "unigram",
        gemma_layout: bool = True,
        character_coverage: float = 1.0,
        input_sentence_size: int = 0,
        num_threads: int = 2,
        seed_words: Sequence[str] = (YES, NO),
    ) -> Tokenizer:
        """Trains a SentencePiece model on `texts` and writes ``out_dir/tokenizer.model``.

        The model follows the Gemma layout: pad=0, eos=1, bos=2, unk=3; with ``gemma_layout`` the 101
        Gemma reserved pieces fill ids 4..104 so ``<start_of_turn>``=105 and ``<end_of_turn>``=106
        (without it they are 4 and 5). Byte fallback makes every string round-trip; whitespace and
        newlines are kept verbatim (no dummy prefix, no normalisation), as in Gemma. Each of
        `seed_words` that training did not make a single piece replaces the lowest-scoring multi-char
        piece, so "yes"/"no" are single tokens and the vocab size is exactly `vocab_size`.
        """
        reserved = list(GEMMA_RESERVED) if gemma_layout else []
        user_defined = reserved + [START_OF_TURN, END_OF_TURN]
        min_vocab = 4 + len(user_defined) + 256 + 64
        if vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size={vocab_size} is too small; need at least {min_vocab} "
                f"(specials, reserved pieces and 256 byte-fallback pieces)"
            )
        sentences = (t for t in texts if t)
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece=PAD,
            eos_piece=EOS,
            bos_piece=BOS,
            unk_piece=UNK,
            user_defined_symbols=user_defined,
            byte_fallback=True,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            split_digits=True,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=num_threads,
            hard_vocab_limit=True,
            minloglevel=2,
        )
        data = _ensure_single_pieces(buf.getvalue(), seed_words)
        path = atomic.write_bytes(Path(out_dir) / MODEL_FILENAME, data)
        return cls(data, path=path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def proto_bytes(self) -> bytes:
        """The serialized SentencePiece model (what ``tokenizer.model`` holds)."""
        return self._proto_bytes

    def fingerprint(self) -> str:
        """sha256 hex digest of the serialized model, for cache keys."""
        return hashlib.sha256(self._proto_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added; literal special-token strings map to their ids."""
        check_text(text)
        ids: list[int] = []
        for part in self._special_re.split(text):
            if not part:
                continue
            special = self._special.get(part) if part in SPECIAL_TOKENS else None
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for each text."""
        for i, t in enumerate(texts):
            check_text(t, f"text {i}")
        return [self.encode(t) for t in texts]

    @property
    def max_id(self) -> int:
        """The largest id the tokenizer can produce (SentencePiece ids are contiguous)."""
        return self.vocab_size - 1

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, keeping special tokens as their strings (HF ``skip_special_tokens=False``)."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            name = self._id_to_special.get(i)
            if name is None:
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            out.append(name)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def __getstate__(self) -> dict:
        return {"model_proto": self._proto_bytes, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], path=state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path}, vocab_size={self.vocab_size}, special={self._special})"


def _ensure_single_pieces(model_bytes: bytes, words: Sequence[str]) -> bytes:
    """Makes each of `words` a NORMAL piece, replacing the lowest-scoring multi-char normal pieces."""
    proto = sp_model.ModelProto()
    proto.ParseFromString(model_bytes)
    normal = sp_model.ModelProto.SentencePiece.NORMAL
    existing = {p.piece for p in proto.pieces}
    missing = [w for w in words if w not in existing]
    if not missing:
        return model_bytes
    keep = set(words) | {p.piece for p in proto.pieces if p.type != normal}
    candidates = sorted(
        (i for i, p in enumerate(proto.pieces) if p.type == normal and len(p.piece) > 1 and p.piece not in keep),
        key=lambda i: proto.pieces[i].score,
    )
    if len(candidates) < len(missing):
        raise TokenizerError(f"vocabulary too small to add single pieces for {missing}")
    top = max(p.score for p in proto.pieces if p.type == normal)
    for word, idx in zip(missing, candidates):
        proto.pieces[idx].piece = word
        proto.pieces[idx].score = top
        proto.pieces[idx].type = normal
    return proto.SerializeToString()


def run_cli(config) -> int:
    """Trains the tokenizer of `config` (configs/tokenizer.py) and prints its path, vocab, special ids and sha256."""
    import itertools

    from kalm_jax import cli
    from kalm_jax.data.beir import load_corpus, passage_text
    from kalm_jax.data.textfile import iter_lines

    if not config.out:
        raise cli.ConfigError("--config.out is required (kalm-tokenizer --config.out=DIR --config.beir=DATA/scifact)")
    if not config.beir and not config.text:
        raise cli.ConfigError("--config.beir and/or --config.text is required (BEIR dataset directories, text files)")
    if config.model_type not in ("unigram", "bpe"):
        raise cli.ConfigError(f"--config.model_type must be unigram or bpe, got {config.model_type!r}")

    def texts():
        for d in config.beir:
            corpus_file = next(
                (Path(d) / n for n in ("corpus.jsonl.gz", "corpus.jsonl") if (Path(d) / n).is_file()), None
            )
            if corpus_file is None:
                raise FileNotFoundError(f"{d}: no corpus.jsonl[.gz]")
            yield from (passage_text(doc) for doc in load_corpus(corpus_file).values())
        for f in config.text:
            yield from (line for _, line in iter_lines(str(f)))

    tok = Tokenizer.train(
        itertools.islice(texts(), config.max_texts),
        config.out,
        config.vocab_size,
        model_type=config.model_type,
        gemma_layout=config.gemma_layout,
    )
    print(f"{tok.path}: vocab {tok.vocab_size}, special ids {tok.special_ids}, sha256 {tok.fingerprint()}")
    return 0
