"""Score (query, passage) pairs with an exported KaLM-Reranker / kalm-jax checkpoint in plain PyTorch.

Needs only torch + transformers (+ sentencepiece when the checkpoint ships `tokenizer.model`); it does not
import kalm_jax. It follows the released KaLM code path:

    passages --"<Document>: {text}"--> encoder --> MEP pooling (mean of r-token windows)
    query    --chat prompt-->  model(encoder_outputs=pooled, attention_mask=pooled_mask, decoder_input_ids=...)
    margin = logit("yes") - logit("no") at the last real prompt token;  P(yes) = sigmoid(margin)

Passage states are computed once (`encode_passages`) and can be reused for every query.

    python examples/pytorch_score.py EXPORTED_DIR --query "what is ..." --passage "..." --passage "..." [--ratio 4]
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM
from transformers.modeling_outputs import BaseModelOutput

SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
INSTRUCTION = "Given a query, retrieve documents that answer the query."
SPECIAL = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>")


def document_text(doc: str) -> str:
    return f"<Document>: {doc}"


def decoder_text(query: str, instruction: str = INSTRUCTION, system: str = SYSTEM) -> str:
    return (
        "<bos><start_of_turn>user\n"
        f"{system}\n\n<Instruct>: {instruction}\n<Query>: {query}<end_of_turn>\n"
        "<start_of_turn>model\n\n\n\n"
    )


class PromptTokenizer:
    """Token ids without added special tokens; literal special-token strings become their single ids.

    Uses `tokenizer.model` (SentencePiece) when the checkpoint has one, else the HF tokenizer files.
    """

    def __init__(self, model_dir: str | Path):
        spm_file = Path(model_dir) / "tokenizer.model"
        if spm_file.is_file():
            import sentencepiece

            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
            self.hf = None
            self.pad_id = self.sp.piece_to_id("<pad>")
        else:
            from transformers import AutoTokenizer

            self.sp = None
            self.hf = AutoTokenizer.from_pretrained(model_dir)
            self.pad_id = self.hf.pad_token_id
        self.yes_id, self.no_id = self._single("yes"), self._single("no")

    def _single(self, word: str) -> int:
        ids = self.encode(word)
        if len(ids) != 1:
            raise ValueError(f"{word!r} is not a single token in this tokenizer: {ids}")
        return ids[0]

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=False)
        ids: list[int] = []
        for part in re.split("(" + "|".join(map(re.escape, SPECIAL)) + ")", text):
            if part in SPECIAL:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def batch(self, texts: list[str], max_length: int | None = None, multiple: int | None = None):
        """Right-padded (ids [B, L] long, mask [B, L] long)."""
        seqs = [self.encode(t)[:max_length] for t in texts]
        width = max(len(s) for s in seqs)
        if multiple:
            width = -(-width // multiple) * multiple
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids, mask


def pool_encoder_chunks(hidden: torch.Tensor, mask: torch.Tensor, ratio: int):
    """MEP: mask-aware mean of consecutive `ratio`-token windows (aligned at 0; sums in fp32).

    hidden [B, N, H], mask [B, N] -> pooled [B, ceil(N/r), H] (hidden's dtype), pooled_mask [B, ceil(N/r)].
    """
    b, n, h = hidden.shape
    c = math.ceil(n / ratio)
    pad = c * ratio - n
    hs = torch.nn.functional.pad(hidden.float(), (0, 0, 0, pad)).view(b, c, ratio, h)
    ms = torch.nn.functional.pad(mask.float(), (0, pad)).view(b, c, ratio)
    counts = ms.sum(2)
    pooled = (hs * ms[..., None]).sum(2) / counts.clamp(min=1)[..., None]
    return pooled.to(hidden.dtype), (counts > 0).long()


@torch.no_grad()
def encode_passages(model, tok: PromptTokenizer, passages: list[str], ratio: int = 4, max_length: int = 1024):
    """Encoder + MEP once per passage: (pooled [P, C, H], pooled_mask [P, C]) to cache and reuse."""
    ids, mask = tok.batch([document_text(p) for p in passages], max_length=max_length)
    states = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return pool_encoder_chunks(states, mask, ratio)


@torch.no_grad()
def score(model, tok: PromptTokenizer, query_ids, query_mask, pooled, pooled_mask) -> torch.Tensor:
    """FBNL margins [B] (fp32) for B (prompt, pooled passage) pairs, as the released code computes them."""
    out = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=pooled),
        attention_mask=pooled_mask,
        decoder_input_ids=query_ids,
        decoder_attention_mask=query_mask,
    )
    last = query_mask.sum(1) - 1
    logits = out.logits[torch.arange(len(last)), last].float()
    return logits[:, tok.yes_id] - logits[:, tok.no_id]


def rerank(
    model_dir: str,
    query: str,
    passages: list[str],
    ratio: int = 4,
    instruction: str = INSTRUCTION,
    dtype: torch.dtype = torch.float32,
    max_length: int = 1024,
):
    """Margins and P(yes) of `passages` (cut to `max_length` tokens) for `query`."""
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = PromptTokenizer(model_dir)
    pooled, pooled_mask = encode_passages(model, tok, passages, ratio, max_length)
    q_ids, q_mask = tok.batch([decoder_text(query, instruction)] * len(passages), multiple=8)
    margins = score(model, tok, q_ids, q_mask, pooled, pooled_mask)
    return margins, torch.sigmoid(margins)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--query", required=True)
    p.add_argument("--passage", action="append", required=True)
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--instruction", default=INSTRUCTION)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-length", type=int, default=1024, help="passage token limit")
    a = p.parse_args()
    margins, probs = rerank(
        a.model_dir, a.query, a.passage, a.ratio, a.instruction, getattr(torch, a.dtype), a.max_length
    )
    for m, pr, text in sorted(zip(margins.tolist(), probs.tolist(), a.passage), reverse=True):
        print(f"{m:+9.4f}  P(yes)={pr:.6f}  {text[:80]}")


if __name__ == "__main__":
    main()
