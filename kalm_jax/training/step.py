"""The sharded, jitted train step (multi-ratio MEP loss) and the abstract state/batch for AOT compilation.

    ts = make_train_step(model_cfg, train_cfg, mesh, yes_id=tok.yes_id, no_id=tok.no_id)
    state = ts.init_state(model)                 # placed by the sharding rules
    state, metrics = ts.fn(state, batch)         # donates `state`
    ts.lower().compile()                         # AOT: ts.fn.lower(ts.abstract_state, ts.abstract_batch)

One step: the encoder runs once over the batch's deduplicated passages `enc_ids [B*G, S]`; its states are
pooled at every ratio of `mep.ratios`; the pooled passages are gathered per (query, passage) pair by
`passage_index [B, G]` and the decoder scores all B*G pairs, `mep.ratios_per_pass` ratios per decoder
pass (`pair_scores`); the weighted losses of all ratios are summed. Metrics: total loss, loss per ratio
(`loss/r{r}`), each loss term averaged over ratios, group accuracy, gradient norm, learning rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kalm_jax.data.batch import STEP_KEYS, batch_shapes
from kalm_jax.model import head, mep
from kalm_jax.model.build import build_model
from kalm_jax.model.config import ModelConfig
from kalm_jax.model.options import ModelOptions
from kalm_jax.model.t5gemma2 import T5Gemma2, param_tree
from kalm_jax.parallel import mesh as sharding
from kalm_jax.training import losses, optim
from kalm_jax.training.config import ratio_weights
from kalm_jax.training.state import merge_params, model_kwargs, split_params, trainable_predicate

# Batch entries the step consumes (the pipeline's `example_id` is host-side only).


def batch_structs(batch_size: int, group_size: int, passage_len: int, decoder_len: int) -> dict[str, tuple]:
    """(shape, dtype) of each step input (`kalm_jax.data.batch.STEP_KEYS`) for a global batch of `batch_size`
    queries."""
    shapes = batch_shapes(batch_size, group_size, passage_len, decoder_len)
    return {k: shapes[k] for k in STEP_KEYS}


@dataclasses.dataclass
class TrainStep:
    """A compiled-on-first-call train step and everything needed to feed, lower or checkpoint it.

    Attributes:
      fn: jitted `(state, batch) -> (state, metrics)` with explicit in/out shardings; donates `state`.
      abstract_state: the state as `jax.ShapeDtypeStruct`s carrying their shardings.
      abstract_batch: the batch as `jax.ShapeDtypeStruct`s carrying their shardings.
      state_shardings / batch_shardings: NamedSharding trees of the same structures.
      param_axes: logical axis names of every parameter (pure-dict layout).
      graphdef: the model's NNX graph definition (merge with `state["params"]` to get the model).
      tx: the optax optimiser (over the trainable subset).
      trainable: path predicate selecting the trainable parameters.
      mesh, rules: the mesh and the logical -> mesh rules.
      grad_fn: jitted `(state, batch) -> (loss, metrics, grads)` (grads of the trainable subset, sharded
        like it); the step's forward/backward without the update, for checks and debugging.
      passage_shards: blocks the per-pair gather is split into (`gather_rows`; 1 unless
        `shard_local_passages`).
    """

    fn: Callable
    abstract_state: dict
    abstract_batch: dict
    state_shardings: dict
    batch_shardings: dict
    param_axes: dict
    graphdef: Any
    tx: optax.GradientTransformation
    trainable: Callable[[tuple[str, ...]], bool]
    mesh: Mesh
    rules: dict
    grad_fn: Callable | None = None
    passage_shards: int = 1

    def lower(self):
        """`fn.lower(abstract_state, abstract_batch)` (call `.compile()` on the result)."""
        return self.fn.lower(self.abstract_state, self.abstract_batch)

    def init_state(self, model: T5Gemma2) -> dict:
        """A fresh train state from a concrete model, placed by the sharding rules."""
        params = jax.device_put(param_tree(model), self.state_shardings["params"])
        trainable, _ = split_params(params, self.trainable)
        opt_init = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return {"step": step, "params": params, "opt_state": opt_init(trainable)}

    def model(self, state: dict) -> T5Gemma2:
        """The model holding `state["params"]` (shares the arrays)."""
        return nnx.merge(self.graphdef, state["params"])

    def place_batch(self, batch: dict) -> dict:
        """Host numpy batch (global, single process) -> sharded device arrays of the step's keys."""
        return {k: jax.device_put(np.asarray(batch[k]), self.batch_shardings[k]) for k in STEP_KEYS}


