"""The T5Gemma 2 encoder-decoder as a Flax NNX module, with KaLM's FBNL scoring head.

Layers of a stack are stored stacked (leading `layers` axis) and run with `jax.lax.scan`, so compile time
does not grow with depth. Every parameter carries logical axis names (`vocab`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `layers`, `lora_rank`) for the sharding rules of the training config.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from kalm_jax.model import head, layers
from kalm_jax.model.attention import masks
from kalm_jax.model.config import FULL, SLIDING, ModelConfig, embed_scale, parse_dtype
from kalm_jax.model.options import ModelOptions

# name -> (logical axes without the leading `layers`, number of leading input axes for LoRA)
STACK_PARAMS: dict[str, tuple[tuple[str, ...], int]] = {
    "q": (("embed", "heads", "head_dim"), 1),
    "k": (("embed", "kv_heads", "head_dim"), 1),
    "v": (("embed", "kv_heads", "head_dim"), 1),
    "o": (("heads", "head_dim", "embed"), 2),
    "q_norm": (("head_dim",), 0),
    "k_norm": (("head_dim",), 0),
    "pre_attn_norm": (("embed",), 0),
    "post_attn_norm": (("embed",), 0),
    "pre_ffw_norm": (("embed",), 0),
    "post_ffw_norm": (("embed",), 0),
    "gate": (("embed", "mlp"), 1),
    "up": (("embed", "mlp"), 1),
    "down": (("mlp", "embed"), 1),
}
LORA_TARGETS_DEFAULT = ("q", "k", "v", "o")


def _param(value, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def stack_param_shapes(cfg: ModelConfig, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked parameters of one stack (leading axis = layers)."""
    h, n, k, d, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    sizes = {"embed": h, "heads": n, "kv_heads": k, "head_dim": d, "mlp": i}
    return {name: (num_layers, *(sizes[a] for a in axes)) for name, (axes, _) in STACK_PARAMS.items()}


class LoRAParam(nnx.LoRAParam):
    """LoRA adapter factor (the only trainable parameters in LoRA fine-tuning)."""


