"""KaLM-Reranker-V1 prompt templates, byte-exact with the released inference code, and their tokenization.

Encoder (passage) text: ``"<Document>: {doc}"``. Decoder (query) text: the Gemma chat turn

    <bos><start_of_turn>user\\n{system}\\n\\n<Instruct>: {instruction}\\n<Query>: {query}<end_of_turn>\\n
    <start_of_turn>model\\n\\n\\n\\n

(one string, no line break after ``<end_of_turn>\\n``). Both are tokenized without added special tokens
(the literal ``<bos>`` becomes the BOS id), right padded with the pad id.

Stage-1 ("without instruction") prompt: its exact form is UNKNOWN in the paper (arXiv 2606.22807; the
released wrapper's behaviour for an empty instruction is not documented either). This module's choice drops the
whole ``<Instruct>: ...\\n`` line and keeps the system instruction and everything else unchanged; it is not
claimed to be the authors' string.

"No instruction" has one meaning everywhere (`resolve_instruction`, applied by `decoder_text`, so the
`Reranker`, the inference engine, training data, dev evaluation and eval.py's instruction labels all agree):

    None, True, "default"          the default instruction (`DEFAULT_INSTRUCTION`)
    False (`NO_INSTRUCTION`), "", "none" (any case, surrounding spaces ignored)
                                   no ``<Instruct>`` line
    any other string               that text, verbatim

The literal texts "default" and "none" therefore cannot be used as instructions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kalm_jax.text.spm import Tokenizer

DEFAULT_SYSTEM_INSTRUCTION = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a query, retrieve documents that answer the query."

DOCUMENT_PREFIX = "<Document>: "
NO_INSTRUCTION = False
"""Pass as `instruction` to build the stage-1 prompt without an ``<Instruct>`` line."""

INFERENCE_QUERY_MAX_TOKENS = 512
INFERENCE_DOCUMENT_MAX_TOKENS = 1024
TRAIN_QUERY_MAX_TOKENS = 128
TRAIN_DOCUMENT_MAX_TOKENS = 512


def document_text(doc: str) -> str:
    """Encoder input text for one passage."""
    return f"{DOCUMENT_PREFIX}{doc}"


def resolve_instruction(instruction: str | bool | None) -> str | bool | None:
    """The one rule for instruction spellings (module docstring): None for the default instruction,
    `NO_INSTRUCTION` (False) for no ``<Instruct>`` line, else the text. Used by `decoder_text` and by the
    config readers (training's ``data.instruction``, eval.py's ``instructions`` labels)."""
    if instruction is None or instruction is True:
        return None
    if instruction is False:
        return NO_INSTRUCTION
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, None or a bool, got {type(instruction).__name__}")
    key = instruction.strip().lower()
    if key == "default":
        return None
    if key in ("", "none"):
        return NO_INSTRUCTION
    return instruction


def decoder_text(query: str, instruction: str | bool | None = None, system: str | None = None) -> str:
    """Decoder prompt for one (already truncated) query.

    Args:
      query: the query text, inserted verbatim.
      instruction: task instruction, read by `resolve_instruction`: None / "default" mean `DEFAULT_INSTRUCTION`;
        False (`NO_INSTRUCTION`), "" and "none" drop the ``<Instruct>`` line (this project's stage-1 form).
      system: system instruction; None means `DEFAULT_SYSTEM_INSTRUCTION`.
    """
    if system is None:
        system = DEFAULT_SYSTEM_INSTRUCTION
    instruction = resolve_instruction(instruction)
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    instruct_line = "" if instruction is False else f"<Instruct>: {instruction}\n"
    return (
        "<bos><start_of_turn>user\n"
        f"{system}\n\n"
        f"{instruct_line}"
        f"<Query>: {query}<end_of_turn>\n"
        "<start_of_turn>model\n\n\n\n"
    )


def truncate_query(tokenizer: Tokenizer, query: str, max_tokens: int | None) -> str:
    """Cuts `query` to its first `max_tokens` tokens (no special tokens) and decodes them back.

    A query that already fits is returned unchanged (the released code round-trips it through
    decode, which is the identity for SentencePiece with byte fallback).
    """
    if max_tokens is None:
        return query
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    ids = tokenizer.encode(query)
    if len(ids) <= max_tokens:
        return query
    return tokenizer.decode(ids[:max_tokens])


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return -(-n // multiple) * multiple


def pad_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists into ``(ids int32 [B, L], mask int32 [B, L])``.

    L is `length` when given (a longer sequence raises), else the longest sequence rounded up to
    `pad_to_multiple_of` (at least 1).
    """
    longest = max((len(s) for s in seqs), default=0)
    if length is None:
        width = max(_round_up(longest, pad_to_multiple_of), 1)
    else:
        if longest > length:
            raise ValueError(f"a sequence has {longest} tokens, more than the fixed length {length}")
        width = length
    ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def encode_document(tokenizer: Tokenizer, doc: str, max_length: int) -> list[int]:
    """Token ids of ``document_text(doc)`` truncated to `max_length` (the limit covers the prefix)."""
    return tokenizer.encode(document_text(doc))[:max_length]


def tokenize_documents(
    tokenizer: Tokenizer,
    docs: Sequence[str],
    max_length: int = INFERENCE_DOCUMENT_MAX_TOKENS,
    pad_to_multiple_of: int | None = None,
    *,
    length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder inputs for raw passages (this function applies `document_text`).

    Returns ``(ids int32 [B, S], mask int32 [B, S])``; S is `length` if given, else the longest
    (truncated) passage rounded up to `pad_to_multiple_of`. Passages are cut to `max_length` tokens.
    """
    seqs = [encode_document(tokenizer, d, max_length) for d in docs]
    return pad_batch(seqs, tokenizer.pad_id, length=length, pad_to_multiple_of=pad_to_multiple_of)


def encode_decoder_prompt(
    tokenizer: Tokenizer,
    query: str,
    instruction: str | bool | None = None,
    system: str | None = None,
    max_query_tokens: int | None = INFERENCE_QUERY_MAX_TOKENS,
    max_length: int | None = None,
    *,
    cut_instruction: bool = False,
) -> list[int]:
    """Token ids of the decoder prompt for `query` (truncated to `max_query_tokens` first).

    With `max_length`, a prompt that is still longer is made to fit: with `cut_instruction`, a custom
    instruction is cut first (with a warning); then the query is cut further, token by token. If even an
    empty query does not fit (e.g. a system instruction longer than the budget), ValueError.
    """
    q = truncate_query(tokenizer, query, max_query_tokens)
    instruction = resolve_instruction(instruction)
    ids = tokenizer.encode(decoder_text(q, instruction, system))
    if max_length is None or len(ids) <= max_length:
        return ids
    if cut_instruction and isinstance(instruction, str) and instruction:
        import warnings

        ins_ids = tokenizer.encode(instruction)
        keep = len(ins_ids) - (len(ids) - max_length)
        while keep > 0:
            cut = tokenizer.decode(ins_ids[:keep])
            ids = tokenizer.encode(decoder_text(q, cut, system))
            if len(ids) <= max_length:
                warnings.warn(
                    f"instruction of {len(ins_ids)} tokens cut to {keep} tokens so the decoder prompt "
                    f"fits max_prompt_tokens={max_length}",
                    UserWarning,
                    stacklevel=3,
                )
                return ids
            keep -= max(1, len(ids) - max_length)
        warnings.warn(
            f"instruction of {len(ins_ids)} tokens dropped: the decoder prompt must fit max_prompt_tokens={max_length}",
            UserWarning,
            stacklevel=3,
        )
        instruction = NO_INSTRUCTION
        ids = tokenizer.encode(decoder_text(q, instruction, system))
        if len(ids) <= max_length:
            return ids
    q_ids = tokenizer.encode(q)
    budget = len(q_ids) - (len(ids) - max_length)
    while budget >= 0:
        ids = tokenizer.encode(decoder_text(tokenizer.decode(q_ids[:budget]), instruction, system))
        if len(ids) <= max_length:
            return ids
        budget -= max(1, len(ids) - max_length)
    raise ValueError(
        f"the decoder prompt template alone (system and instruction included) has {len(ids)} tokens, "
        f"more than max_length={max_length}; shorten the system instruction or raise the limit"
    )


def tokenize_decoder_prompts(
    tokenizer: Tokenizer,
    queries: Sequence[str],
    instruction: str | bool | None = None,
    system: str | None = None,
    max_query_tokens: int | None = INFERENCE_QUERY_MAX_TOKENS,
    pad_to_multiple_of: int | None = 8,
    *,
    length: int | None = None,
    instructions: Sequence[str | bool | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decoder inputs for a batch of queries.

    Returns ``(ids int32 [B, T], mask int32 [B, T])``, right padded; T is `length` if given (queries are
    cut further if needed to fit, see `encode_decoder_prompt`), else the longest prompt rounded up to
    `pad_to_multiple_of`. `instructions` gives one instruction per query and overrides `instruction`.
    """
    if instructions is not None and len(instructions) != len(queries):
        raise ValueError(f"{len(instructions)} instructions for {len(queries)} queries")
    seqs = [
        encode_decoder_prompt(
            tokenizer,
            q,
            instructions[i] if instructions is not None else instruction,
            system,
            max_query_tokens,
            max_length=length,
        )
        for i, q in enumerate(queries)
    ]
    return pad_batch(seqs, tokenizer.pad_id, length=length, pad_to_multiple_of=pad_to_multiple_of)


def decoder_template_tokens(
    tokenizer: Tokenizer, instruction: str | bool | None = None, system: str | None = None
) -> int:
    """Number of tokens in the decoder prompt with an empty query (the fixed prompt overhead)."""
    return len(tokenizer.encode(decoder_text("", instruction, system)))
