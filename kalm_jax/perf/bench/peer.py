"""The PyTorch peer: `transformers`' T5Gemma2ForConditionalGeneration (bf16, sdpa) doing the released
KaLM-Reranker pipeline (encoder → MEP pool → `model(encoder_outputs=pooled)` → yes/no logits at the last
real decoder position) with random weights of the same preset, on the same device, in the same run.

It mirrors the released code: the decoder call computes full-vocabulary logits for every decoder position
and the margin is read from them (`use_cache=False`, so no KV cache is built for a single forward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from kalm_jax.model.config import ModelConfig, get_preset
from kalm_jax.perf import flops
from kalm_jax.perf.bench.timing import time_host


def availability(on_cpu: bool) -> tuple[str | None, str | None]:
    """(torch device, None) when the peer can run, else (None, the reason it is skipped)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as err:
        return None, f"torch/transformers not importable ({err})"
    if torch.cuda.is_available():
        return "cuda", None
    if on_cpu:
        return "cpu", None
    return None, "no CUDA device for the PyTorch peer (pass --peer_on_cpu to run it on CPU at small shapes)"


@dataclasses.dataclass
class Peer:
    name: str
    cfg: ModelConfig
    model: Any
    device: str
    torch_dtype: Any


def build(name: str, device: str, dtype: str = "bfloat16", seed: int = 0) -> Peer:
    """A random-weight HF T5Gemma 2 of preset `name`, built directly on `device` in `dtype` with sdpa."""
    import torch
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration

    cfg = get_preset(name)
    torch_dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[
        dtype
    ]
    hf_cfg = T5Gemma2Config.from_dict(cfg.to_hf())
    torch.manual_seed(seed)
    with torch.device(device):
        model = T5Gemma2ForConditionalGeneration._from_config(hf_cfg, dtype=torch_dtype, attn_implementation="sdpa")
    return Peer(name, cfg, model.eval(), device, torch_dtype)


def pool(states, mask, r: int):
    """The released `pool_encoder_chunks` in torch: mask-aware means of consecutive r-token windows."""
    import torch

    b, n, d = states.shape
    c = -(-n // r)
    pad = c * r - n
    if pad:
        states = torch.nn.functional.pad(states, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    m = mask.view(b, c, r).to(states.dtype)
    sums = (states.view(b, c, r, d) * m[..., None]).sum(2)
    counts = m.sum(2)
    return sums / counts.clamp(min=1)[..., None], (counts > 0).long()


def encode_fn(peer: Peer, r: int) -> Callable:
    import torch

    encoder = peer.model.get_encoder()

    @torch.inference_mode()
    def run(ids, mask):
        states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return pool(states, mask, r)

    return run


def score_fn(peer: Peer, yes_id: int, no_id: int) -> Callable:
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    @torch.inference_mode()
    def run(dec_ids, dec_mask, states, pmask):
        logits = peer.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=pmask,
            decoder_input_ids=dec_ids,
            decoder_attention_mask=dec_mask,
            use_cache=False,
        ).logits
        last = dec_mask.sum(1) - 1
        z = logits[torch.arange(logits.shape[0], device=logits.device), last][:, [yes_id, no_id]].float()
        return z[:, 0] - z[:, 1]

    return run


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _is_oom(err: Exception) -> bool:
    return "out of memory" in str(err).lower()


def _peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _halving(batch: int, device: str, run: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    import torch

    while True:
        try:
            return run(batch)
        except torch.OutOfMemoryError as err:
            if batch == 1:
                return {"batch": 0, "error": f"out of memory at batch 1: {err}".splitlines()[0]}
            batch //= 2
            _reset_peak(device)
        except RuntimeError as err:
            if not _is_oom(err) or batch == 1:
                raise
            batch //= 2
            _reset_peak(device)


def encode_row(
    peer: Peer, n: int, batch: int, *, warmup: int, repeats: int, rotations: int, seed: int = 0
) -> dict[str, Any]:
    """The peer's passage encoding (+ pool at r = 1): tokens/s."""
    import torch

    rng = np.random.default_rng(seed + n)
    fn = encode_fn(peer, 1)

    def run(b: int) -> dict[str, Any]:
        _reset_peak(peer.device)
        inputs = [
            (
                torch.as_tensor(rng.integers(3, peer.cfg.boi_token_index, (b, n)), device=peer.device),
                torch.ones((b, n), dtype=torch.long, device=peer.device),
            )
            for _ in range(rotations)
        ]
        t = time_host(fn, inputs, _sync(peer.device), warmup=warmup, repeats=repeats)
        return {
            "batch": b,
            "tokens_per_s": b * n / t.median_s,
            "median_s": t.median_s,
            "flops_per_s": flops.encoder_flops(peer.cfg, n) * b / t.median_s,
            "peak_bytes": _peak(peer.device),
        }

    return {"op": "encode", "n": n, "r": 1, **_halving(batch, peer.device, run)}


def score_row(
    peer: Peer, n: int, r: int, batch: int, prompt_len: int, *, warmup: int, repeats: int, rotations: int, seed: int = 0
) -> dict[str, Any]:
    """The peer's scoring of cached pooled states (released path, full logits): pairs/s."""
    import torch

    rng = np.random.default_rng(seed + 7 * n + r)
    c = flops.cached_states(n, r)
    fn = score_fn(peer, int(rng.integers(3, 1000)), int(rng.integers(1000, 2000)))

    def run(b: int) -> dict[str, Any]:
        _reset_peak(peer.device)
        inputs = []
        for _ in range(rotations):
            states = torch.as_tensor(
                rng.standard_normal((b, c, peer.cfg.hidden_size), dtype=np.float32), device=peer.device
            ).to(peer.torch_dtype)
            inputs.append(
                (
                    torch.as_tensor(rng.integers(3, peer.cfg.boi_token_index, (b, prompt_len)), device=peer.device),
                    torch.ones((b, prompt_len), dtype=torch.long, device=peer.device),
                    states,
                    torch.ones((b, c), dtype=torch.long, device=peer.device),
                )
            )
        t = time_host(fn, inputs, _sync(peer.device), warmup=warmup, repeats=repeats)
        return {
            "batch": b,
            "pairs_per_s": b / t.median_s,
            "median_s": t.median_s,
            "flops_per_s": flops.decoder_flops(peer.cfg, prompt_len, c) * b / t.median_s,
            "peak_bytes": _peak(peer.device),
        }

    return {"op": "score", "n": n, "r": r, **_halving(batch, peer.device, run)}


def release(peer: Peer) -> None:
    """Frees the peer's device memory before JAX runs."""
    import gc

    import torch

    peer.model = None
    gc.collect()
    if peer.device == "cuda":
        torch.cuda.empty_cache()


__all__ = ["availability", "build", "pool", "encode_fn", "score_fn", "encode_row", "score_row", "release"]
