"""Settings of `kalm-verify-release PATH [--config.KEY=VALUE ...]`: the model-card example scored
and compared with the published KaLM-Reranker-V1 numbers."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.path = ""  # released checkpoint: HF directory (config.json, safetensors, tokenizer) (positional)
    c.variant = "auto"  # reference set: auto (by hidden size), nano, large, ...
    c.dtype = "bfloat16"  # the published numbers are bf16
    c.ratio = 4  # MEP ratio (the published numbers use 4)
    c.tokenizer = ""  # tokenizer file/dir if not inside PATH
    c.rtol = 1e-2  # relative tolerance on margins
    return c
