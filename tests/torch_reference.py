"""Tiny random PyTorch `transformers` T5Gemma 2 models: the independent reference for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_hf_config(
    *,
    vocab=512,
    hidden=64,
    inter=128,
    layers=("sliding_attention", "full_attention"),
    heads=2,
    kv_heads=1,
    head_dim=32,
    window=4,
    global_factor=8.0,
    local_factor=1.0,
    eoi=501,
    softcap=None,
    max_pos=256,
):
    from transformers import T5Gemma2Config, T5Gemma2DecoderConfig, T5Gemma2EncoderConfig

    local = {"rope_type": "default", "rope_theta": 10000.0}
    if local_factor != 1.0:
        local = {"rope_type": "linear", "factor": local_factor, "rope_theta": 10000.0}
    glob = {"rope_type": "default", "rope_theta": 1000000.0}
    if global_factor != 1.0:
        glob = {"rope_type": "linear", "factor": global_factor, "rope_theta": 1000000.0}
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=window,
        layer_types=list(layers),
        max_position_embeddings=max_pos,
        final_logit_softcapping=softcap,
        attn_logit_softcapping=None,
        rope_parameters={"sliding_attention": local, "full_attention": glob},
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    enc = T5Gemma2EncoderConfig(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=eoi - 1, eoi_token_index=eoi
    )
    return T5Gemma2Config(encoder=enc, decoder=T5Gemma2DecoderConfig(**text), image_token_index=eoi + 1)


def build_tiny_hf(out_dir: Path, *, seed: int = 0, randomize_norms: bool = True, **config_kwargs):
    """Builds a random tiny T5Gemma2ForConditionalGeneration (eager attention), saves it and returns it."""
    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_hf_config(**config_kwargs)
    cfg._attn_implementation = "eager"
    model = T5Gemma2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if randomize_norms and (name.endswith("norm.weight") or "layernorm" in name):
                p.normal_(0.0, 0.3)
            if name.endswith("eoi_embedding"):
                p.normal_(0.0, 1.0)
    model.save_pretrained(out_dir)
    return model


def official_pool(states: np.ndarray, mask: np.ndarray, r: int):
    """The released `pool_encoder_chunks` formula, written independently in NumPy (float64)."""
    b, n, h = states.shape
    c = -(-n // r)
    hs = np.zeros((b, c * r, h))
    hs[:, :n] = states
    ms = np.zeros((b, c * r))
    ms[:, :n] = mask
    hs = hs.reshape(b, c, r, h)
    ms = ms.reshape(b, c, r)
    sums = (hs * ms[..., None]).sum(2)
    cnt = ms.sum(2)
    return sums / np.maximum(cnt, 1)[..., None], (cnt > 0).astype(np.int64)


def torch_forward(model, enc_ids, enc_mask, dec_ids, dec_mask, pool_ratio=None):
    """Encoder states and full decoder logits from the PyTorch model (optionally with MEP pooling)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    with torch.no_grad():
        ids = torch.tensor(enc_ids, dtype=torch.long)
        am = torch.tensor(enc_mask, dtype=torch.long)
        enc = model.get_encoder()(input_ids=ids, attention_mask=am).last_hidden_state
        states, mask = enc, am
        if pool_ratio is not None:
            p, pm = official_pool(enc.double().numpy(), enc_mask, pool_ratio)
            states = torch.tensor(p, dtype=enc.dtype)
            mask = torch.tensor(pm, dtype=torch.long)
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=mask,
            decoder_input_ids=torch.tensor(dec_ids, dtype=torch.long),
            decoder_attention_mask=torch.tensor(dec_mask, dtype=torch.long),
        )
    return enc.float().numpy(), out.logits.float().numpy()
