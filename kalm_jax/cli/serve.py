"""`kalm-serve` / `python -m kalm_jax.serve`: the rerank server (Cohere, Jina/vLLM and TEI routes, passages by id).

    kalm-serve --config.checkpoint=CKPT [--config.host=127.0.0.1 --config.port=8080 --config.api_key=KEY]

One process owns the devices and one inference engine; FastAPI routes feed a token-budget micro-batcher
(`kalm_jax.serve`). Needs the ``[serve]`` extra. SIGTERM (or Ctrl-C) stops accepting connections, finishes the
requests in flight (up to ``drain_timeout`` seconds) and exits. See docs/serving.md.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kalm_jax import cli

log = logging.getLogger(__name__)


def run(config) -> int:
    """Loads the checkpoint and serves until SIGTERM / SIGINT (the CLI's body, after parsing)."""
    if not config.checkpoint:
        raise cli.ConfigError("config.checkpoint is required")
    if not Path(config.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {config.checkpoint} does not exist")
    if config.max_batch_rows < 1 or config.max_batch_tokens < 1 or config.max_concurrent_requests < 1:
        raise cli.ConfigError("max_batch_rows, max_batch_tokens and max_concurrent_requests must be positive")
    cli.setup_logging()
    import signal

    import uvicorn

    # uvicorn drains on SIGTERM / SIGINT, restores the previous handlers and raises the signal again: this
    # handler turns that (or a signal during start-up) into a clean exit with status 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit)

    from kalm_jax.serve.app import Service, create_app

    service = Service.from_config(config)
    app = create_app(service)
    key = "set" if service.api_key else "none (rerank routes are open)"
    log.info("serving %s on http://%s:%d (API key: %s)", service.model_name, config.host, config.port, key)
    uvicorn.run(
        app,
        host=config.host,
        port=int(config.port),
        log_level=str(config.log_level),
        timeout_graceful_shutdown=float(config.drain_timeout),
    )
    return 0


def _exit(signum, frame) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli.run(run, "serve.py", argv=argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
