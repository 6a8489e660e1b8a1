"""Evaluation sweep settings for `eval.py` (ml_collections; override any field with --config.<name>=...).

Example:
  python eval.py --config=eval.py --config.checkpoint=CKPT --config.data_dir=DATA \
      --config.datasets=scifact,trec-dl-2019-passage --config.ratios=1,2,4,8,16,32 --config.output_dir=OUT
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # What to evaluate.
    c.checkpoint = ""  # one checkpoint: HF dir, kalm-jax model checkpoint, training step dir or workdir
    c.checkpoints = ""  # more checkpoints, comma-separated (joined with `checkpoint`); none: first stage only
    c.tokenizer = ""  # tokenizer.model; default: found in the checkpoint dir (or its workdir)
    c.data_dir = ""  # directory holding BEIR dataset folders
    c.datasets = "scifact"  # comma-separated dataset folder names under data_dir
    c.split = "test"  # qrels split
    c.ratios = "1,2,4,8,16,32"  # MEP ratios (comma-separated); passages are encoded once at their gcd
    c.instructions = "default"  # '|'-separated task instructions; 'default' = the released one, 'none' = no line
    c.system = ""  # system instruction; empty = the released one
    c.first_stage = "bm25"  # 'bm25' (built-in, bm25s) or 'run:<path>' (TREC run, relative to each dataset dir)
    c.top_k = 100  # candidates per query taken from the first stage and reranked
    c.cascade = ""  # 'COARSE:KEEP': score all at ratio COARSE, rescore the top KEEP at each ratio
    c.max_queries = 0  # evaluate only the first N judged queries (0 = all), for quick runs
    # Where results go.
    c.output_dir = ""  # results.jsonl, summary.md, results.csv, plots/, runs/
    c.store_dir = ""  # passage-state stores; default OUT/store
    c.storage = "float32"  # stored state dtype: float32 | bfloat16 | int8
    c.store_ratio = 0  # ratio passages are encoded at (0 = gcd of the ratios)
    c.on_stale = "error"  # a store written by another checkpoint/tokenizer/length: 'error' or 'reencode'
    c.store_lock_timeout = 3600.0  # seconds to wait while another run writes the same store (then fail naming it)
    c.on_unknown_docs = "error"  # run-file docs missing from the corpus: 'error' or 'drop' (with a warning)
    # Model and lengths.
    c.dtype = "float32"  # parameter dtype to load the checkpoint in (float32 | bfloat16)
    c.quantization = ""  # weights: int8 | int8-dynamic | fp8 | none (kalm_jax.model.quantization); "" = as loaded
    c.device_states = "compute"  # passage states to the score program: compute (dtype) | int8 (+ scale per window)
    c.max_document_tokens = 1024  # passage tokens (incl. the '<Document>: ' prefix)
    c.max_query_tokens = 512  # query tokens before the prompt template
    c.relevance_level = 0  # min grade counted relevant by binary measures (0 = per dataset: TREC DL 2, else 1)
    # Throughput.
    c.batch_pairs = 256  # (prompt, passage) pairs per scoring call, sharded over the local devices
    c.encode_batch_size = 64  # passages per encoder call
    c.shard_size = 4096  # passages per store shard
    c.progress = True
    c.report = True  # write summary.md, results.csv and plots at the end
    return c
