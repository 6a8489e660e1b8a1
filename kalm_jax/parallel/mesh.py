"""The one mesh module: device meshes and logical -> mesh sharding rules (MaxText/T5X style).

Training, the inference engine, ahead-of-time compilation and the TPU attention kernels all build their
meshes here: `make_mesh` for the (data, fsdp, tensor) training mesh, `data_mesh` for inference.

Every parameter carries logical axis names as Variable metadata (`out_sharding`, e.g.
("layers", "embed", "heads", "head_dim")); the rules in the config map each logical name to a mesh axis,
a tuple of mesh axes, or None (replicated). A dimension whose size the mapped mesh axes do not divide is
replicated instead (and reported by `summary`), so one rule set serves every model size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "batch"

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("lora_rank", None),
)

Rules = Mapping[str, Any]


def kernel_batch_axes(mesh, rows: int) -> tuple[str, ...]:
    """The axes of `mesh` (`jax.sharding.get_abstract_mesh()` inside a program) a Pallas kernel's `shard_map`
    splits a batch of `rows` over: those of the default "batch" rule (`data`, `fsdp`) of size > 1, in order,
    while their product divides `rows`. Other axes see the whole batch slice."""
    axes: tuple[str, ...] = ()
    for name in dict(DEFAULT_RULES)[BATCH]:
        if name not in mesh.axis_names or mesh.shape[name] == 1:
            continue
        if rows % int(np.prod([mesh.shape[a] for a in axes + (name,)])) == 0:
            axes += (name,)
    return axes


def mesh_shape(sizes: Mapping[str, int], num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolves (data, fsdp, tensor) sizes where at most one is -1 (fill); raises a clear error if the
    product does not equal the number of devices."""
    n = jax.device_count() if num_devices is None else num_devices
    shape = [int(sizes[a]) for a in MESH_AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    bad = [f"{a}={s}" for a, s in zip(MESH_AXES, shape) if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh sizes must be positive or -1 (fill): {', '.join(bad)}")
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill); got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if n % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, shape))}: the fixed axes ({known} devices) do not "
                f"divide the {n} available devices"
            )
        shape[fill[0]] = n // known
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
            f"{n} are available (set one axis to -1 to fill)"
        )
    return tuple(shape)  # type: ignore[return-value]


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None, num_slices: int = 1) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: all).

    With `num_slices` > 1 (multi-slice TPU, slices joined over DCN) the `data` axis spans the slices
    (`data` must be a multiple of `num_slices`); `fsdp` and `tensor` stay inside a slice (ICI).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    if num_slices > 1:
        if shape[0] % num_slices:
            raise ValueError(
                f"mesh data={shape[0]} must be a multiple of num_slices={num_slices} "
                "(data parallelism spans the slices over DCN)"
            )
        ici = (shape[0] // num_slices, shape[1], shape[2])
        arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices)
        return Mesh(arr, MESH_AXES)
    try:
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # fake CPU devices or shapes mesh_utils does not know: plain row-major order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-axis ``("data",)`` mesh over `devices` (default: this process's local devices): the inference
    engine's mesh (weights replicated, batches split over ``data``)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("cannot build a mesh over an empty device list")
    return Mesh(np.asarray(devices), ("data",))


def rules_dict(rules: Sequence[Sequence[Any]] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Normalises rules given as pairs (config tuples) or a mapping; checks mesh-axis names."""
    items = DEFAULT_RULES if rules is None else (rules.items() if isinstance(rules, Mapping) else rules)
    out: dict[str, Any] = {}
    for item in items:
        if len(item) != 2:
            raise ValueError(f"sharding rule {item!r} must be a (logical_name, mesh_axes) pair")
        name, target = item
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        unknown = [t for t in targets if t not in MESH_AXES]
        if unknown:
            raise ValueError(f"sharding rule for {name!r} names unknown mesh axes {unknown}; valid: {MESH_AXES}")
        out[str(name)] = None if not targets else (targets[0] if len(targets) == 1 else targets)
    return out


def _axis_size(mesh: Mesh, target) -> int:
    if target is None:
        return 1
    names = (target,) if isinstance(target, str) else target
    return math.prod(mesh.shape[a] for a in names)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """PartitionSpec for one array: each logical dim mapped by `rules`; indivisible dims and mesh axes
    already used by an earlier dim are replicated."""
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        target = rules.get(name) if name is not None else None
        names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        names = tuple(a for a in names if a not in used and mesh.shape[a] > 1)
        if not names or size % _axis_size(mesh, names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return P(*spec)


def logical_axes(state: nnx.State) -> dict:
    """Nested dict (pure-dict layout) of each Variable's logical axis names (`out_sharding` metadata)."""
    out: dict = {}
    for path, var in state.flat_state():
        axes = getattr(var, "out_sharding", None)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(axes) if axes is not None else (None,) * len(var.get_value().shape)
    return out


def tree_shardings(values: Any, axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of arrays/ShapeDtypeStructs given a same-structured tree of axis names."""
    return jax.tree.map(
        lambda ax, v: NamedSharding(mesh, logical_to_spec(ax, v.shape, mesh, rules)),
        axes,
        values,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_spec(ndim: int, mesh: Mesh, rules: Rules) -> P:
    """Batch arrays: leading dim on the rule for "batch", the rest replicated."""
    target = rules.get(BATCH)
    return P(target, *([None] * (ndim - 1)))


def check_batch(global_batch: int, mesh: Mesh, rules: Rules) -> None:
    """Raises before compilation if the global batch does not split over the batch mesh axes."""
    n = _axis_size(mesh, rules.get(BATCH))
    if global_batch % n:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the {n} batch shards "
            f"(mesh axes {rules.get(BATCH)} of mesh {dict(mesh.shape)}); change data.batch_size "
            f"or the mesh"
        )


def summary(params: Any, axes: Any, shardings: Any, mesh: Mesh) -> str:
    """A table: mesh shape, then one row per parameter kind (last path component) with logical axes,
    shape, PartitionSpec and per-device bytes."""
    lines = [f"mesh {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"]
    seen: dict[str, str] = {}
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_s = jax.tree.leaves(shardings)
    for (path, v), ax, s in zip(flat_p, flat_a, flat_s):
        keys = [str(getattr(k, "key", k)) for k in path]
        kind = ("lora:" if keys[-1].endswith(("_lora_a", "_lora_b")) else "") + keys[-1]
        if kind in seen:
            continue
        local = s.shard_shape(v.shape)
        nbytes = int(np.prod(local)) * np.dtype(v.dtype).itemsize
        seen[kind] = (
            f"  {'/'.join(keys):<34} {str(tuple(v.shape)):<22} {str(ax):<44} {str(s.spec):<34} "
            f"{nbytes / 2**20:8.2f} MiB/device"
        )
    header = f"  {'parameter':<34} {'shape':<22} {'logical axes':<44} {'partition spec':<34} {'shard':>8}"
    return "\n".join(lines + [header] + list(seen.values()))


__all__ = [
    "MESH_AXES",
    "DEFAULT_RULES",
    "kernel_batch_axes",
    "mesh_shape",
    "make_mesh",
    "data_mesh",
    "rules_dict",
    "logical_to_spec",
    "logical_axes",
    "tree_shardings",
    "batch_spec",
    "check_batch",
    "summary",
]