def gather_rows(table: jax.Array, index: jax.Array, shards: int = 1) -> jax.Array:
    """`table[index]` along axis 0: table [R, ...], index [N] int -> [N, ...].

    With `shards` > 1 the rows and the indices split into `shards` equal blocks (the batch shards) and
    every index of block c must point into block c of `table` (the pipeline's per-shard deduplication):
    the gather is then batched over the blocks, so a batch-sharded table is never all-gathered. An index
    outside its block reads NaN (floats) / the dtype's fill value.
    """
    if shards == 1:
        return jnp.take(table, index, axis=0)
    rows = table.shape[0] // shards
    blocks = table.reshape(shards, rows, *table.shape[1:])
    local = index.reshape(shards, -1) - (jnp.arange(shards, dtype=index.dtype) * rows)[:, None]
    out = jax.vmap(lambda t, i: jnp.take(t, i, axis=0, mode="fill"))(blocks, local)
    return out.reshape(index.shape[0], *table.shape[1:])


def pair_scores(
    model: T5Gemma2,
    batch: dict,
    ratios: tuple[int, ...],
    yes_id: int,
    no_id: int,
    *,
    full_vocab: bool,
    constrain: Callable[[jax.Array], jax.Array],
    enc_states: jax.Array,
    dec_embedded: jax.Array,
    passage_shards: int = 1,
):
    """Margins [R, B, G] fp32 at each of the R MEP `ratios`, and (with `full_vocab`) log p(yes), log p(no)
    [R, B, G], from one decoder pass over all B·G·R (pair, ratio) rows.

    Each pair's passage is pooled at every ratio and packed (`mep.pool_packed`); the decoder rows are
    ordered pair-major (row = pair·R + ratio), so the batch sharding of the pairs carries over without
    moving data. The passage keys/values are projected from the packed windows and unpacked, padded with
    masked windows to the longest ratio's count (they get exactly zero attention: the margins equal R
    separate passes). Several ratios in one pass read and all-gather the decoder's weights once per layer
    instead of once per ratio, at the price of larger activations per pass (`mep.ratios_per_pass`;
    docs/tpu.md, "Train step", has the compiler's figures for both).
    enc_states [B*G, S, H] are the encoder states of the batch's unique passages; dec_embedded [B, T, H] =
    `model.embed(batch["dec_ids"])`, computed once per step: every (pair, ratio) row of a query repeats its
    prompt, so the embedding's gradient is one scatter of B x T rows instead of one per pass of B·G·R x T
    (each scatter fills a zero vocab-shard-sized buffer). `passage_shards`: see `gather_rows` (1:
    `passage_index` may point anywhere in the batch).
    """
    b, g = batch["passage_index"].shape
    n_r = len(ratios)
    idx = batch["passage_index"].reshape(-1)
    pooled, pmask, layout = mep.pool_packed(enc_states, batch["enc_mask"], ratios)
    p_states = constrain(gather_rows(pooled, idx, passage_shards))
    p_mask = gather_rows(pmask, idx, passage_shards)
    dec_ids = jnp.repeat(batch["dec_ids"], g * n_r, axis=0)
    dec_mask = jnp.repeat(batch["dec_mask"], g * n_r, axis=0)
    last = jnp.maximum(jnp.sum(dec_mask, axis=1) - 1, 0)
    h = constrain(
        model.decode(dec_ids, dec_mask, p_states, p_mask, layout, embedded=jnp.repeat(dec_embedded, g * n_r, axis=0))
    )
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    table = model.embedding.get_value()
    cap = model.config.final_logit_softcapping
    yn = head.yes_no_logits(h_last, table, yes_id, no_id, dtype=model.dtype, cap=cap)  # [B*G*R, 2]

    def per_ratio(x):  # [B*G*R] -> [R, B, G]
        return jnp.moveaxis(x.reshape(b, g, n_r), -1, 0)

    margins = per_ratio(yn[:, 0] - yn[:, 1])
    if not full_vocab:
        return margins, None
    logits = head.softcap(
        jnp.einsum("bh,vh->bv", h_last, table.astype(model.dtype), preferred_element_type=jnp.float32), cap
    )
    lse = jax.nn.logsumexp(logits, axis=-1)
    return margins, (per_ratio(yn[:, 0] - lse), per_ratio(yn[:, 1] - lse))


