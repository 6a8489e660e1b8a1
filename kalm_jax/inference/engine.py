"""The one inference engine: weights placed once, one bucketing policy, encode and score over it.

Every client that encodes passages or scores (prompt, passage) pairs — `Reranker`, the evaluation store and
sweep, dev evaluation during training, the `label` command, the benchmark — goes through an
`InferenceEngine`. It owns:
  * weight placement: once, by the inference mesh policy (`kalm_jax.parallel.inference_policy`): replicated over a
    1-axis ``("data",)`` mesh of this process's devices (`kalm_jax.parallel.mesh.data_mesh`) when the weights and a
    batch's working set fit a device, else split over a ``tensor`` axis (no per-call all-gather of weights);
    batches are sharded over ``data``. The decision is printed (stderr) when an engine is built;
  * the bucketing policy (`Buckets`): batch rows (powers of two up to 64, then multiples of 64, rounded to
    the device count), document length (multiple of 128, then of the ratio only where needed: never for
    documents of one window), decoder prompt length (multiple of 32), passage windows (powers of two from
    16, then multiples of 256). Similar calls reuse compiled programs;
    `compiles` counts the programs this engine caused to be compiled;
  * length sorting (longest first) and padding; padding never changes a result (padded keys are masked,
    padded rows dropped);
  * out-of-memory back-off: a batch that runs out of device (or host, on CPU) memory is retried at 3/4 of
    its size;
  * host -> device transfer, and re-pooling cached states to a coarser ratio on the device (bucketed, so it
    compiles a handful of programs, not one per shape);
  * device-resident caches: `place` moves passage states to the devices once (`DeviceStates`, replicated),
    and `margins` then gathers each batch's rows on the device, so only token ids and indices travel.
The pure jitted functions themselves are in `kalm_jax.inference.programs`.

Multi-process runs build one engine per process over its local devices; work is split above it. An engine
over a given `mesh` (e.g. the training mesh, which may span every process) instead uses the weights where
they already are (their own shardings: no copy, no host gather) and runs every call as one SPMD program over
that mesh, batches split over `batch_axes`; then every process makes the same calls with the same inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from kalm_jax.checkpoints import orbax_io
from kalm_jax.inference import programs
from kalm_jax.inference.states import STORAGE, PassageStates, quantize_int8, row_indices
from kalm_jax.model import mep
from kalm_jax.model import quantization as quantize
from kalm_jax.model.attention import dispatch
from kalm_jax.model.t5gemma2 import T5Gemma2, check_passages, check_tokens, dequantize_passages
from kalm_jax.parallel import inference_policy
from kalm_jax.text import prompts
from kalm_jax.text.hf_json import AnyTokenizer, check_vocab

DEFAULT_BATCH_SIZE = 32
PROGRESS_MIN_ITEMS = 256
"""With ``show_progress=None`` a progress bar appears for work of at least this many items."""
DEFAULT_MAX_PROMPT_TOKENS = 2048
"""Budget for a whole decoder prompt (system + instruction + query + template)."""
DEVICE_STATES = ("compute", "int8")
"""How passage states travel to and stay on the devices (`InferenceEngine(device_states=...)`): "compute", in the
compute dtype (dequantized on the host); "int8", int8 values + an fp32 scale per window, dequantized inside the
score program by each decoder layer."""


def check_device_states(value: str) -> str:
    """`value` if it is one of `DEVICE_STATES`; ValueError naming the choices otherwise."""
    if value not in DEVICE_STATES:
        raise ValueError(f"device_states must be one of {', '.join(DEVICE_STATES)}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shape-bucketing policy (all sizes are multiples; see the module docstring)."""

    length: int = 128
    windows: int = 16
    decoder: int = 32

    @staticmethod
    def rows(n: int, devices: int) -> int:
        return programs.bucket(programs.batch_bucket(n), devices)

    def document_length(self, longest: int, ratio: int) -> int:
        """Padded encoder length: a multiple of `length`, rounded up to a multiple of `ratio` only when the
        ratio does not divide it (ratio 31 pads 200 tokens to 279, not to lcm(128, 31) = 3968) and the
        longest document is longer than one window: documents of at most `ratio` tokens pool to one state
        whatever the padding (3 tokens at ratio 10**6 pad to 128, not to 10**6)."""
        width = programs.bucket(longest, self.length)
        return width if longest <= ratio else programs.bucket(width, ratio)

    def window_count(self, windows: int) -> int:
        """Padded passage windows: a power of two (at least `windows`) up to 256, then multiples of 256."""
        if windows <= 256:
            return max(self.windows, 1 << max(0, (windows - 1).bit_length()))
        return programs.bucket(windows, 256)

    def decoder_length(self, longest: int) -> int:
        return programs.bucket(longest, self.decoder)


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceStates:
    """A passage-state cache resident on one engine's devices (made by `InferenceEngine.place`).

    states: jax.Array [N, C, H] in the engine's compute dtype, or int8 (an engine with ``device_states="int8"``),
      replicated over the engine's data mesh (each device holds the whole cache); C is the engine's window
      bucket of the longest row, windows past a row's end are zero and masked.
    mask: jax.Array [N, C] int32, 1 where a window holds at least one token.
    windows: numpy int64 [N] on the host: windows each row spans at `ratio` (for length sorting and for each
      batch's window bucket, without reading the device).
    ratio: the MEP ratio the states are pooled at. ids / meta: those of the `PassageStates` placed.
    scale: jax.Array [N, C] float32 with int8 `states` (per-window absmax scale, `states.quantize_int8`), else None.
    """

    states: jax.Array
    mask: jax.Array
    windows: np.ndarray
    ratio: int
    ids: list[str] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    scale: jax.Array | None = None

    def __post_init__(self):
        if (
            self.states.ndim != 3
            or tuple(self.mask.shape) != tuple(self.states.shape[:2])
            or np.shape(self.windows) != tuple(self.states.shape[:1])
        ):
            raise ValueError(
                f"inconsistent device states: states {self.states.shape}, mask {self.mask.shape}, "
                f"windows {self.windows.shape}"
            )
        if (self.states.dtype == jnp.int8) != (self.scale is not None) or (
            self.scale is not None and tuple(self.scale.shape) != tuple(self.mask.shape)
        ):
            raise ValueError(
                f"device states of dtype {self.states.dtype} need a scale [N, C] exactly when they are int8, got "
                f"{None if self.scale is None else tuple(self.scale.shape)}"
            )

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of one replica (states + mask + int8 states' scale); every device of the engine holds one."""
        return int(self.states.nbytes + self.mask.nbytes + (0 if self.scale is None else self.scale.nbytes))


def _window_extent(mask) -> np.ndarray:
    """int64 [P]: index of each row's last window holding a token, plus one (0 for a row without windows)."""
    m = np.asarray(mask) != 0
    if m.shape[1] == 0:
        return np.zeros((m.shape[0],), np.int64)
    return np.where(m.any(axis=1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0).astype(np.int64)


def is_oom(err: BaseException) -> bool:
    """True for a device or host out-of-memory error (XLA's RESOURCE_EXHAUSTED, CPU "Out of memory")."""
    if isinstance(err, MemoryError):
        return True
    if not isinstance(err, (jax.errors.JaxRuntimeError, RuntimeError)):
        return False
    text = str(err).lower()
    return "resource_exhausted" in text or "out of memory" in text or "failed to allocate" in text


def _process_local(tree):
    """`tree` with every array this process cannot fully address (weights sharded over a multi-process
    training mesh) gathered from all processes (a collective: every process calls it, in the same order)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(one, tree)


def _check_on_mesh(state, mesh) -> None:
    """Raises unless every weight of `state` is a jax array on `mesh`'s devices (an engine over a given mesh
    uses the weights where they are)."""
    devices = set(mesh.devices.flat)
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not isinstance(x, jax.Array) or not x.sharding.device_set <= devices:
            raise ValueError(
                f"weight {jax.tree_util.keystr(path)} is not a jax array on the given mesh's devices: "
                "place the weights on the mesh first (e.g. a training state's shardings)"
            )


_ANNOUNCED: set[str] = set()


def _announce(line: str) -> None:
    """Prints the inference mesh policy's decision to stderr, once per process and distinct line."""
    if line not in _ANNOUNCED:
        _ANNOUNCED.add(line)
        print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """One of an engine's jitted programs at one bucket shape: `fn` (a jitted function of `kalm_jax.inference.programs`)
    and the arguments the engine calls it with, the batch arrays as sharded `jax.ShapeDtypeStruct`s."""

    name: str
    fn: Callable
    args: tuple
    mesh: Mesh

    def lower(self):
        """`fn.lower(*args)` under the engine's mesh (as the engine calls it)."""
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*self.args)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class InferenceEngine:
    """Encoding and FBNL scoring for one model on this process's devices.

    Args:
      model: the encoder-decoder (its weights are placed once; the model is updated to share them, so no
        second copy stays on the device).
      tokenizer: needed for text inputs and for the "yes"/"no" ids; may be None with explicit `yes_id` and
        `no_id` for token-level use.
      devices: devices to run on (default: all local devices of this process).
      batch_size: documents / pairs per device step before any out-of-memory back-off (without a `mesh`, the
        policy may lower it to keep the weights replicated: `policy.rows`, printed at start; that cap also
        bounds the `batch_size` of each call).
      max_document_tokens: encoder inputs (``<Document>: `` prefix included) are cut to this many tokens.
      max_query_tokens: queries are cut to this many tokens before entering the prompt (None: no cut).
      max_prompt_tokens: budget of the whole decoder prompt; a longer instruction is cut to fit (warning).
      show_progress: progress bars: True, False or None (only for work of >= 256 items).
      mesh: run over this mesh instead of a ``("data",)`` mesh of `devices`: the model's weights must already
        be jax arrays on its devices (e.g. a training state's, sharded by the training rules); they are used
        as they are (no copy, no host gather, `share_weights` is moot). The mesh may span several processes:
        then every process must make the same engine calls with the same inputs (one SPMD program each), each
        feeds and computes only its devices' rows, and results are gathered to every host.
      batch_axes: the mesh axes batches are split over (default: all axes of `mesh`; ``"data"`` without one).
      weights: the inference mesh policy's setting without a `mesh` (`kalm_jax.parallel.inference_policy`): "auto"
        (default, or the ``KALM_INFERENCE_WEIGHTS`` environment variable), "replicated", "tensor", "tensor:N".
      device_memory: bytes per device for the policy (default: what the devices report; None on CPU).
      quantization: run with quantized weights (`kalm_jax.model.quantization.MODES`: "none", "int8",
        "int8-dynamic", "fp8"): the engine quantizes a copy of `model` (the caller's model is not changed) and
        runs that; None (default) runs `model` as it is (float, or already quantized, e.g. loaded from a
        quantized checkpoint). `self.model` is the model the engine runs.
      device_states: how passage states reach the score program (`DEVICE_STATES`): "compute" (default) in the
        compute dtype, dequantized on the host; "int8" as int8 values + an fp32 scale per window (half of bf16's
        bytes on the wire and in `place`'s cache), dequantized inside the score program where each decoder layer
        projects them to keys and values. int8 host states travel as they are stored; float host states are
        quantized on the host by `states.quantize_int8` (the quantizer of ``PassageStates.to_storage("int8")``).
        The margins equal those of the same int8 states dequantized on the host (`PassageStates.dense`).

    A model whose weights are `jax.ShapeDtypeStruct`s (`kalm_jax.model.build.build_model(..., abstract=True)`) makes an
    engine that only lowers programs (`encode_program`, `score_program`: ahead-of-time compilation for devices
    that need not exist here, e.g. a TPU topology); it cannot run them.
    """

    def __init__(
        self,
        model: T5Gemma2,
        tokenizer: AnyTokenizer | None = None,
        *,
        devices: Sequence[jax.Device] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_document_tokens: int = prompts.INFERENCE_DOCUMENT_MAX_TOKENS,
        max_query_tokens: int | None = prompts.INFERENCE_QUERY_MAX_TOKENS,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        show_progress: bool | None = None,
        yes_id: int | None = None,
        no_id: int | None = None,
        buckets: Buckets = Buckets(),
        share_weights: bool = True,
        mesh: Mesh | None = None,
        batch_axes: str | Sequence[str] | None = None,
        weights: str | None = None,
        device_memory: int | None = None,
        quantization: str | None = None,
        device_states: str = "compute",
    ):
        self.device_states = check_device_states(device_states)
        if tokenizer is not None:
            check_vocab(tokenizer, model.config.vocab_size, where=str(getattr(tokenizer, "path", None) or "tokenizer"))
            yes_id = tokenizer.yes_id if yes_id is None else yes_id
            no_id = tokenizer.no_id if no_id is None else no_id
        if quantization is not None:
            model = quantize.quantize_model(model, quantization)
        self.model = model
        self.quantization = quantize.mode_of(model)
        if self.quantization != "none":
            sizes = quantize.weight_bytes(model)
            _announce(
                f"quantized weights: {self.quantization} ({sizes['quantized'] / 2**20:.1f} MiB of projection/MLP "
                f"values and scales + {sizes['float'] / 2**20:.1f} MiB kept float: embedding, norms; head in fp32)"
            )
        self.tokenizer = tokenizer
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_document_tokens = _positive_int(max_document_tokens, "max_document_tokens")
        if max_query_tokens is not None:
            if (
                isinstance(max_query_tokens, bool)
                or not isinstance(max_query_tokens, (int, np.integer))
                or max_query_tokens < 0
            ):
                raise ValueError(f"max_query_tokens must be a non-negative integer or None, got {max_query_tokens!r}")
            max_query_tokens = int(max_query_tokens)
        self.max_query_tokens = max_query_tokens
        self.max_prompt_tokens = _positive_int(max_prompt_tokens, "max_prompt_tokens")
        self.show_progress = show_progress
        self.buckets = buckets
        graphdef, state = nnx.split(model)
        self.abstract = inference_policy.state_is_abstract(state)
        self.policy: inference_policy.InferencePolicy | None = None
        if mesh is None:
            self.devices = list(jax.local_devices() if devices is None else devices)
            if not self.devices:
                raise ValueError("devices is empty: give at least one device (default: all local devices)")
            self.policy = inference_policy.decide(
                model.config,
                state,
                devices=len(self.devices),
                rows=self.batch_size,
                document_len=self.max_document_tokens,
                prompt_len=self.max_prompt_tokens,
                dtype=model.dtype,
                memory=inference_policy.device_memory(self.devices) if device_memory is None else int(device_memory),
                setting=weights,
                scores=not dispatch.scores_stay_on_chip(
                    model.options.attention_impl,
                    model.dtype,
                    model.config.head_dim,
                    model.config.attn_logit_softcapping,
                    tpu=model.options.tpu_attention,
                    platform=self.devices[0].platform,
                ),
                options=model.options,
            )
            _announce(self.policy.describe())
            self.batch_size = self.policy.rows
            self.mesh = self.policy.mesh(self.devices)
            batch_axes = self.policy.batch_axes
        else:
            if devices is not None:
                raise ValueError("give devices or mesh, not both")
            self.mesh, self.devices = mesh, list(mesh.devices.flat)
            batch_axes = tuple(mesh.axis_names) if batch_axes is None else batch_axes
        split = self.policy is not None and self.policy.sequence_axis is not None
        options = inference_policy.serving_options(model.options, split, self.devices)
        if options != model.options:
            twin = nnx.merge(graphdef, state)  # the same arrays; the caller's model keeps its options
            twin.options = options
            graphdef = nnx.graphdef(twin)
        axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        self._batch_shards = int(np.prod([self.mesh.shape[a] for a in axes]))
        self._global = any(d.process_index != jax.process_index() for d in self.devices)
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch = NamedSharding(self.mesh, PartitionSpec(batch_axes))
        if self.device_states == "int8":
            _announce(
                "passage states on the devices: int8 + an fp32 scale per window (device_states=int8), "
                "dequantized inside the score program"
            )
        if self.abstract:
            state = inference_policy.abstract_weights(state, self.mesh, self.policy.rules if self.policy else {})
        elif mesh is None:
            target = self._replicated if self.policy.mode == "replicated" else self.policy.shardings(state, self.mesh)
            state = jax.device_put(_process_local(state), target)
            if share_weights:
                nnx.update(model, state)  # the model now holds the placed arrays: one copy of the weights
        else:
            _check_on_mesh(state, self.mesh)
        self._graphdef, self._state = graphdef, state
        self._yes_no = None
        self._yes_no_placed: dict[tuple[int, int], jax.Array] = {}
        if yes_id is not None and no_id is not None:
            self._yes_no = self._placed_yes_no(yes_id, no_id)
        self.compiles = 0

    # ------------------------------------------------------------------ identity
    @functools.cached_property
    def model_fingerprint(self) -> str:
        """Content hash of the weights and config (computed once, on first use)."""
        return orbax_io.fingerprint(self.model)

    @property
    def passage_meta(self) -> dict[str, Any]:
        """What `encode` writes into `PassageStates.meta` (fingerprints, document limit, prefix, dtype)."""
        return {
            "model": self.model_fingerprint,
            "tokenizer": self.tokenizer.fingerprint() if self.tokenizer is not None else None,
            "max_length": self.max_document_tokens,
            "document_prefix": prompts.DOCUMENT_PREFIX,
            "compute_dtype": str(jnp.dtype(self.model.dtype)),
            "quantization": self.quantization,
        }

    @property
    def state_dtype(self):
        """Host dtype of encoded states: bfloat16 for a bf16 model, else float32."""
        import ml_dtypes

        return ml_dtypes.bfloat16 if self.model.dtype == jnp.bfloat16 else np.float32

    # ------------------------------------------------------------------ plumbing
    def rows(self, n: int) -> int:
        """Padded batch rows for `n` items (the batch bucket, rounded up to a multiple of the batch shards: the
        device count on the engine's own mesh)."""
        return self.buckets.rows(n, self._batch_shards)

    def _put_to(self, a: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """Host array -> device array of `sharding`; over a multi-process mesh each process transfers only the
        blocks of its own devices (every process holds the same `a`)."""
        if not self._global:
            return jax.device_put(a, sharding)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    def _put(self, *arrays: np.ndarray):
        return [self._put_to(a, self._batch) for a in arrays]

    def _host(self, x: jax.Array) -> np.ndarray:
        """A result on the host: its blocks gathered from every process over a multi-process mesh (a collective)."""
        if x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def _call(self, fn, *args, **kwargs):
        """Calls a jitted function of `programs`, counting the programs it compiles."""
        size = getattr(fn, "_cache_size", None)
        before = size() if size else 0
        with jax.set_mesh(self.mesh):  # the TPU attention kernel runs per batch shard under the mesh
            out = fn(*args, **kwargs)
        if size:
            self.compiles += max(0, size() - before)
        return out

    def _progress(self, total: int, desc: str, unit: str, show: bool | None):
        show = self.show_progress if show is None else show
        if show is None:
            show = total >= PROGRESS_MIN_ITEMS
        return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True)

    def run_batches(
        self,
        n: int,
        batch_size: int | None,
        run: Callable[[int, int], None],
        desc: str,
        unit: str = "item",
        show_progress: bool | None = None,
    ) -> None:
        """Calls ``run(start, stop)`` over [0, n) in batches of `batch_size` (default: the engine's); on out-of-memory
        retries at 3/4 of the size. Where the policy capped the engine's batch to keep the weights replicated
        (`policy.rows` < `policy.asked`), a larger `batch_size` is lowered to that cap: it would not fit."""
        bs = self.batch_size if batch_size is None else _positive_int(batch_size, "batch_size")
        if self.policy is not None and self.policy.rows < self.policy.asked:
            bs = min(bs, self.policy.rows)
        start = 0
        with self._progress(n, desc, unit, show_progress) as bar:
            while start < n:
                stop = min(n, start + bs)
                try:
                    run(start, stop)
                except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                    if not is_oom(err) or stop - start == 1:
                        raise
                    bs = max(1, (stop - start) * 3 // 4)
                    warnings.warn(
                        f"{desc}: out of memory with a batch of {stop - start}; retrying with batch size {bs}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    continue
                bar.update(stop - start)
                start = stop

    def _placed_yes_no(self, yes_id: int, no_id: int) -> jax.Array:
        """The [2] int32 (yes, no) ids on the devices (replicated), checked and placed once per pair."""
        key = (int(yes_id), int(no_id))
        if key not in self._yes_no_placed:
            for name, tok in zip(("yes_id", "no_id"), key):
                if not 0 <= tok < self.model.config.vocab_size:
                    raise ValueError(f"{name}={tok} is outside the vocabulary [0, {self.model.config.vocab_size})")
            self._yes_no_placed[key] = (
                jax.ShapeDtypeStruct((2,), jnp.int32, sharding=self._replicated)
                if self.abstract
                else self._put_to(np.asarray(key, np.int32), self._replicated)
            )
        return self._yes_no_placed[key]

    def _need_yes_no(self):
        if self._yes_no is None:
            raise ValueError("this engine has no yes/no token ids: give it a tokenizer (or yes_id and no_id)")
        return self._yes_no

    def _need_tokenizer(self) -> AnyTokenizer:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: text inputs need one")
        return self.tokenizer

    # ------------------------------------------------------------------ programs
    def encode_shape(self, batch: int, longest: int, ratio: int) -> tuple[int, int]:
        """(rows, length) of the encode program for `batch` documents of at most `longest` tokens."""
        return self.rows(batch), self.buckets.document_length(longest, ratio)

    def score_shape(self, batch: int, prompt_len: int, windows: int) -> tuple[int, int, int]:
        """(rows, prompt length, windows) of the score program for `batch` pairs."""
        return self.rows(batch), self.buckets.decoder_length(prompt_len), self.buckets.window_count(windows)

    def _spec(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        """A batch argument as `_put` places it (leading dim over the batch axes)."""
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=self._batch)

    def encode_program(self, batch: int, longest: int, ratio: int) -> Program:
        """The program `encode_batch` runs for `batch` documents of at most `longest` tokens at `ratio`:
        `programs.encode_pool` on this engine's weights, ids / mask [rows, length] int32 batch-sharded."""
        ratio = mep.check_ratio(ratio)
        rows, width = self.encode_shape(batch, longest, ratio)
        ids = self._spec((rows, width), np.int32)
        return Program("encode", programs.encode_pool, (self._graphdef, self._state, ids, ids, ratio), self.mesh)

    def score_program(self, batch: int, prompt_len: int, windows: int) -> Program:
        """The program `score_batch` / `margins` run for `batch` pairs of prompts of at most `prompt_len`
        tokens over `windows` passage states: `programs.score_pairs` on this engine's weights, prompts
        [rows, T] int32, states [rows, C, H] in the compute dtype (``device_states="int8"``: int8, with a scale
        [rows, C] fp32), mask [rows, C] int32, batch-sharded."""
        rows, t, c = self.score_shape(batch, prompt_len, windows)
        dec = self._spec((rows, t), np.int32)
        int8 = self.device_states == "int8"
        states = self._spec((rows, c, self.model.config.hidden_size), np.int8 if int8 else self.state_dtype)
        pmask = self._spec((rows, c), np.int32)
        scale = self._spec((rows, c), np.float32) if int8 else None
        args = (self._graphdef, self._state, dec, dec, states, pmask, self._need_yes_no(), scale)
        return Program("score", programs.score_pairs, args, self.mesh)

    # ------------------------------------------------------------------ array-level steps
    def encode_batch(self, input_ids, attention_mask, ratio: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encoder + MEP for one batch of right-padded token arrays [B, S].

        Returns numpy (states [B, C, H] float32, mask [B, C] int32, counts [B, C] int32), C = ceil(S/ratio)
        with S the longest real row (windows beyond it trimmed, so bucketing padding never shows).
        """
        ratio = mep.check_ratio(ratio)
        ids = np.asarray(input_ids)
        mask = np.asarray(attention_mask)
        check_tokens(ids, mask, self.model.config, "input_ids")
        b, longest = ids.shape
        rows, width = self.encode_shape(b, longest, ratio)
        ids_p = np.full((rows, width), self.model.config.pad_token_id, np.int32)
        mask_p = np.zeros((rows, width), np.int32)
        ids_p[:b, :longest] = ids[:, :longest]
        mask_p[:b, :longest] = mask[:, :longest]
        mask_p[b:, 0] = 1  # padding rows get one token so no row is all-masked; they are dropped below
        pooled, pmask, counts = self._call(
            programs.encode_pool, self._graphdef, self._state, *self._put(ids_p, mask_p), ratio
        )
        c = -(-longest // ratio)
        # slice on the host: slicing the device arrays would compile one program per (b, c)
        pooled, pmask, counts = self._host(pooled), self._host(pmask), self._host(counts)
        return (np.asarray(pooled, np.float32)[:b, :c], np.asarray(pmask)[:b, :c], np.asarray(counts)[:b, :c])

    def score_batch(
        self,
        decoder_input_ids,
        decoder_attention_mask,
        passage_states,
        passage_mask,
        *,
        yes_id: int | None = None,
        no_id: int | None = None,
        passage_scale=None,
    ) -> np.ndarray:
        """fp32 margins [B] for B (decoder prompt [B, T], passage states [B, C, H] + mask [B, C]) pairs.

        `yes_id` / `no_id` (both or neither) score with these token ids instead of the engine's own.
        `passage_scale` [B, C] fp32: the passage states are int8 values with this per-window scale
        (`states.quantize_int8`). An int8 engine (``device_states="int8"``) sends int8 states as they are and
        quantizes float ones on the host; a compute engine dequantizes int8 ones on the host."""
        if (yes_id is None) != (no_id is None):
            raise ValueError("give both yes_id and no_id, or neither")
        yes_no = self._need_yes_no() if yes_id is None else self._placed_yes_no(yes_id, no_id)
        dec = np.asarray(decoder_input_ids)
        dmask = np.asarray(decoder_attention_mask)
        states = np.asarray(passage_states)
        pmask = np.asarray(passage_mask)
        check_tokens(dec, dmask, self.model.config, "decoder_input_ids")
        check_passages(states, pmask, dec, self.model.config)
        if (passage_scale is not None) != (states.dtype == np.int8):
            raise ValueError(
                f"passage_scale goes with int8 passage states and only with them (got {states.dtype} states and "
                f"{'a' if passage_scale is not None else 'no'} scale)"
            )
        scale = None if passage_scale is None else np.asarray(passage_scale, np.float32)
        if scale is not None and scale.shape != states.shape[:2]:
            raise ValueError(f"passage_scale shape {scale.shape} does not match passage states {states.shape[:2]}")
        if self.device_states == "int8" and scale is None:
            states, scale = quantize_int8(states)
        elif self.device_states != "int8" and scale is not None:
            states, scale = dequantize_passages(states, scale, np.float32, xp=np), None
        b = dec.shape[0]
        rows, t, c = self.score_shape(b, dec.shape[1], states.shape[1])
        dec_p = np.full((rows, t), self.model.config.pad_token_id, np.int32)
        dmask_p = np.zeros((rows, t), np.int32)
        dec_p[:b, : dec.shape[1]] = dec
        dmask_p[:b, : dec.shape[1]] = dmask
        dmask_p[b:, 0] = 1
        states_p = np.zeros((rows, c, states.shape[2]), np.int8 if scale is not None else self.state_dtype)
        states_p[:b, : states.shape[1]] = states
        pmask_p = np.zeros((rows, c), np.int32)
        pmask_p[:b, : states.shape[1]] = pmask
        pmask_p[b:, 0] = 1
        scale_d = None
        if scale is not None:
            scale_p = np.zeros((rows, c), np.float32)
            scale_p[:b, : states.shape[1]] = scale
            (scale_d,) = self._put(scale_p)
        margins = self._call(
            programs.score_pairs,
            self._graphdef,
            self._state,
            *self._put(dec_p, dmask_p, states_p, pmask_p),
            yes_no,
            scale_d,
        )
        return np.asarray(self._host(margins), np.float32)[:b]

    # ------------------------------------------------------------------ tokens
    def document_ids(self, texts: Sequence[str], *, warn: bool = True) -> list[list[int]]:
        """Encoder token ids of raw documents (``<Document>: `` prefix added), cut to `max_document_tokens`."""
        tok = self._need_tokenizer()
        ids = tok.encode_batch([prompts.document_text(t) for t in texts])
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        over = lengths > self.max_document_tokens
        if warn and over.any():
            cut = lengths[over] - self.max_document_tokens
            warnings.warn(
                f"{int(over.sum())} of {len(texts)} documents exceed max_document_tokens={self.max_document_tokens} "
                f"(the '{prompts.DOCUMENT_PREFIX}' prefix included) and were truncated: {int(cut.max())} tokens cut "
                f"from the longest ({int(lengths.max())} tokens), {cut.mean():.1f} on average",
                UserWarning,
                stacklevel=3,
            )
        return [x[: self.max_document_tokens] for x in ids]

    def prompt_ids(
        self, query: str, instruction: str | bool | None = None, system: str | None = None, *, warn: bool = True
    ) -> list[int]:
        """Decoder prompt token ids for `query`: the query is cut to `max_query_tokens` (a warning says so
        unless `warn` is False) and the whole prompt to `max_prompt_tokens` (the instruction is cut first; a
        system prompt that alone overflows is an error)."""
        tok = self._need_tokenizer()
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}: {query!r:.80}")
        if instruction is not None and not isinstance(instruction, (str, bool)):
            raise TypeError(f"instruction must be a str, None or False, got {type(instruction).__name__}")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a str or None, got {type(system).__name__}")
        if warn and self.max_query_tokens is not None:
            n = len(tok.encode(query))
            if n > self.max_query_tokens:
                warnings.warn(
                    f"query of {n} tokens truncated to max_query_tokens={self.max_query_tokens} "
                    f"({n - self.max_query_tokens} tokens cut)",
                    UserWarning,
                    stacklevel=3,
                )
        return prompts.encode_decoder_prompt(
            tok,
            query,
            instruction,
            system,
            self.max_query_tokens,
            max_length=self.max_prompt_tokens,
            cut_instruction=True,
        )

    # ------------------------------------------------------------------ encoding
    def encode_ids(
        self,
        seqs: Sequence[Sequence[int]],
        ratio: int,
        *,
        ids: Sequence[str] | None = None,
        storage: str | None = None,
        meta: dict[str, Any] | None = None,
        batch_size: int | None = None,
        show_progress: bool | None = None,
        desc: str = "encoding passages",
    ) -> PassageStates:
        """Encodes tokenized documents (length-sorted, bucketed batches) and pools them at `ratio`.

        Returns `PassageStates` in input order: states [P, C, H] in `storage` (default: float32, or bfloat16
        for a bf16 model), mask / counts [P, C], C = ceil(longest / ratio); ``meta`` = `meta` or
        `passage_meta`.
        """
        ratio = mep.check_ratio(ratio)
        if storage is None:
            storage = "bfloat16" if self.model.dtype == jnp.bfloat16 else "float32"
        if storage not in STORAGE:
            raise ValueError(f"unknown storage {storage!r}; choose from {STORAGE}")
        seqs = [list(s) for s in seqs]
        if ids is not None:
            ids = list(ids)
            if len(ids) != len(seqs):
                raise ValueError(f"{len(ids)} ids for {len(seqs)} passages")
        meta = dict(self.passage_meta if meta is None else meta)
        hidden = self.model.config.hidden_size
        if not seqs:
            return PassageStates(
                np.zeros((0, 0, hidden), np.float32),
                np.zeros((0, 0), np.int8),
                np.zeros((0, 0), np.int32),
                ratio,
                ids,
                meta=meta,
            ).to_storage(storage)
        empty = [i for i, s in enumerate(seqs) if not s]
        if empty:
            raise ValueError(f"{len(empty)} passages have no tokens (rows {empty[:5]})")
        lengths = np.array([len(s) for s in seqs])
        order = np.argsort(-lengths, kind="stable")
        width = -(-int(lengths.max()) // ratio)
        states = np.zeros((len(seqs), width, hidden), self.state_dtype)
        mask = np.zeros((len(seqs), width), np.int8)
        counts = np.zeros((len(seqs), width), np.int32)

        def run(start: int, stop: int) -> None:
            rows = order[start:stop]
            batch_ids, batch_mask = prompts.pad_batch([seqs[i] for i in rows], self.model.config.pad_token_id)
            pooled, pmask, cnt = self.encode_batch(batch_ids, batch_mask, ratio)
            w = pooled.shape[1]
            states[rows, :w] = pooled
            mask[rows, :w] = pmask
            counts[rows, :w] = cnt

        self.run_batches(len(seqs), batch_size, run, desc, "doc", show_progress)
        return PassageStates(states, mask, counts, ratio, ids, meta=meta).to_storage(storage)

    def encode(
        self,
        texts: Sequence[str],
        ratio: int,
        *,
        ids: Sequence[str] | None = None,
        storage: str | None = None,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> PassageStates:
        """`encode_ids` of raw documents (see `document_ids`)."""
        return self.encode_ids(
            self.document_ids(texts),
            ratio,
            ids=ids,
            storage=storage,
            batch_size=batch_size,
            show_progress=show_progress,
        )

    # ------------------------------------------------------------------ scoring
    def _check_hidden(self, states: PassageStates | DeviceStates) -> None:
        if states.states.shape[2] != self.model.config.hidden_size:
            raise ValueError(
                f"passage states have hidden size {states.states.shape[2]}, the model's is "
                f"{self.model.config.hidden_size}"
            )

    def _ratio_factor(self, states: PassageStates, ratio: int | None) -> tuple[int, int]:
        """(ratio to score at, re-pooling factor over `states.ratio`); ValueError when it is not a multiple."""
        ratio = states.ratio if ratio is None else mep.check_ratio(ratio)
        if ratio % states.ratio:
            raise ValueError(
                f"cannot score at ratio {ratio} from states pooled at ratio {states.ratio}: it must be a "
                f"multiple of {states.ratio}"
            )
        return ratio, ratio // states.ratio

    def _host_batch(
        self, chunk: PassageStates, factor: int, rows: int
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """One batch of host states on the devices, padded to `rows` rows and the batch's window bucket, at
        `factor` x their ratio: (states [rows, W, H], mask [rows, W] int32, scale), batch-sharded. States are in
        the compute dtype with scale None, or (``device_states="int8"``) int8 with scale [rows, W] fp32: int8 host
        states as stored, float ones quantized here by `quantize_int8`. Coarser ratios are re-pooled exactly
        (count-weighted, fp32) on the device by `programs.repool_states` (which re-quantizes them for int8)."""
        b, fine, hidden = len(chunk), chunk.mask.shape[1], chunk.states.shape[2]
        int8 = self.device_states == "int8"
        if factor > 1:
            width = self.buckets.window_count(-(-fine // factor)) * factor
            dense = np.zeros((rows, width, hidden), np.float32)
            dense[:b, :fine] = chunk.dense(np.float32)
            cnt = np.zeros((rows, width), np.int32)
            cnt[:b, :fine] = chunk.counts
            cnt[b:, 0] = 1
            out = jnp.int8 if int8 else jnp.dtype(self.state_dtype)
            return self._call(programs.repool_states, *self._put(dense, cnt), factor, jnp.dtype(out))
        width = self.buckets.window_count(fine)
        pm = np.zeros((rows, width), np.int32)
        pm[:b, :fine] = chunk.mask
        pm[b:, 0] = 1  # padding rows attend to one (zero) window and are dropped
        if not int8:
            dense = np.zeros((rows, width, hidden), self.state_dtype)
            dense[:b, :fine] = chunk.dense(np.float32)
            st_d, pm_d = self._put(dense, pm)
            return st_d, pm_d, None
        values, scale = self._int8(chunk)
        q = np.zeros((rows, width, hidden), np.int8)
        q[:b, :fine] = values
        sc = np.zeros((rows, width), np.float32)  # padding windows: 0 x 0
        sc[:b, :fine] = scale
        return tuple(self._put(q, pm, sc))

    @staticmethod
    def _int8(chunk: PassageStates) -> tuple[np.ndarray, np.ndarray]:
        """(values [P, C, H] int8, scale [P, C] fp32) of host states: as stored when int8, else `quantize_int8`."""
        if chunk.scale is not None:
            return np.asarray(chunk.states), np.asarray(chunk.scale, np.float32)
        return quantize_int8(chunk.dense(np.float32))

    def place(
        self,
        states: PassageStates,
        *,
        ratio: int | None = None,
        batch_size: int | None = None,
        show_progress: bool | None = None,
    ) -> DeviceStates:
        """Moves a passage-state cache to this engine's devices once, for `margins` to score from.

        What a serving system or a sweep keeps hot: afterwards each scoring batch gathers its rows on the device
        (`programs.gather_states`) and only token ids and indices travel per batch.

        The cache is **replicated** over the engine's data mesh, so every batch gathers locally (no cross-device
        traffic); the cost is the whole cache on every device: `nbytes` = N x C x (H x itemsize + 4) bytes on
        each device (C = the window bucket of the longest row, itemsize 2 for a bf16 model, 4 for fp32), plus,
        while placing, one host buffer of that size. States are stored in the compute dtype, the window axis
        padded to the engine's window bucket (zero, masked); with ``device_states="int8"`` as int8 values +
        an fp32 scale per window (N x C x (H + 8) bytes: half of bf16's at H >> 8), as `margins` sends them.

        Args:
          states: host passage states [N, C', H] at `states.ratio` (any storage; int8 is dequantised, except by an
            int8 engine, which keeps it; float states are quantized for an int8 engine).
          ratio: place at this ratio (a multiple of `states.ratio`; default `states.ratio`). A coarser ratio is
            re-pooled exactly first (count-weighted, fp32, on the device by `programs.repool_states`, in batches
            of `batch_size` rows with the out-of-memory back-off), then cast to the compute dtype: the same
            values `margins` computes batch by batch from the host states at that ratio (an int8 engine re-quantizes
            the pooled windows on the device, as `margins` does).
        Returns:
          `DeviceStates` at `ratio`, in the input order.
        """
        self._check_hidden(states)
        ratio, factor = self._ratio_factor(states, ratio)
        n, hidden = len(states), states.states.shape[2]
        windows = -(-_window_extent(states.mask) // factor)
        width = self.buckets.window_count(int(windows.max()) if n else 0)
        int8 = self.device_states == "int8"
        host = np.zeros((n, width, hidden), np.int8 if int8 else self.state_dtype)
        mask = np.zeros((n, width), np.int32)
        scale = np.zeros((n, width), np.float32) if int8 else None

        def run(start: int, stop: int) -> None:
            chunk = states.select(np.arange(start, stop))
            # windows past `width` hold no token (only a chunk of empty rows keeps them): they are dropped
            if factor == 1:  # no device work: straight into the host buffer, one transfer below
                w = min(chunk.mask.shape[1], width)
                if int8:
                    values, sc = self._int8(chunk)
                    host[start:stop, :w], scale[start:stop, :w] = values[:, :w], sc[:, :w]
                else:
                    host[start:stop, :w] = chunk.dense(np.float32)[:, :w]
                mask[start:stop, :w] = chunk.mask[:, :w]
                return
            st_d, pm_d, sc_d = self._host_batch(chunk, factor, self.rows(stop - start))
            w = min(st_d.shape[1], width)
            host[start:stop, :w] = self._host(st_d)[: stop - start, :w]  # sliced on the host: no program per shape
            mask[start:stop, :w] = self._host(pm_d)[: stop - start, :w]
            if int8:
                scale[start:stop, :w] = self._host(sc_d)[: stop - start, :w]

        self.run_batches(n, batch_size, run, "placing passage states", "passage", show_progress)
        placed = (self._put_to(host, self._replicated), self._put_to(mask, self._replicated))
        scale_d = None if scale is None else self._put_to(scale, self._replicated)
        return DeviceStates(placed[0], placed[1], windows, ratio, states.ids, dict(states.meta), scale_d)

    def _check_placed(self, states: DeviceStates, ratio: int | None) -> None:
        if ratio is not None and mep.check_ratio(ratio) != states.ratio:
            raise ValueError(
                f"these device states are placed at ratio {states.ratio}, not {ratio}: place the "
                f"passage states at ratio {ratio} first (engine.place(states, ratio={ratio}))"
            )

    def _check_devices(self, states: DeviceStates) -> None:
        if states.states.sharding.device_set != set(self.devices):
            raise ValueError(
                "these device states were placed on other devices (by another engine): place them "
                "with this engine (engine.place(states))"
            )

    def margins(
        self,
        prompt_rows: Sequence[Sequence[int]],
        prompt_of,
        states: PassageStates | DeviceStates,
        passage_of,
        *,
        ratio: int | None = None,
        batch_size: int | None = None,
        show_progress: bool | None = None,
        desc: str = "scoring",
    ) -> np.ndarray:
        """fp32 margins [N] for pairs (prompt_rows[prompt_of[i]], states row passage_of[i]).

        Args:
          prompt_rows: decoder prompt token lists (e.g. from `prompt_ids`).
          prompt_of, passage_of: int [N] pair -> prompt row / passage row (float or boolean arrays: TypeError).
          states: cached passage states: host `PassageStates` at `states.ratio` (each batch's rows are selected,
            padded and transferred), or `DeviceStates` from `place` (each batch's rows are gathered on the
            device; only the indices travel). Int8 device states (placed by an int8 engine) are scored as int8
            whatever this engine's `device_states`.
          ratio: score at this ratio. Host states: a multiple of `states.ratio` (default `states.ratio`); coarser
            ratios are re-pooled exactly (count-weighted, fp32) on the device, batch by batch. Device states:
            None or the ratio they were placed at (place them at another ratio to score at it).
        """
        prompt_of = row_indices(prompt_of, "prompt_of").reshape(-1)  # floats / booleans: TypeError
        passage_of = row_indices(passage_of, "passage_of").reshape(-1)
        if len(prompt_of) != len(passage_of):
            raise ValueError(f"{len(prompt_of)} prompt indices for {len(passage_of)} passage indices")
        on_device = isinstance(states, DeviceStates)
        if on_device:
            self._check_placed(states, ratio)
        n = len(prompt_of)
        out = np.zeros((n,), np.float32)
        if n == 0:
            return out
        for name, idx, size in (("prompt_of", prompt_of, len(prompt_rows)), ("passage_of", passage_of, len(states))):
            if idx.min() < 0 or idx.max() >= size:
                raise IndexError(f"{name} holds indices outside [0, {size})")
        self._check_hidden(states)
        if on_device:
            self._check_devices(states)
            factor, windows = 1, states.windows
        else:
            ratio, factor = self._ratio_factor(states, ratio)
            windows = -(-np.asarray(states.mask).sum(axis=1) // factor)
        yes_no = self._need_yes_no()
        pad_id = self.model.config.pad_token_id
        prompt_len = np.array([len(p) for p in prompt_rows])
        order = np.lexsort((-prompt_len[prompt_of], -windows[passage_of]))

        def run(start: int, stop: int) -> None:
            pairs = order[start:stop]
            b, rows = len(pairs), self.rows(len(pairs))
            if on_device:
                width = min(self.buckets.window_count(int(windows[passage_of[pairs]].max())), states.states.shape[1])
                idx = np.zeros((rows,), np.int32)  # padding rows gather row 0 and are dropped
                idx[:b] = passage_of[pairs]
                st_d, pm_d, sc_d = self._call(
                    programs.gather_states, states.states, states.mask, *self._put(idx), width, states.scale
                )
            else:
                st_d, pm_d, sc_d = self._host_batch(states.select(passage_of[pairs]), factor, rows)
            dec, dmask = prompts.pad_batch(
                [prompt_rows[i] for i in prompt_of[pairs]] + [[pad_id]] * (rows - b),
                pad_id,
                pad_to_multiple_of=self.buckets.decoder,
            )
            check_tokens(dec, dmask, self.model.config, "decoder_input_ids")
            dec_d, dmask_d = self._put(dec, dmask)
            margins = self._call(
                programs.score_pairs, self._graphdef, self._state, dec_d, dmask_d, st_d, pm_d, yes_no, sc_d
            )
            out[pairs] = np.asarray(self._host(margins), np.float32)[:b]

        self.run_batches(n, batch_size, run, desc, "pair", show_progress)
        return out

    def __repr__(self) -> str:
        c = self.model.config
        return (
            f"InferenceEngine(hidden={c.hidden_size}, dtype={jnp.dtype(self.model.dtype)}, "
            f"quantization={self.quantization}, device_states={self.device_states}, devices={len(self.devices)}, "
            f"batch_size={self.batch_size}, "
            f"compiles={self.compiles})"
        )


def probability(margins) -> np.ndarray:
    """P(yes) = sigmoid(margin) in fp32, computed on the host (no compilation per list length)."""
    m = np.asarray(margins, np.float32)
    e = np.exp(-np.abs(m))
    return np.where(m >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


__all__ = [
    "InferenceEngine",
    "DeviceStates",
    "DEVICE_STATES",
    "Buckets",
    "check_device_states",
    "is_oom",
    "probability",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_PROMPT_TOKENS",
]
