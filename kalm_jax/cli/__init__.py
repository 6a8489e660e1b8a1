"""The one config entry for every command line: an ml_collections config file + ``--config.KEY=VALUE``.

Every CLI (train, eval, label, convert, export, verify_release, aot, bench, the data tools: bm25, negatives,
tfds_build, tokenizer) is configured the same way:

    --config=NAME.py[:ARG]     a file with ``get_config(arg)`` returning an ml_collections ConfigDict
                               (each CLI has a default file shipped in the package, kalm_jax/configs/, so
                               this flag is optional; a bare NAME.py[:ARG] means the package's file; a file
                               of your own is a path containing a slash, e.g. ./mine.py)
    --config.a.b=VALUE         override one field; VALUE is parsed as the field's type (bool, int, float, str,
                               tuple); an unknown key exits with the valid keys there

Every default lives once, in its config file. A CLI may also take a few plain flags that are not settings of
the run (``--workdir``, the multi-process flags) and positional arguments mapped onto config fields
(``convert to-hf SRC OUT`` sets ``command``, ``source`` and ``output``). The command modules beside this one
(`kalm_jax.cli.train`, `kalm_jax.cli.eval`, ...) are the console commands' entry points (pyproject.toml).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # package data: kalm_jax/configs/


class ConfigError(ValueError):
    """A config file, override key or override value is invalid (the message names it)."""


def config_file(name: str) -> Path:
    """A config file shipped with the package (``kalm_jax/configs/<name>``)."""
    return CONFIG_DIR / name


def resolve(spec: str | Path) -> tuple[str, str]:
    """``path[:arg]`` -> (the config file's path, arg). A bare name (no ``/``) is a file of the package's configs
    (``train.py:tiny`` is kalm_jax/configs/train.py, even where the current directory has a ``train.py``); a path
    (``configs/x.py``, ``./mine.py``) is that file."""
    path, _, arg = str(spec).partition(":")
    if "/" not in path and "\\" not in path:
        path = str(CONFIG_DIR / path)
    return path, arg


def load_file(spec: str | Path) -> ml_collections.ConfigDict:
    """Loads ``path[:arg]``: the file's ``get_config(arg)`` (``get_config()`` without an arg).

    Names are resolved by `resolve`."""
    spec = str(spec)
    path, arg = resolve(spec)
    if not Path(path).is_file() and Path(path).parent == CONFIG_DIR:
        known = sorted(p.name for p in CONFIG_DIR.glob("*.py") if p.name != "__init__.py")
        raise ConfigError(
            f"--config: no config file {Path(path).name!r} in the package's configs ({CONFIG_DIR}; a "
            f"bare name means a file there: {known}); a file of your own is a path, e.g. "
            f"./{Path(path).name}"
        )
    if not Path(path).is_file():
        raise ConfigError(f"--config: no such config file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_kalm_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a broken config file is reported with its path
        raise ConfigError(f"--config: {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} has no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--config={spec}: {e}") from None


def _parse_bool(raw: str, key: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--config.{key}={raw!r}: expected a boolean (true/false)")


def _parse_scalar(raw: str, kind: type, key: str):
    if kind is bool:
        return _parse_bool(raw, key)
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}={raw!r}: expected an integer") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}={raw!r}: expected a number") from None
    return raw


def parse_value(raw: str, current: Any, key: str):
    """`raw` (the text after ``=``) as the type of the field's `current` value."""
    if isinstance(current, (bool, int, float)) and not isinstance(current, ml_collections.ConfigDict):
        return _parse_scalar(raw, type(current), key)
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        text = raw.strip()
        if text.startswith(("(", "[")):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ConfigError(f"--config.{key}={raw!r}: not a valid tuple literal") from None
            items = list(value) if isinstance(value, (tuple, list)) else [value]
        else:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            kind = type(current[0]) if current else None
            if kind is None:
                items = []
                for p in parts:
                    try:
                        items.append(ast.literal_eval(p))
                    except (ValueError, SyntaxError):
                        items.append(p)
            else:
                items = [_parse_scalar(p, kind, key) for p in parts]
        return type(current)(items)
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets ``config.<key>`` from the text `raw`; an unknown key raises `ConfigError` listing the valid ones."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            section = ".".join(parts[:i]) or "<top level>"
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(
                f"unknown config key --config.{key}: {section} has no {part!r}; valid keys there: {valid}"
            )
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} is a section ({sorted(current.keys())}); set one of its keys")
    value = parse_value(raw, current, key)
    try:
        with node.unlocked():
            node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.{key}={raw!r}: {e}") from None


@dataclasses.dataclass
class Flag:
    """A plain flag of a CLI (not a run setting): ``--name=VALUE``."""

    name: str
    default: Any = None
    help: str = ""
    type: Callable[[str], Any] = str


DISTRIBUTED_FLAGS = (
    Flag(
        "coordinator_address",
        None,
        "HOST:PORT of process 0's coordinator (jax.distributed.initialize); default: "
        "auto-detected on TPU pods / SLURM / Open MPI / JAX_COORDINATOR_ADDRESS, else one process",
    ),
    Flag("num_processes", None, "number of JAX processes in the job (with --coordinator_address)", int),
    Flag("process_id", None, "this process's index in [0, num_processes) (with --coordinator_address)", int),
)
"""The multi-process flags of train.py, eval.py and label, passed to `kalm_jax.parallel.distributed.initialize`."""


