"""MTEB evaluation settings for `python -m kalm_jax.mteb` / `kalm-mteb` (override any field with --config.<name>=...).

Example:
  python -m kalm_jax.mteb --config.checkpoint=CKPT --config.data_dir=DATA --config.tasks=local:scifact,local:adi \
      --config.output_dir=OUT
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # The model (kalm_jax.mteb.KaLMJaxReranker; defaults are the released wrapper's).
    c.checkpoint = ""  # HF dir, kalm-jax model checkpoint, training step dir or workdir (required)
    c.tokenizer = ""  # tokenizer.model / tokenizer.json; default: the checkpoint's own
    c.dtype = ""  # float32 | bfloat16; empty = float32 on CPU, bfloat16 on accelerators
    c.ratio = 4  # MEP ratio the pairs are scored at
    c.encode_ratio = 0  # ratio documents are encoded (and stored) at, a divisor of ratio (0 = ratio)
    c.max_query_tokens = 512  # query tokens before the prompt template
    c.max_document_tokens = 1024  # passage tokens (incl. the '<Document>: ' prefix)
    c.instruction = ""  # task instruction when a task has no 'instruction' column; empty = the released one
    c.system = ""  # system instruction; empty = the released one
    c.batch_size = 32  # documents per encoder call
    c.score_batch_size = 256  # (prompt, passage) pairs per decoder call
    c.store_dir = ""  # passage-state store reused across runs (documents keyed by the sha256 of their text)
    c.storage = ""  # stored state dtype: float32 | bfloat16 | int8; empty = the model's compute dtype
    c.name = ""  # model name in MTEB's results; empty = kalm-jax/<checkpoint folder name>
    # The tasks: comma-separated; 'local:<dataset>' = a BEIR folder under data_dir (kalm_jax.mteb.local_task),
    # any other name = an MTEB task whose data is already in the Hugging Face cache (nothing is downloaded).
    c.tasks = ""
    c.data_dir = ""  # directory holding BEIR dataset folders (local tasks)
    c.split = "test"  # qrels split of local tasks
    c.first_stage = "bm25"  # local tasks' candidates: 'bm25' or 'run:<path>' (relative to each dataset dir)
    c.top_k = 100  # candidates per query taken from the first stage
    c.max_queries = 0  # local tasks: only the first N judged queries (0 = all)
    # Where results go.
    c.output_dir = ""  # MTEB's result cache: OUT/results/<model>/<revision>/.../<task>.json
    c.overwrite = "only-missing"  # MTEB overwrite strategy: only-missing | always | never
    c.save_predictions = False  # also write MTEB's per-query scores to OUT/predictions/
    c.progress = False
    return c