class LayerStack(nnx.Module):
    """`num_layers` Gemma 3 sandwich layers with stacked parameters and optional LoRA adapters."""

    def __init__(self, cfg: ModelConfig, layer_types: tuple[str, ...], *, param_dtype, rngs: nnx.Rngs):
        self.layer_types = tuple(layer_types)
        self.lora_targets: tuple[str, ...] = ()
        self.lora_scale = 0.0
        init = nnx.initializers.normal(stddev=0.02)
        for name, shape in stack_param_shapes(cfg, len(layer_types)).items():
            axes = ("layers", *STACK_PARAMS[name][0])
            value = jnp.zeros(shape, param_dtype) if name.endswith("norm") else init(rngs.params(), shape, param_dtype)
            setattr(self, name, _param(value, axes))

    @property
    def is_sliding(self) -> np.ndarray:
        return np.asarray([t == SLIDING for t in self.layer_types])

    def add_lora(self, rank: int, alpha: float, targets: tuple[str, ...], *, rngs: nnx.Rngs, dtype=jnp.float32) -> None:
        """Adds zero-initialised-delta LoRA factors A [L, *in, r] (normal) and B [L, r, *out] (zeros)."""
        unknown = [t for t in targets if t not in STACK_PARAMS or STACK_PARAMS[t][1] == 0]
        if unknown:
            valid = [n for n, (_, k) in STACK_PARAMS.items() if k]
            raise ValueError(f"unknown LoRA targets {unknown}; valid targets: {valid}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        quantized = [t for t in targets if isinstance(getattr(self, t).get_value(), qwix.QArray)]
        if quantized:
            raise ValueError(f"LoRA on quantized weights {quantized}: add LoRA to the float model, quantize after")
        for name in targets:
            w = getattr(self, name)
            axes, n_in = STACK_PARAMS[name]
            shape = w.get_value().shape
            in_shape, out_shape = shape[1 : 1 + n_in], shape[1 + n_in :]
            a = jax.random.normal(rngs.params(), (shape[0], *in_shape, rank), dtype) / np.sqrt(np.prod(in_shape))
            b = jnp.zeros((shape[0], rank, *out_shape), dtype)
            setattr(
                self,
                f"{name}_lora_a",
                LoRAParam(a, out_sharding=("layers", *axes[:n_in], "lora_rank"), eager_sharding=False),
            )
            setattr(
                self,
                f"{name}_lora_b",
                LoRAParam(b, out_sharding=("layers", "lora_rank", *axes[n_in:]), eager_sharding=False),
            )
        self.lora_targets = tuple(targets)
        self.lora_scale = float(alpha) / float(rank)

    def merge_lora(self) -> None:
        """Folds the adapters into the base weights and removes them."""
        for name in self.lora_targets:
            w = getattr(self, name)
            a = getattr(self, f"{name}_lora_a").get_value()
            b = getattr(self, f"{name}_lora_b").get_value()
            delta = lora_delta(a, b, w.get_value().shape, self.lora_scale)
            w.set_value((w.get_value().astype(jnp.float32) + delta).astype(w.get_value().dtype))
            delattr(self, f"{name}_lora_a")
            delattr(self, f"{name}_lora_b")
        self.lora_targets = ()
        self.lora_scale = 0.0

    def scan_inputs(self, dtype) -> dict[str, jax.Array]:
        xs = {name: getattr(self, name).get_value().astype(dtype) for name in STACK_PARAMS}
        for name in self.lora_targets:
            xs[f"{name}_lora_a"] = getattr(self, f"{name}_lora_a").get_value().astype(dtype)
            xs[f"{name}_lora_b"] = getattr(self, f"{name}_lora_b").get_value().astype(dtype)
        return xs

    def layer_weights(self, xs: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Effective per-layer weights inside the scan body (base + scale·A·B for LoRA targets)."""
        w = {name: xs[name] for name in STACK_PARAMS}
        for name in self.lora_targets:
            a, b = xs[f"{name}_lora_a"][None], xs[f"{name}_lora_b"][None]
            w[name] = w[name] + lora_delta(a, b, (1, *w[name].shape), self.lora_scale)[0].astype(w[name].dtype)
        return w


def layer_period(types: tuple) -> tuple[int, int]:
    """(p, k): the smallest period p of the layer-type sequence (types[i] == types[i % p]) and the number k of
    whole periods in it; e.g. 5 sliding + 1 full repeated over 18 layers -> (6, 3), 26 layers -> (6, 4)."""
    n = len(types)
    for p in range(1, n + 1):
        if all(types[i] == types[i % p] for i in range(n)):
            return p, n // p
    return max(n, 1), 0


def lora_delta(a: jax.Array, b: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
    """scale · A @ B reshaped to the weight shape; a [L, *in, r], b [L, r, *out]."""
    n_layers, rank = a.shape[0], a.shape[-1]
    d = jnp.einsum(
        "lir,lro->lio",
        a.reshape(n_layers, -1, rank).astype(jnp.float32),
        b.reshape(n_layers, rank, -1).astype(jnp.float32),
    )
    return (scale * d).reshape(shape)


# What the backward pass keeps of a layer's forward when `ModelOptions.remat` is on: the `checkpoint_name` tags
# (kalm_jax.model.layers) saved per policy; everything else is recomputed from the layer's input. Activations kept
# per layer and token (bf16, per chip): "qkv" (q/n_tensor + 2 kv heads) x D, "attn_out" (o) and "mlp_out"
# (down) H each (the post-norms' inputs: kept, their matmuls do not run again), "mlp_in" (gate/up:
# 2 I/n_tensor, the bulk).
_QKV = ("q_proj", "k_proj", "v_proj", "k_passage", "v_passage")
_MLP_IN = ("mlp_gate", "mlp_up")
REMAT_POLICIES: dict[str, tuple[str, ...]] = {
    "nothing": (),
    "qkv": _QKV,
    "attn_out": ("o_proj",),
    "mlp_in": _MLP_IN,
    "mlp_out": ("mlp_down",),
    "projections": _QKV + ("o_proj",) + _MLP_IN + ("mlp_down",),
}


def remat_saves(name: str) -> tuple[str, ...]:
    """The tags a policy keeps: a `REMAT_POLICIES` name or several joined by '+' (e.g. "qkv+mlp_in")."""
    parts = [p.strip() for p in str(name).split("+")]
    unknown = [p for p in parts if p not in REMAT_POLICIES]
    if unknown:
        raise ValueError(
            f"unknown remat policy {name!r}: {unknown} not in {sorted(REMAT_POLICIES)} (several may be joined by '+')"
        )
    return tuple(dict.fromkeys(t for p in parts for t in REMAT_POLICIES[p]))


STACKS = ("encoder", "decoder")


def stack_remat_policies(spec: str) -> dict[str, str]:
    """Each stack's policy of a `model.remat_policy` value: one `remat_saves` name for both stacks ("qkv"),
    or one per stack, "encoder:qkv+mlp_in,decoder:qkv" (a stack not named keeps nothing). Checks every name."""
    spec = str(spec).strip()
    if ":" not in spec:
        remat_saves(spec)
        return dict.fromkeys(STACKS, spec)
    policies = dict.fromkeys(STACKS, "nothing")
    for part in spec.split(","):
        stack, sep, name = (x.strip() for x in part.partition(":"))
        if not sep or stack not in STACKS:
            raise ValueError(f"remat policy {spec!r}: {part.strip()!r} is not 'encoder:POLICY' or 'decoder:POLICY'")
        remat_saves(name)
        policies[stack] = name
    return policies


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a `remat_saves` name."""
    saved = remat_saves(name)
    if not saved:
        return jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint_policies.save_only_these_names(*saved)


class T5Gemma2(nnx.Module):
    """T5Gemma 2 text encoder-decoder with tied embeddings and merged decoder attention.

    Args:
      config: the model hyper-parameters.
      param_dtype: storage dtype of the parameters (fp32 master weights for training; bf16 for serving).
      dtype: compute dtype (defaults to param_dtype). Norms, softmax and margins always run in fp32.
      options: the run-time switches (`ModelOptions`: attention kernel, scan unroll, remat); default
        `ModelOptions()`.

    Build it with `kalm_jax.model.build.build_model` (LoRA, abstract or concrete). `options` is a plain
    (static) attribute, so a model with other options re-traces the jitted entry points; `attention_impl`,
    `scan_unroll`, `remat` and `remat_policy` read (and, assigned, replace) the fields of `options`.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        param_dtype="float32",
        dtype=None,
        options: ModelOptions | None = None,
        rngs: nnx.Rngs,
    ):
        self.config = config
        param_dtype = parse_dtype(param_dtype)
        self.dtype = parse_dtype(dtype) if dtype is not None else param_dtype
        self.options = options if options is not None else ModelOptions()
        h = config.hidden_size
        self.embedding = _param(
            nnx.initializers.normal(stddev=1.0)(rngs.params(), (config.vocab_size, h), param_dtype), ("vocab", "embed")
        )
        self.eoi_embedding = _param(jnp.zeros((h,), param_dtype), ("embed",))
        self.encoder = LayerStack(config, config.encoder_layer_types, param_dtype=param_dtype, rngs=rngs)
        self.encoder_norm = _param(jnp.zeros((h,), param_dtype), ("embed",))
        self.decoder = LayerStack(config, config.decoder_layer_types, param_dtype=param_dtype, rngs=rngs)
        self.decoder_norm = _param(jnp.zeros((h,), param_dtype), ("embed",))

    # ------------------------------------------------------------------ options
    @property
    def attention_impl(self) -> str:
        return self.options.attention_impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        self.options = self.options.replace(attention_impl=value)

    @property
    def scan_unroll(self) -> int | bool:
        return self.options.scan_unroll

    @scan_unroll.setter
    def scan_unroll(self, value: int | bool) -> None:
        self.options = self.options.replace(scan_unroll=value)

    @property
    def remat(self) -> bool:
        return self.options.remat

    @remat.setter
    def remat(self, value: bool) -> None:
        self.options = self.options.replace(remat=bool(value))

    @property
    def remat_policy(self) -> str:
        return self.options.remat_policy

    @remat_policy.setter
    def remat_policy(self, value: str) -> None:
        self.options = self.options.replace(remat_policy=str(value))

    # ------------------------------------------------------------------ pieces
    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings × sqrt(H) (scale rounded to the compute dtype); id eoi → eoi_embedding. [B,T,H]"""
        table = self.embedding.get_value().astype(self.dtype)
        x = jnp.take(table, ids, axis=0) * embed_scale(self.config.hidden_size, self.dtype)
        eoi = self.eoi_embedding.get_value().astype(self.dtype)
        return jnp.where((ids == self.config.eoi_token_index)[..., None], eoi, x)

    def _rope(self, length: int):
        c = self.config
        local = layers.rope_table(length, c.head_dim, c.rope_local_theta, c.rope_local_factor)
        glob = layers.rope_table(length, c.head_dim, c.rope_global_theta, c.rope_global_factor)
        return local, glob

    def _run_stack(self, stack: LayerStack, x, block_fn, ropes, stop: int | None = None, sequence: str | None = None):
        """Runs the first `stop` layers of `stack` (all when None) over x [B, T, H]; `block_fn(x, w, sliding,
        cos, sin)` is the attention sub-block (it builds its own mask; `sliding` is a Python bool). `sequence`:
        the mesh axis x's tokens are split over (`layers.sequence_axis`), for the MLP sub-blocks.

        The layer types repeat with a period p (5 sliding + 1 full in the presets): the scan runs over the
        repeats with the p layers of one period unrolled in its body, so every layer's type, mask pattern and
        attention kernel are static; the layers left over after the last whole period follow unrolled.
        """
        (cos_l, sin_l), (cos_g, sin_g) = ropes
        xs_all = stack.scan_inputs(self.dtype)
        all_types = tuple(bool(t) for t in stack.is_sliding)
        stop = len(all_types) if stop is None else stop
        types = all_types[:stop]
        period, whole = layer_period(all_types)
        repeats = min(whole, stop // period)

        def one_layer(carry, w, sliding: bool):
            cos, sin = (cos_l, sin_l) if sliding else (cos_g, sin_g)
            carry = carry + block_fn(carry, w, sliding, cos, sin)
            return layers.mlp_residual(carry, w, self.config, self.options, sequence)

        def layer_fn(sliding: bool):
            def fn(carry, xs):
                return one_layer(carry, stack.layer_weights(xs), sliding)

            if self.options.remat:
                name = stack_remat_policies(self.options.remat_policy)[
                    "encoder" if stack is self.encoder else "decoder"
                ]
                fn = jax.checkpoint(fn, policy=remat_policy(name))
            return fn

        fns = {s: layer_fn(s) for s in set(types)}

        def body(carry, group):
            # The group's layers are indexed in the whole stack: a scan over a slice of it (34 = 5 x 6 + 4
            # layers in large) would copy the sliced weights, a program-long buffer as large as the stack.
            for j, sliding in enumerate(types[:period]):
                layer = jax.tree.map(
                    functools.partial(jax.lax.dynamic_index_in_dim, index=group * period + j, keepdims=False), xs_all
                )
                carry = fns[sliding](carry, layer)
            return carry, None

        if self.options.scan_unroll is True:  # fully unrolled: one static slice per layer
            repeats = 0
        if repeats:
            x, _ = jax.lax.scan(body, x, jnp.arange(repeats), unroll=self.options.scan_unroll)
        for i in range(repeats * period, stop):
            x = fns[types[i]](x, {k: v[i] for k, v in xs_all.items()})
        return x

    # ------------------------------------------------------------------ public API
    def encode(self, input_ids, attention_mask) -> jax.Array:
        """Final-norm encoder states [B, S, H] (compute dtype) of right-padded ids/mask [B, S]."""
        check_tokens(input_ids, attention_mask, self.config, "input_ids")
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = jnp.asarray(attention_mask, jnp.int32)
        c = self.config
        x = self.embed(ids)
        window = masks.encoder_window(ids.shape[1], c.sliding_window)
        sequence = layers.sequence_axis(c, self.options, *ids.shape)
        if sequence is not None:  # sequence parallelism: the residual stream holds this device's tokens
            x = layers.split_tokens(x, sequence)

        def block(h, w, sliding, cos, sin):
            m = masks.Mask(mask, window if sliding else None, queries=mask)
            return layers.self_attention_block(h, w, m, cos, sin, c, self.options, sequence)

        x = self._run_stack(self.encoder, x, block, self._rope(ids.shape[1]), sequence=sequence)
        return layers.rms_norm(x, self.encoder_norm.get_value(), c.rms_norm_eps)

    def _decoder_inputs(
        self, decoder_input_ids, decoder_attention_mask, encoder_states, encoder_mask, layout=None, embedded=None
    ):
        """Checked inputs of the decoder: (x [B,T,H] embedded, dec mask [B,T], passages [B,S,H], mask [B,S])
        (with a `mep.RatioLayout`: passages [B/R, layout.total, H] packed, mask [B/R, layout.total])."""
        check_tokens(decoder_input_ids, decoder_attention_mask, self.config, "decoder_input_ids")
        check_passages(encoder_states, encoder_mask, decoder_input_ids, self.config, layout)
        ids = jnp.asarray(decoder_input_ids, jnp.int32)
        mask = jnp.asarray(decoder_attention_mask, jnp.int32)
        enc = jnp.asarray(encoder_states)
        if enc.dtype != jnp.int8:  # int8 passages stay int8 here: each layer dequantizes them (`_decoder_block`)
            enc = enc.astype(self.dtype)
        enc_mask = jnp.asarray(encoder_mask, jnp.int32)
        if embedded is None:
            return self.embed(ids), mask, enc, enc_mask
        if tuple(embedded.shape) != ids.shape + (self.config.hidden_size,):
            raise ValueError(
                f"embedded decoder inputs have shape {tuple(embedded.shape)}; decoder_input_ids "
                f"{ids.shape} need {ids.shape + (self.config.hidden_size,)}"
            )
        return embedded.astype(self.dtype), mask, enc, enc_mask

    def _decoder_block(self, enc, dec_mask, enc_mask, query_index=None, layout=None, enc_scale=None):
        """The decoder's attention sub-block: causal self keys (sliding layers: windowed) + every passage key.

        enc_scale: [B, S] fp32 when `enc` [B, S, H] is int8 (`dequantize_passages`): each layer dequantizes the
        passages where it projects them to keys and values, so no compute-dtype copy of the whole batch's
        states is an input of the program or a value live across the layers."""
        if (enc.dtype == jnp.int8) != (enc_scale is not None):
            raise ValueError(
                f"int8 passage states need their per-window scale and only they take one; got {enc.dtype} states "
                f"and {'a' if enc_scale is not None else 'no'} scale"
            )
        c = self.config
        t = dec_mask.shape[1]
        causal, sliding_causal = masks.causal_window(t), masks.causal_window(t, c.sliding_window)
        # every passage key, the same for every query and layer
        cross = masks.Mask(enc_mask if layout is None else layout.unpack(enc_mask))

        def block(h, w, sliding, cos, sin):
            self_mask = masks.Mask(dec_mask, sliding_causal if sliding else causal, queries=dec_mask)
            return layers.merged_attention_block(
                h,
                enc if enc_scale is None else dequantize_passages(enc, enc_scale, self.dtype),
                w,
                self_mask,
                cross,
                cos,
                sin,
                c,
                self.options,
                query_index=query_index,
                cross_layout=layout,
            )

        return block

    def decode(
        self, decoder_input_ids, decoder_attention_mask, encoder_states, encoder_mask, layout=None, embedded=None
    ) -> jax.Array:
        """Final-norm decoder states [B, T, H] attending to (pooled) passage states [B, S, H] with mask [B, S].

        layout: a `mep.RatioLayout` when `encoder_states` [B/R, layout.total, H] / `encoder_mask` hold each
          passage's windows at R ratios packed (`mep.pool_packed`); decoder row i reads passage i // R at
          ratio k = i % R. The passages' keys and values are projected from the packed windows (no padding).
        embedded: `embed(decoder_input_ids)` [B, T, H] when the caller has it (the train step embeds each
          query's prompt once for all its rows: one embedding gradient instead of one per row and pass).
        """
        x, mask, enc, enc_mask = self._decoder_inputs(
            decoder_input_ids, decoder_attention_mask, encoder_states, encoder_mask, layout, embedded
        )
        block = self._decoder_block(enc, mask, enc_mask, layout=layout)
        x = self._run_stack(self.decoder, x, block, self._rope(mask.shape[1]))
        return layers.rms_norm(x, self.decoder_norm.get_value(), self.config.rms_norm_eps)

    def _decode_at(
        self,
        decoder_input_ids,
        decoder_attention_mask,
        encoder_states,
        encoder_mask,
        position: jax.Array,
        encoder_scale=None,
    ) -> jax.Array:
        """Final-norm decoder state [B, H] at `position` [B] only: every layer but the last runs all T
        positions (they are the later layers' keys); the last layer computes the one query row, its MLP
        and the final norm for that row alone. `encoder_scale`: see `score_margin`."""
        x, mask, enc, enc_mask = self._decoder_inputs(
            decoder_input_ids, decoder_attention_mask, encoder_states, encoder_mask
        )
        stack = self.decoder
        ropes = self._rope(mask.shape[1])
        x = self._run_stack(
            stack,
            x,
            self._decoder_block(enc, mask, enc_mask, enc_scale=encoder_scale),
            ropes,
            stop=len(stack.layer_types) - 1,
        )
        w = stack.layer_weights({k: v[-1] for k, v in stack.scan_inputs(self.dtype).items()})
        sliding = bool(stack.is_sliding[-1])
        cos, sin = ropes[0] if sliding else ropes[1]
        block = self._decoder_block(enc, mask, enc_mask, query_index=position, enc_scale=encoder_scale)
        x_q = jnp.take_along_axis(x, position[:, None, None], axis=1)  # [B, 1, H]
        x_q = x_q + block(x, w, sliding, cos, sin)
        x_q = layers.mlp_residual(x_q, w, self.config, self.options)
        return layers.rms_norm(x_q, self.decoder_norm.get_value(), self.config.rms_norm_eps)[:, 0]

    def decoder_logits(self, decoder_input_ids, decoder_attention_mask, encoder_states, encoder_mask) -> jax.Array:
        """Full-vocabulary logits [B, T, V] in fp32 (tied LM head). For analysis and parity, not for scoring."""
        h = self.decode(decoder_input_ids, decoder_attention_mask, encoder_states, encoder_mask)
        logits = jnp.einsum(
            "bth,vh->btv", h, self.embedding.get_value().astype(self.dtype), preferred_element_type=jnp.float32
        )
        return head.softcap(logits, self.config.final_logit_softcapping)

    def score_margin(
        self,
        decoder_input_ids,
        decoder_attention_mask,
        passage_states,
        passage_mask,
        yes_id: int,
        no_id: int,
        passage_scale=None,
    ) -> jax.Array:
        """logit(yes) − logit(no) in fp32 [B] at the last real decoder token; P(yes) = sigmoid(margin).

        Only the two LM-head rows are used (`kalm_jax.model.head.margin`): full-vocabulary logits are never built.
        passage_scale: [B, C] fp32 when `passage_states` [B, C, H] are int8 (per-window absmax values,
        `kalm_jax.inference.states.quantize_int8`): every decoder layer dequantizes them where it projects
        them (`dequantize_passages`, the same values as the host's `PassageStates.dense()` cast to the compute
        dtype).
        """
        for name, tok in (("yes_id", yes_id), ("no_id", no_id)):
            if not isinstance(tok, (jax.core.Tracer,)) and not 0 <= int(tok) < self.config.vocab_size:
                raise ValueError(f"{name}={tok} is outside the vocabulary [0, {self.config.vocab_size})")
        mask = jnp.asarray(decoder_attention_mask, jnp.int32)
        last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
        h_last = self._decode_at(
            decoder_input_ids, decoder_attention_mask, passage_states, passage_mask, last, passage_scale
        )
        return head.margin(
            h_last,
            self.embedding.get_value(),
            yes_id,
            no_id,
            dtype=jnp.float32 if self.is_quantized else self.dtype,
            cap=self.config.final_logit_softcapping,
        )

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> jax.Array:
        """Plain seq2seq forward without pooling: full logits [B, T, V]."""
        states = self.encode(input_ids, attention_mask)
        return self.decoder_logits(decoder_input_ids, decoder_attention_mask, states, attention_mask)

    # ------------------------------------------------------------------ LoRA
    def add_lora(
        self,
        rank: int = 96,
        alpha: float = 48.0,
        targets=LORA_TARGETS_DEFAULT,
        *,
        stacks=("encoder", "decoder"),
        rngs: nnx.Rngs | None = None,
    ) -> None:
        rngs = rngs or nnx.Rngs(0)
        for s in stacks:
            getattr(self, s).add_lora(rank, alpha, tuple(targets), rngs=rngs)

    def merge_lora(self) -> None:
        self.encoder.merge_lora()
        self.decoder.merge_lora()

    @property
    def has_lora(self) -> bool:
        return bool(self.encoder.lora_targets or self.decoder.lora_targets)

    @property
    def is_quantized(self) -> bool:
        """True when the stacks' projection / MLP weights are `qwix.QArray`s (`kalm_jax.model.quantization`);
        then the yes/no head runs in fp32 (the embedding rows and the final hidden state upcast)."""
        return any(
            isinstance(getattr(s, n).get_value(), qwix.QArray)
            for s in (self.encoder, self.decoder)
            for n in STACK_PARAMS
        )


def param_tree(model: T5Gemma2) -> dict:
    """The parameters (LoRA factors included) as a nested dict of arrays (or `jax.ShapeDtypeStruct`s for an
    abstract model), keyed like the module tree: {"embedding": [V, H], "encoder": {"q": [L, H, N, D], ...,
    "q_lora_a": [L, H, r], ...}, ...}. The layout of checkpoints' `params/` and of the train state's params."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def count_params(model: T5Gemma2) -> dict[str, int]:
    """Parameter counts by top-level group, from the (possibly abstract) model state."""
    state = nnx.state(model, nnx.Param)
    out: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        group = str(getattr(path[0], "key", path[0]))
        out[group] = out.get(group, 0) + int(np.prod(leaf.shape))
    return out


# ---------------------------------------------------------------------- input checks (host side only)
def _concrete(x) -> np.ndarray | None:
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_tokens(ids, mask, cfg: ModelConfig, name: str) -> None:
    ids_np, mask_np = _concrete(ids), _concrete(mask)
    if ids_np is None or mask_np is None:
        return
    if ids_np.ndim != 2:
        raise ValueError(f"{name} must be [batch, length], got shape {ids_np.shape}")
    if ids_np.shape[0] == 0 or ids_np.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {ids_np.shape}): nothing to run")
    if mask_np.shape != ids_np.shape:
        raise ValueError(f"{name} shape {ids_np.shape} and its mask shape {mask_np.shape} differ")
    if not np.issubdtype(ids_np.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids_np.dtype}")
    bad = (ids_np < 0) | (ids_np >= cfg.vocab_size)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(
            f"{name}[{r}, {c}] = {ids_np[r, c]} is outside the vocabulary [0, {cfg.vocab_size}) "
            f"({int(bad.sum())} such ids); was the tokenizer made for a larger vocabulary?"
        )
    if not np.isin(mask_np, (0, 1)).all():
        raise ValueError(f"the mask of {name} must hold only 0 and 1")
    empty = np.flatnonzero(mask_np.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"{name}: rows {empty[:10].tolist()} are all padding (mask all zero); "
            "drop them or give them at least one token"
        )


def dequantize_passages(values, scale, dtype, xp=jnp):
    """int8 passage states back to floats: values [..., C, H] int8 x scale [..., C] fp32 -> [..., C, H] `dtype`.

    The one dequantizer: ``(values as fp32 * scale) cast to dtype``, the same operations on the host
    (`xp=numpy`: `PassageStates.dense`) and inside the decoder (`xp=jax.numpy`), so both give the same values."""
    return (xp.asarray(values).astype(xp.float32) * xp.asarray(scale)[..., None]).astype(dtype)


def check_passages(states, mask, dec_ids, cfg: ModelConfig, layout=None) -> None:
    rows = 1 if layout is None else len(layout.lengths)  # decoder rows per passage row
    if layout is not None and (np.ndim(states) != 3 or np.shape(states)[1] != layout.total):
        raise ValueError(f"packed passage states must be [batch, {layout.total}, hidden], got {np.shape(states)}")
    s, m = _concrete(states), _concrete(mask)
    if s is None or m is None:
        return
    if s.ndim != 3 or s.shape[-1] != cfg.hidden_size:
        raise ValueError(f"passage states must be [batch, windows, {cfg.hidden_size}], got {s.shape}")
    if m.shape != s.shape[:2]:
        raise ValueError(f"passage mask shape {m.shape} does not match passage states {s.shape[:2]}")
    d = _concrete(dec_ids)
    if d is not None and d.shape[0] != s.shape[0] * rows:
        raise ValueError(f"decoder batch {d.shape[0]} and passage batch {s.shape[0]} x {rows} differ")
    # a packed row is empty when any of its ratios' windows is (the row of that ratio has no key)
    segments = np.split(m, np.cumsum(layout.lengths)[:-1], axis=1) if layout is not None else [m]
    empty = np.flatnonzero(np.any([seg.sum(axis=1) == 0 for seg in segments], axis=0))
    if empty.size:
        raise ValueError(f"passages {empty[:10].tolist()} are all padding (mask all zero): nothing to attend to")


__all__ = [
    "T5Gemma2",
    "LayerStack",
    "param_tree",
    "count_params",
    "dequantize_passages",
    "STACK_PARAMS",
    "FULL",
    "SLIDING",
]