def loss_terms(margins, logps, batch, loss_cfg) -> dict[str, jax.Array]:
    """Every loss term with a non-zero weight, for one ratio."""
    terms = {}
    if float(loss_cfg.pointwise):
        terms["pointwise"] = losses.pointwise_nll(margins, batch["labels"])
    if float(loss_cfg.full_vocab):
        terms["full_vocab"] = losses.full_vocab_nll(logps[0], logps[1], batch["labels"])
    if float(loss_cfg.distill):
        t = losses.teacher_probability(batch["teacher"], str(loss_cfg.teacher_format))
        terms["distill"] = losses.distill_bce(margins, t, batch["teacher_mask"])
    if float(loss_cfg.listwise):
        terms["listwise"] = losses.listwise_ce(margins, batch["labels"], float(loss_cfg.listwise_temperature))
    return terms


def make_train_step(
    model_cfg: ModelConfig,
    train_cfg: Any,
    mesh: Mesh,
    *,
    yes_id: int,
    no_id: int,
    decoder_length: int | None = None,
    donate: bool = True,
    shard_local_passages: bool = False,
    options: ModelOptions | None = None,
) -> TrainStep:
    """Builds the sharded train step for `model_cfg` under `train_cfg` (see `training/config.py`).

    Args:
      model_cfg: the model shape (a preset or the `ModelConfig` of the checkpoint being fine-tuned).
      train_cfg: the training ConfigDict (sections model, lora, data, mep, loss, optimizer,
        logical_axis_rules; `total_steps` for the schedule).
      mesh: a Mesh with axes ("data", "fsdp", "tensor") (`sharding.make_mesh`).
      yes_id, no_id: token ids of "yes" and "no".
      decoder_length: T of the decoder prompts; default `train_cfg.data.decoder_length` (must be > 0).
      donate: donate the input state buffers.
      shard_local_passages: the batch's `passage_index` points, for every batch shard, into that shard's
        own rows of `enc_ids` (the pipeline with `batch_shards` = the local batch shards, as training
        feeds it): the per-pair gather then stays on each shard (`gather_rows`) instead of all-gathering
        the pooled passages. False: indices may point anywhere in the global batch.
      options: the model's run-time switches (attention kernel, scan unroll; `ModelOptions`), default
        `ModelOptions()`; remat and remat_policy always come from `train_cfg.model` (`state.model_options`).
    Raises:
      ValueError: before any compilation, if the global batch does not split over the batch shards or
        the decoder length is unknown.
    """
    rules = sharding.rules_dict(train_cfg.logical_axis_rules)
    b, g = int(train_cfg.data.batch_size), int(train_cfg.data.group_size)
    sharding.check_batch(b, mesh, rules)
    t = int(decoder_length or train_cfg.data.decoder_length or 0)
    if t <= 0:
        raise ValueError("decoder length unknown: pass decoder_length= or set data.decoder_length > 0")
    s = int(train_cfg.data.max_document_tokens)
    for name, tok in (("yes_id", yes_id), ("no_id", no_id)):
        if not 0 <= int(tok) < model_cfg.vocab_size:
            raise ValueError(f"{name}={tok} is outside the model vocabulary [0, {model_cfg.vocab_size})")
    yes_id, no_id = int(yes_id), int(no_id)
    ratios = ratio_weights(train_cfg)
    per_pass = int(train_cfg.mep.ratios_per_pass) or len(ratios)
    passes = [ratios[i : i + per_pass] for i in range(0, len(ratios), per_pass)]  # decoder passes
    loss_cfg = train_cfg.loss
    full_vocab = bool(float(loss_cfg.full_vocab))
    weights = {k: float(loss_cfg[k]) for k in losses.LOSS_NAMES}
    accum = max(1, int(train_cfg.optimizer.grad_accum_steps))

    abstract = build_model(model_cfg, abstract=True, **model_kwargs(train_cfg, options=options))
    graphdef, abs_state = nnx.split(abstract)
    abs_params = nnx.to_pure_dict(abs_state)
    param_axes = sharding.logical_axes(abs_state)
    param_shardings = sharding.tree_shardings(abs_params, param_axes, mesh, rules)
    trainable = trainable_predicate(bool(train_cfg.lora.enabled))
    abs_trainable, _ = split_params(abs_params, trainable)
    if not jax.tree.leaves(abs_trainable):
        raise ValueError("no trainable parameters (LoRA enabled with no targets/stacks?)")
    trainable_shardings, _ = split_params(param_shardings, trainable)

    tx = optim.make_optimizer(train_cfg.optimizer, int(train_cfg.total_steps))
    sched = optim.schedule(train_cfg.optimizer, int(train_cfg.total_steps))
    replicated = NamedSharding(mesh, P())
    abs_opt = jax.eval_shape(tx.init, abs_trainable)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, sh: sh, abs_opt, trainable_shardings, transform_non_params=lambda _: replicated
    )
    state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
    abs_state_tree = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abs_params, "opt_state": abs_opt}
    abstract_state = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abs_state_tree, state_shardings
    )

    structs = batch_structs(b, g, s, t)
    batch_shardings = {
        k: NamedSharding(mesh, sharding.batch_spec(len(shape), mesh, rules)) for k, (shape, _) in structs.items()
    }
    abstract_batch = {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_shardings[k]) for k, (shape, dt) in structs.items()
    }
    act_sharding = NamedSharding(mesh, P(rules.get(sharding.BATCH), None, None))
    passage_shards = b // batch_shardings["passage_index"].shard_shape((b, g))[0] if shard_local_passages else 1

    def constrain(x):
        return jax.lax.with_sharding_constraint(x, act_sharding)

    def loss_fn(train_params, frozen_params, batch):
        model = nnx.merge(graphdef, merge_params(train_params, frozen_params))
        enc_states = constrain(model.encode(batch["enc_ids"], batch["enc_mask"]))
        dec_embedded = model.embed(jnp.asarray(batch["dec_ids"], jnp.int32))
        total = jnp.zeros((), jnp.float32)
        metrics: dict[str, jax.Array] = {}
        term_sums: dict[str, jax.Array] = {}
        wsum = sum(w for _, w in ratios)
        scored = []  # (ratio, weight, margins [B, G], logps or None)
        for group in passes:
            m, lp = pair_scores(
                model,
                batch,
                tuple(r for r, _ in group),
                yes_id,
                no_id,
                full_vocab=full_vocab,
                constrain=constrain,
                enc_states=enc_states,
                dec_embedded=dec_embedded,
                passage_shards=passage_shards,
            )
            scored += [(r, w, m[k], None if lp is None else (lp[0][k], lp[1][k])) for k, (r, w) in enumerate(group)]
        for r, w, margins, logps in scored:
            terms = loss_terms(margins, logps, batch, loss_cfg)
            loss_r = losses.combine(terms, weights)
            metrics[f"loss/r{r}"] = loss_r
            metrics[f"accuracy/r{r}"] = jnp.mean((jnp.argmax(margins, axis=-1) == 0).astype(jnp.float32))
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + w * v / wsum
            total = total + w * loss_r
        metrics.update({f"loss_{k}": v for k, v in term_sums.items()})
        return total, metrics

    def step_fn(state, batch):
        train_params, frozen_params = split_params(state["params"], trainable)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_params, frozen_params, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], train_params)
        new_train = optax.apply_updates(train_params, updates)
        new_state = {
            "step": state["step"] + 1,
            "params": merge_params(new_train, frozen_params),
            "opt_state": opt_state,
        }
        metrics.update(
            loss=loss, grad_norm=optax.global_norm(grads), lr=sched(state["step"] // accum).astype(jnp.float32)
        )
        return new_state, metrics

    def grad_only(state, batch):
        train_params, frozen_params = split_params(state["params"], trainable)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_params, frozen_params, batch)
        return loss, metrics, grads

    grad_fn = jax.jit(
        grad_only,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(replicated, replicated, trainable_shardings),
    )
    fn = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
    )
    return TrainStep(
        fn=fn,
        abstract_state=abstract_state,
        abstract_batch=abstract_batch,
        state_shardings=state_shardings,
        batch_shardings=batch_shardings,
        param_axes=param_axes,
        graphdef=graphdef,
        tx=tx,
        trainable=trainable,
        mesh=mesh,
        rules=rules,
        grad_fn=grad_fn,
        passage_shards=passage_shards,
    )


__all__ = [
    "make_train_step",
    "TrainStep",
    "batch_structs",
    "gather_rows",
    "pair_scores",
    "loss_terms",
]
