"""The model's run-time switches: one frozen value, given at construction and carried by the model.

    options = ModelOptions(attention_impl="xla", scan_unroll=True)
    model = build_model(config, options=options)   # kalm_jax.model.build
    model.options                                  # static: part of the model's graphdef

The options are a plain (static) attribute of `T5Gemma2`, so they travel with its `nnx.split` graphdef into
every jitted program, and a model with other options traces a program of its own. Nothing here is global:
two models with different options can live side by side in one process.
"""

from __future__ import annotations

import dataclasses

from kalm_jax.model.attention.dispatch import ATTENTION_IMPLS, TPU_ATTENTION_IMPLS

ACTIVATIONS = ("float", "int8")
TPU_MLP_IMPLS = ("fused", "xla")


@dataclasses.dataclass(frozen=True, eq=False)
class ModelOptions:
    """How the model runs (never what it computes, up to floating-point rounding).

    Attributes:
      attention_impl: "auto" (cuDNN flash attention on GPU in bf16, else `tpu_attention` when lowered for TPU,
        else the einsum reference), "xla", "dot_product", "cudnn" or "tpu_flash";
        see `kalm_jax.model.attention.dispatch.resolve_attention_impl`.
      scan_unroll: `unroll` of the `lax.scan` over layers (1 = a loop; True = fully unrolled, which the AOT cost
        analysis needs because XLA counts a while-loop body once).
      remat: rematerialise each layer in the backward pass.
      remat_policy: what remat keeps of each layer's forward (`t5gemma2.REMAT_POLICIES` names joined by "+";
        "nothing" = all recomputed), for both stacks or per stack ("encoder:qkv+mlp_in,decoder:qkv";
        `t5gemma2.stack_remat_policies`).
      tpu_attention: the kernel "auto" uses when a program is lowered for TPU: "flash" (the Pallas splash
        kernel, `kalm_jax.model.attention.splash`) or "xla" (the einsum reference, as on CPU).
      tpu_mlp: the MLP sub-block when a program is lowered for TPU: "fused" (one Pallas kernel for the norms, the
        three matmuls and the residual add, where it applies: `kalm_jax.model.fused_mlp`) or "xla" (the
        reference, as on CPU; training uses it: its remat policies name the reference's products).
      tpu_vmem_bytes: the VMEM bytes of one TensorCore of the TPU generation the program is for
        (`kalm_jax.model.fused_mlp.vmem_capacity`), or None (unknown: the fused MLP keeps to the scoped VMEM
        every generation gives a kernel). The inference engine sets it from its devices; with it the fused MLP
        takes larger MLPs (`fused_mlp.vmem_budget`). No effect off TPU.
      pallas_interpret: run the Pallas kernels in interpret mode on any backend (for tests on CPU): the splash
        kernel where `attention_impl="tpu_flash"`, the fused MLP wherever ``tpu_mlp="fused"`` applies.
      activations: "float", or "int8": the inputs of the projection and MLP matmuls are quantized per token to
        int8 where their weights are int8 (`kalm_jax.model.quantization`, mode "int8-dynamic"); no effect on
        float weights.
      sequence_parallel: a mesh axis name (the inference policy's ``"tensor"``) or None. Named, the encoder runs
        Megatron-style sequence parallelism over that axis of the context mesh (`jax.set_mesh`) when its weights
        are split over it: the residual stream, the norms and the adds hold 1/size of the tokens, each sub-block
        all-gathers its input's tokens (with their RMS statistics) before the projections and reduce-scatters
        the attention-output and down projections. Where it applies: `kalm_jax.model.layers.sequence_axis`
        (elsewhere, no effect). The inference engine sets it for the policy's tensor layout.
    """

    attention_impl: str = "auto"
    scan_unroll: int | bool = 1
    remat: bool = False
    remat_policy: str = "nothing"
    tpu_attention: str = "flash"
    tpu_mlp: str = "fused"
    tpu_vmem_bytes: int | None = None
    pallas_interpret: bool = False
    activations: str = "float"
    sequence_parallel: str | None = None

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"unknown attention implementation {self.attention_impl!r}; valid: {list(ATTENTION_IMPLS)}"
            )
        if self.tpu_attention not in TPU_ATTENTION_IMPLS:
            raise ValueError(f"tpu_attention={self.tpu_attention!r}; valid: {list(TPU_ATTENTION_IMPLS)}")
        if self.tpu_mlp not in TPU_MLP_IMPLS:
            raise ValueError(f"tpu_mlp={self.tpu_mlp!r}; valid: {list(TPU_MLP_IMPLS)}")
        vmem = self.tpu_vmem_bytes
        if vmem is not None and (isinstance(vmem, bool) or not isinstance(vmem, int) or vmem <= 0):
            raise ValueError(f"tpu_vmem_bytes={self.tpu_vmem_bytes!r}: a positive int (bytes), or None (unknown)")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations={self.activations!r}; valid: {list(ACTIVATIONS)}")
        if self.scan_unroll is not True and not (isinstance(self.scan_unroll, int) and self.scan_unroll >= 1):
            raise ValueError(f"scan_unroll={self.scan_unroll!r}: an int >= 1, or True (fully unrolled)")

    def _key(self) -> tuple:
        # `scan_unroll=True` (fully unrolled) is another program than `scan_unroll=1` (a loop), yet True == 1 and
        # hash(True) == hash(1): compared as plain fields, the two would share one jit cache entry.
        return (*dataclasses.astuple(self), self.scan_unroll is True)

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelOptions) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def replace(self, **changes) -> ModelOptions:
        """A copy with `changes` (checked like the constructor's arguments)."""
        return dataclasses.replace(self, **changes)


def analysis_options(base: ModelOptions | None = None, *, einsum_attention: bool = False) -> ModelOptions:
    """The cost-analysis variant of `base`: layers fully unrolled (XLA's cost analysis counts a while-loop
    body once). The attention stays `base`'s (the splash kernel on TPU, whose cost the AOT report reads
    from its HLO operands: `kalm_jax.perf.aot.hlo_cost`); `einsum_attention` swaps in the einsum attention,
    whose FLOPs and bytes XLA costs itself (for the train step, whose backward kernels are not accounted)."""
    base = (base or ModelOptions()).replace(scan_unroll=True)
    return base.replace(attention_impl="xla") if einsum_attention else base


__all__ = ["ACTIVATIONS", "TPU_MLP_IMPLS", "ModelOptions", "analysis_options"]
