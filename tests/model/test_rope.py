"""RoPE (`layers.apply_rope`): its two formulations (sliced halves everywhere but TPU, a signed-permutation matmul
lowered for TPU) give the same numbers, bit for bit, and both are the Hugging Face rotation
(`x·cos + rotate_half(x)·sin`, written here in numpy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kalm_jax.model import layers


def hf_rotation(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """transformers' apply_rotary_pos_emb for x [B, T, heads, D], cos/sin [B or 1, T, D], in float64."""
    half = x.shape[-1] // 2
    rotate_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotate_half * sin[:, :, None, :]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_both_formulations_are_the_same_rotation(dtype, per_row):
    b, t, n, d = 3, 40, 4, 256
    cos, sin = layers.rope_table(t, d, 10_000.0, 8.0)
    if per_row:  # the decoder's one query position per row: tables [B, 1, D]
        rows = jnp.asarray([0, 17, 39])
        cos, sin, t = cos[rows][:, None], sin[rows][:, None], 1
    x = jax.random.normal(jax.random.key(0), (b, t, n, d), jnp.float32).astype(dtype)
    tables = (cos, sin) if per_row else (cos[None], sin[None])
    halves = layers.rope_rotation_halves(x, *tables)
    matmul = layers.rope_rotation_matmul(x, *tables)
    assert halves.dtype == matmul.dtype == dtype
    np.testing.assert_array_equal(np.asarray(halves, np.float32), np.asarray(matmul, np.float32))
    want = hf_rotation(np.asarray(x, np.float64), *(np.asarray(a, np.float64) for a in tables))
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(matmul, np.float64), want, atol=tol * np.abs(want).max())
    # the model's entry point on this (CPU) backend
    np.testing.assert_array_equal(
        np.asarray(layers.apply_rope(x, cos, sin) if not per_row else layers.apply_rope(x, *tables), np.float32),
        np.asarray(halves, np.float32),
    )


def test_the_tpu_lowering_takes_the_matmul_and_the_cpu_lowering_the_halves():
    x = jax.ShapeDtypeStruct((2, 16, 4, 256), jnp.bfloat16)
    cos, sin = layers.rope_table(16, 256, 10_000.0, 1.0)

    def text(platform: str) -> str:
        return (
            jax.jit(lambda x: layers.apply_rope(x, cos, sin)).trace(x).lower(lowering_platforms=(platform,)).as_text()
        )

    assert "dot_general" in text("tpu") and "dot_general" not in text("cpu")


def test_both_formulations_have_the_same_gradient():
    cos, sin = layers.rope_table(24, 128, 10_000.0, 1.0)
    x = jax.random.normal(jax.random.key(1), (2, 24, 2, 128), jnp.float32)
    w = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)

    def loss(fn):
        return jax.grad(lambda x: jnp.sum(fn(x, cos[None], sin[None]) * w))(x)

    np.testing.assert_allclose(
        loss(layers.rope_rotation_matmul), loss(layers.rope_rotation_halves), rtol=1e-6, atol=1e-6
    )