def parse(
    argv: Sequence[str], default_config: str, *, flags: Sequence[Flag] = (), positional: Sequence[str] = ()
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Parses a command line: ``--config``, ``--config.*`` overrides, `flags` and `positional` fields.

    Returns (config, {flag name: value}). Raises `ConfigError` naming what is wrong.
    """
    spec = str(config_file(default_config)) if default_config else None
    overrides: list[tuple[str, str]] = []
    values = {f.name: f.default for f in flags}
    by_name = {f.name: f for f in flags}
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(args):
            spec = args[i + 1]
            i += 1
        elif a.startswith("--config."):
            key, sep, raw = a[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(args):
                    raise ConfigError(f"--config.{key} needs a value (--config.{key}=VALUE)")
                raw = args[i + 1]
                i += 1
            overrides.append((key, raw))
        elif a.startswith("--") and a[2:].split("=", 1)[0].replace("-", "_") in by_name:
            name, sep, raw = a[2:].partition("=")
            flag = by_name[name.replace("-", "_")]
            if not sep:
                if flag.type is bool:
                    raw = "true"
                elif i + 1 < len(args):
                    raw = args[i + 1]
                    i += 1
                else:
                    raise ConfigError(f"--{name} needs a value")
            try:
                values[flag.name] = _parse_bool(raw, name) if flag.type is bool else flag.type(raw)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"--{name}={raw!r}: {e}") from None
        elif a in ("-h", "--help"):
            print(_usage(spec, flags, positional))
            raise SystemExit(0)
        elif a.startswith("-") and a != "-":
            known = ["--config", "--config.KEY"] + [f"--{f.name}" for f in flags]
            raise ConfigError(f"unknown flag {a.split('=', 1)[0]}; this command takes {', '.join(known)}")
        else:
            rest.append(a)
        i += 1
    if spec is None:
        raise ConfigError("--config is required (e.g. --config=train.py:tiny)")
    config = load_file(spec)
    if len(rest) > len(positional):
        raise ConfigError(
            f"unexpected arguments {rest[len(positional) :]}"
            + (f"; this command takes {' '.join(p.upper() for p in positional)}" if positional else "")
        )
    for name, raw in zip(positional, rest):
        apply_override(config, name, raw)
    for key, raw in overrides:
        apply_override(config, key, raw)
    return config, values


def _usage(spec: str | None, flags: Sequence[Flag], positional: Sequence[str]) -> str:
    """The help text: the flags, then the settings of the config `spec` (the default, or the one given)."""
    lines = [
        f"usage: {Path(sys.argv[0]).name} {' '.join(p.upper() for p in positional)} "
        f"[--config=FILE[:ARG]] [--config.KEY=VALUE ...]" + "".join(f" [--{f.name}=...]" for f in flags),
        f"  --config: {':'.join(x for x in resolve(spec) if x) if spec else '(required)'}",
    ]
    lines += [f"  --{f.name}: {f.help}" for f in flags]
    try:
        cfg = load_file(spec) if spec else None
    except ConfigError as e:
        cfg = None
        lines.append(f"({e})")
    if cfg is not None:
        lines.append("settings (--config.KEY=VALUE):")
        lines += [f"  {line}" for line in str(cfg).splitlines()]
    return "\n".join(lines)


def run(
    main: Callable[..., int | None],
    default_config: str,
    *,
    argv: Sequence[str] | None = None,
    flags: Sequence[Flag] = (),
    positional: Sequence[str] = (),
    errors: tuple[type[BaseException], ...] | Callable[[], tuple[type[BaseException], ...]] = (),
) -> int:
    """Parses the command line and calls ``main(config, **flag_values)``; returns its exit status.

    A `ConfigError` exits with status 2 and its message; so do `errors` raised by `main` (one line, no
    traceback), for the user errors a CLI wants reported plainly, and a missing optional package (the line
    names the extra to install, `kalm_jax.extras`). `errors` may be a function returning the tuple, called
    after parsing, so that ``--help`` works without the packages their modules import. With
    ``KALM_DEBUG=1`` in the environment their traceback is printed before that line.
    """
    from kalm_jax.extras import missing_extra_message

    argv = sys.argv[1:] if argv is None else list(argv)
    user_errors: tuple[type[BaseException], ...] = ()  # read when an exception is matched, after the assignment
    try:
        config, values = parse(argv, default_config, flags=flags, positional=positional)
        user_errors = errors() if callable(errors) else errors
        status = main(config, **values)
    except (ConfigError, *user_errors) as e:
        if debug():
            import traceback

            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return int(status or 0)


def debug() -> bool:
    """Whether ``KALM_DEBUG`` asks for tracebacks of user-facing errors (any value but '', 0, false, no)."""
    import os

    return os.environ.get("KALM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def setup_logging() -> None:
    """INFO logs of this project on stderr; Orbax's and Grain's per-file INFO records dropped."""
    import logging

    class _QuietLibraries(logging.Filter):
        def filter(self, record):
            path = record.pathname.replace("\\", "/")
            if "/orbax/" in path and record.levelno >= logging.ERROR and _disk_full_record(record):
                return False  # a failed save for lack of space is reported once, as DiskFullError
            return record.levelno > logging.INFO or not ("/orbax/" in path or "/grain/" in path)

    def _disk_full_record(record) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return "RESOURCE_EXHAUSTED" in text or "No space left on device" in text

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())


__all__ = [
    "run",
    "parse",
    "setup_logging",
    "DISTRIBUTED_FLAGS",
    "load_file",
    "apply_override",
    "parse_value",
    "config_file",
    "Flag",
    "ConfigError",
    "CONFIG_DIR",
]
