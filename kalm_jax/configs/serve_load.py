"""Load-test settings for `python -m kalm_jax.serve.loadtest` (override any field with --config.<name>=...).

Example:
  python -m kalm_jax.serve.loadtest --config.checkpoint=CKPT --config.data_dir=DATA --config.output=OUT.md
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # the checkpoint the server and the engine baseline load (required)
    c.dtype = "float32"
    c.data_dir = ""  # BEIR datasets; documents and queries come from <data_dir>/<dataset> (required)
    c.dataset = "scifact"
    c.corpus_size = 512  # documents registered by id (and drawn from for inline requests)
    c.max_document_chars = 1000  # documents cut to this many characters
    c.ratio = 4  # the ratio requests are scored at (passages registered at it)
    c.clients = 32  # concurrent clients
    c.duration = 60.0  # measured seconds per scenario
    c.warmup = 30.0  # unmeasured seconds per scenario first (compiles every shape the scenario meets)
    c.docs_per_request = 16
    c.scenarios = "inline,ids"  # inline: texts in the request; ids: passages registered by id
    c.server_args = ""  # extra --config.KEY=VALUE arguments for the server, space-separated
    c.engine_pairs = 2048  # pairs the engine baseline scores per scenario
    c.seed = 0
    c.output = ""  # markdown table (and a .json beside it); empty = stdout only
    return c
