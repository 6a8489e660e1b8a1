"""Safetensors I/O for Hub checkpoints: reading a directory (single file or sharded index) tensor by tensor,
and a streaming writer that never holds a whole shard in memory."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kalm_jax.atomic import DiskFullError, as_disk_full


def _open_safetensors(file: Path):
    """`safe_open` whose errors (SafetensorError, a header that is not JSON, ...) name the file."""
    from safetensors import safe_open

    try:
        return safe_open(file, framework="np")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own exception types without the path
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _inside(root: Path, name: str, what: str) -> Path:
    """`root/name`, refusing absolute names and names that leave `root` (`../`)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{what}: shard name {name!r} is not a file inside {root}; refusing to follow it")
    return root / name


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weights_file(root: Path) -> Path:
    """The file transformers' `from_pretrained` reads the weights of the local directory `root` from, in its
    order of precedence: config.json's `transformers_weights` (a *.safetensors or *.safetensors.index.json
    inside `root`), then `model.safetensors` (an index beside it is ignored), then `model.safetensors.index.json`.
    Any other *.safetensors file is never read; a directory with none of these is a FileNotFoundError."""
    explicit = None
    # no or unreadable config.json: `read_config` reports it where a config is needed
    with contextlib.suppress(OSError, ValueError, AttributeError):
        explicit = json.loads((root / "config.json").read_text()).get("transformers_weights")
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit.endswith((".safetensors", ".safetensors.index.json")):
            raise ValueError(
                f"{root / 'config.json'}: transformers_weights {explicit!r} is neither a *.safetensors "
                "nor a *.safetensors.index.json file"
            )
        file = _inside(root, explicit, f"{root / 'config.json'} transformers_weights")
        if not file.is_file():
            raise FileNotFoundError(f"{file}: named by transformers_weights in {root / 'config.json'}, does not exist")
        return file
    for name in (SINGLE_FILE, INDEX_FILE):
        if (root / name).is_file():
            return root / name
    others = sorted(p.name for p in root.glob("*.safetensors"))
    raise FileNotFoundError(
        f"{root}: no {SINGLE_FILE} and no {INDEX_FILE}"
        + (
            f"; transformers does not load the other *.safetensors files here ({others[:5]}): "
            f"rename a single file to {SINGLE_FILE} or write {INDEX_FILE}"
            if others
            else ""
        )
    )


