"""TPU slices described on any host: the slice catalogue (chips, HBM per chip) and the devices of a
topology (`jax.experimental.topologies`, needs libtpu)."""

from __future__ import annotations

import dataclasses
import re

GiB = 2**30

# HBM per JAX device (one chip; v4/v5p run both TensorCores as one "megacore" device).
HBM_BYTES: dict[str, int] = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
}
# Slice shapes (chips) by chip count. v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {
    1: (1, 1, 1),
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
_GEN = {  # user prefix -> (libtpu topology prefix, chip config, cores per chip named in the slice name)
    "v4": ("v4", "megacore", 2),
    "v5p": ("v5", "megacore", 2),
    "v5e": ("v5e", "default", 1),
    "v6e": ("v6e", "default", 1),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A TPU slice type such as v5e-256: generation, chip grid and the libtpu topology arguments."""

    name: str
    generation: str
    chips: int
    shape: tuple[int, ...]
    topology_name: str
    chip_config_name: str
    wrap: tuple[bool, bool, bool]

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES[self.generation]


def tpu_slice(name: str) -> TpuSlice:
    """Parses 'v5e-256', 'v5p-128', 'v4-32', 'v6e-8', ... into a `TpuSlice` (ValueError lists valid ones)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower().replace("v5litepod", "v5e"))
    if not m:
        raise ValueError(
            f"unknown TPU topology {name!r}; expected <generation>-<size> with generation in "
            f"{sorted(_GEN)}, e.g. v5e-256, v5p-128, v4-32, v6e-256"
        )
    gen, size = m.group(1), int(m.group(2))
    prefix, chip_config, per_chip = _GEN[gen]
    chips, rem = divmod(size, per_chip)
    table = _SHAPES_3D if per_chip == 2 else _SHAPES_2D
    if rem or chips not in table:
        valid = sorted(c * per_chip for c in table)
        raise ValueError(f"unsupported slice size {name!r}; valid sizes for {gen}: {valid}")
    shape = table[chips]
    if len(shape) == 3:  # full 4x4x4 cubes and larger are tori
        wrap = (True, True, True) if chips >= 64 else (False, False, False)
    else:
        wrap = (shape[0] == 16, shape[1] == 16, False)
    return TpuSlice(
        name=f"{gen}-{size}",
        generation=gen,
        chips=chips,
        shape=shape,
        topology_name=f"{prefix}:{'x'.join(map(str, shape))}",
        chip_config_name=chip_config,
        wrap=wrap,
    )


def topology_devices(sl: TpuSlice, num_slices: int = 1) -> list:
    """Compile-only devices of `num_slices` copies of the slice (needs the libtpu wheel, not the hardware)."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "AOT compilation for TPU needs the TPU runtime library: pip install 'kalm-jax[tpu]' "
            "(the libtpu wheel matching your jax version)"
        ) from None
    cphb = (2, 2, 1) if sl.chips >= 4 else (1, 1, 1)
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=sl.topology_name,
        chip_config_name=sl.chip_config_name,
        chips_per_host_bounds=cphb,
        num_slices=num_slices,
        wrap=sl.wrap,
    )
    return list(desc.devices)
