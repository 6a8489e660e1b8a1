"""Rerank server settings for `python -m kalm_jax.serve` / `kalm-serve` (override any field with --config.<name>=...).

Example:
  python -m kalm_jax.serve --config.checkpoint=CKPT --config.port=8080
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # The model (kalm_jax.checkpoints.loader.load; defaults are the released wrapper's).
    c.checkpoint = ""  # HF dir, kalm-jax model checkpoint, training step dir or workdir (required)
    c.tokenizer = ""  # tokenizer.model / tokenizer.json; default: the checkpoint's own
    c.dtype = ""  # float32 | bfloat16; empty = float32 on CPU, bfloat16 on accelerators
    c.quantization = ""  # weights: int8 | int8-dynamic | fp8 | none (kalm_jax.model.quantization); "" = as loaded
    c.device_states = "compute"  # passage states to the score program: compute (dtype) | int8 (+ scale per window)
    c.model_name = ""  # the name responses report; empty = the checkpoint folder's name
    c.ratio = 4  # MEP ratio of a request that names none (a request may ask for any ratio)
    c.max_query_tokens = 512  # query tokens before the prompt template
    c.max_document_tokens = 1024  # passage tokens (incl. the '<Document>: ' prefix)
    c.instruction = ""  # default task instruction; empty = the released one
    c.system = ""  # system instruction; empty = the released one
    # HTTP.
    c.host = "127.0.0.1"  # bind address (loopback by default; 0.0.0.0 exposes the server)
    c.port = 8080
    c.api_key = ""  # Bearer key guarding the rerank and passage routes; empty = $KALM_API_KEY, else no key
    c.payload_limit = 2_000_000  # request body bytes (413 beyond)
    c.max_client_batch_size = 256  # documents per rerank request / passages per registration (422 beyond)
    c.max_concurrent_requests = 512  # requests in flight (429 beyond)
    c.drain_timeout = 30.0  # seconds SIGTERM waits for in-flight requests before exiting anyway
    # The micro-batcher (one engine thread).
    c.max_batch_tokens = 16384  # padded tokens per engine call: rows = this // the shape's padded length
    c.max_batch_rows = 32  # rows per engine call at most (a power of two)
    c.max_wait_ms = 5.0  # how long a partly filled batch waits for more work
    # Passages by id.
    c.device_cache_bytes = 256 * 2**20  # device-resident passage states (per device; replicated)
    c.host_cache_bytes = 2 * 2**30  # host-memory passage states beyond the device budget (LRU)
    c.store_dir = ""  # where passages beyond the host budget go (LRU); empty = they are dropped
    c.warmup = True  # compile the common programs before /health answers 200
    c.log_level = "info"
    return c
