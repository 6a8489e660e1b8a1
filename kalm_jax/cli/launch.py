"""`kalm-launch`: start N local processes of one JAX program (`kalm_jax.parallel.launch`)."""

from __future__ import annotations

import argparse
import sys

from kalm_jax.parallel import launch as launch_lib


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv and any(a in ("-h", "--help") for a in argv):
        print(
            "usage: kalm-launch -n N [--devices_per_process M] [--port P] [--grace S] -- "
            "(script.py | -m module | executable) ARGS...\n\n" + launch_lib.__doc__.strip()
        )
        return 0
    if "--" not in argv:
        print(
            "usage: kalm-launch -n N [--devices_per_process M] [--port P] [--grace S] -- "
            "(script.py | -m module | executable) ARGS...",
            file=sys.stderr,
        )
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="kalm-launch", description=launch_lib.__doc__.split("\n\n")[0])
    p.add_argument("-n", "--num_processes", type=int, required=True, help="processes to start")
    p.add_argument(
        "--devices_per_process",
        type=int,
        default=None,
        help="fake CPU devices per process (default: 8 // N, at least 1)",
    )
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds processes get after a SIGTERM (forwarded, or to the others when one process "
        "failed) before SIGKILL",
    )
    args = p.parse_args(argv[:cut])
    if args.num_processes < 1:
        p.error(f"-n must be >= 1, got {args.num_processes}")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        p.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
    if args.port is not None and not 1 <= args.port <= 65535:
        p.error(f"--port must be a TCP port in 1..65535, got {args.port}")
    if not args.grace >= 0:
        p.error(f"--grace must be >= 0 seconds, got {args.grace}")
    m = args.devices_per_process or max(1, 8 // args.num_processes)
    try:
        return launch_lib.launch(argv[cut + 1 :], args.num_processes, m, port=args.port, grace=args.grace)
    except ValueError as e:
        p.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