class SafetensorsDir:
    """Read access to the safetensors of an HF checkpoint directory (single file or sharded index).

    The weights are read from the file transformers reads (`weights_file`). With an index, every shard it
    names is read whole, as transformers does; a tensor stored in two of them, or one the index maps to a
    shard that does not hold it, is a ValueError naming the tensor and the files."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: not a checkpoint directory")
        self._handles: dict[Path, object] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        source = weights_file(self.root)
        if not source.name.endswith(".index.json"):
            self.files = {name: source for name in self._handle(source).keys()}  # noqa: SIM118 - a safe_open handle, not a dict
            return
        index = source
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is {type(weight_map).__name__}, not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        mapped = {name: _inside(self.root, f, str(index)) for name, f in weight_map.items()}
        shards = sorted(set(mapped.values()))
        missing = [str(p) for p in shards if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing[:5]}")
        self.files = {}
        for shard in shards:
            for name in self._handle(shard).keys():  # noqa: SIM118 - a safe_open handle
                if name in self.files:
                    raise ValueError(
                        f"tensor {name} is stored in two shard files, {self.files[name]} and {shard} "
                        f"(both named by {index}); refusing to choose one"
                    )
                self.files[name] = shard
        for name, shard in mapped.items():
            if self.files.get(name) != shard:
                where = f"it is in {self.files[name]}" if name in self.files else "no shard it names holds it"
                raise ValueError(
                    f"{index} maps tensor {name} to {shard}, which does not hold it ({where}); "
                    "the index does not describe these shards"
                )

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open_safetensors(file)
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.files)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._shapes:
            sl = self._handle(self.files[name]).get_slice(name)
            self._shapes[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handle(self.files[name]).get_tensor(name)
        except Exception as e:  # noqa: BLE001 - SafetensorError carries no path
            raise ValueError(f"{self.files[name]}: cannot read tensor {name} ({type(e).__name__}: {e})") from None

    def raw_entry(self, name: str) -> tuple[str, tuple[int, ...], int]:
        """(safetensors dtype string, shape, byte length) of `name`, read from the file header only."""
        header, _ = read_safetensors_header(self.files[name])
        e = header[name]
        begin, end = e["data_offsets"]
        return e["dtype"], tuple(e["shape"]), end - begin

    def raw_bytes(self, name: str) -> bytes:
        """The stored bytes of `name`, untouched (no dtype decoding): for byte-exact carrying."""
        file = self.files[name]
        header, data_start = read_safetensors_header(file)
        begin, end = header[name]["data_offsets"]
        with open(file, "rb") as f:
            f.seek(data_start + begin)
            data = f.read(end - begin)
        if len(data) != end - begin:
            raise ValueError(f"{file}: tensor {name} is truncated ({len(data)} of {end - begin} bytes)")
        return data

    def close(self):
        self._handles.clear()


def read_safetensors_header(file: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data buffer starts."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{file}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"{file}: not a safetensors file (header length {n})")
        raw = f.read(n)
    try:
        return json.loads(raw), 8 + n
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: corrupt safetensors header ({e})") from None


ST_DTYPES: dict[np.dtype, str] = {
    np.dtype(jnp.float32): "F32",
    np.dtype(jnp.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
}
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
"""Hub convention: shards of at most 5 GB (a tensor larger than the limit gets a shard of its own)."""


@dataclasses.dataclass
class Entry:
    """One tensor of the export plan: its name, safetensors dtype/shape/size and how to produce its bytes."""

    name: str
    st_dtype: str
    shape: tuple[int, ...]
    nbytes: int
    produce: Callable[[], np.ndarray | bytes]


def write_safetensors(path: Path, entries: Sequence[Entry], bar) -> None:
    """Writes a safetensors file tensor by tensor: the header is known in advance, so no shard is ever
    held in memory whole (the `safetensors` library's writers need every tensor of a file at once).

    Raises `DiskFullError` naming `path` when the disk fills up."""
    try:
        _write_safetensors(path, entries, bar)
    except OSError as e:
        full = as_disk_full(e, path)
        if full is not None:
            raise full from None
        raise


def _write_safetensors(path: Path, entries: Sequence[Entry], bar) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.st_dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            data = e.produce()
            if isinstance(data, np.ndarray):
                if data.nbytes != e.nbytes or tuple(data.shape) != e.shape:
                    raise RuntimeError(
                        f"{e.name}: produced shape {data.shape} ({data.nbytes} bytes), "
                        f"planned {e.shape} ({e.nbytes} bytes)"
                    )
                if (
                    e.st_dtype in ("F32", "BF16", "F16", "F64")
                    and not np.isfinite(data.astype(np.float32, copy=False)).all()
                ):
                    raise ValueError(f"tensor {e.name} holds non-finite values (NaN/inf); refusing to export it")
                data.tofile(f)
            else:
                if len(data) != e.nbytes:
                    raise RuntimeError(f"{e.name}: {len(data)} bytes, planned {e.nbytes}")
                f.write(data)
            bar.update(1)
        f.flush()
        os.fsync(f.fileno())


def plan_shards(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy in-order packing into shards of at most `max_bytes` (an oversized tensor gets its own shard)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def parse_size(size: int | str) -> int:
    """Byte count from an int or a string like '5GB', '500MB', '2GiB', '1000'."""
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        units = {
            "KIB": 1 << 10,
            "MIB": 1 << 20,
            "GIB": 1 << 30,
            "TIB": 1 << 40,
            "KB": 10**3,
            "MB": 10**6,
            "GB": 10**9,
            "TB": 10**12,
            "B": 1,
        }
        for unit, mult in units.items():
            if text.endswith(unit):
                try:
                    value = int(float(text[: -len(unit)]) * mult)
                except ValueError:
                    raise ValueError(f"cannot parse size {size!r} (e.g. '5GB', '500MB', '2GiB')") from None
                break
        else:
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"cannot parse size {size!r} (e.g. '5GB', '500MB', '2GiB')") from None
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


__all__ = [
    "SafetensorsDir",
    "DiskFullError",
    "read_safetensors_header",
    "ST_DTYPES",
    "DEFAULT_MAX_SHARD_BYTES",
    "Entry",
    "write_safetensors",
    "plan_shards",
    "parse_size",
    "weights_file",
    "SINGLE_FILE",
    "INDEX_FILE",
]
