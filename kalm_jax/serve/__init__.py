"""The rerank server: Cohere (`/v2/rerank`), Jina/vLLM (`/v1/rerank`) and TEI (`/rerank`) routes over one
inference engine, with passages registered once by id (`/v1/passages`) and scored by the decoder alone.

  app.py      FastAPI routes, schemas, limits, the `Service` they share
  batcher.py  the token-budget micro-batcher and its engine thread (fixed shapes per key: batch-independent scores)
  cache.py    passage states by id: device budget -> host memory -> store directory (LRU)
  metrics.py  Prometheus metrics
  loadtest.py a bounded asyncio load test against a running server

Start it with ``python -m kalm_jax.serve --config.checkpoint=DIR`` (`kalm_jax.cli.serve`); needs the ``[serve]``
extra. See docs/serving.md.
"""
