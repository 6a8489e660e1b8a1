"""Settings of the conversion CLI: `kalm-convert COMMAND SOURCE [OUTPUT] [--config.KEY=VALUE ...]`.

COMMAND is `to-hf` (any checkpoint -> Hugging Face t5gemma2 directory), `from-hf` (HF directory -> kalm-jax
model checkpoint) or `inspect` (list tensors; with `against`, check them against a layout).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.command = ""  # to-hf | from-hf | inspect (first positional argument)
    c.source = ""  # checkpoint to read (second positional argument)
    c.output = ""  # directory to write (third positional argument; not for inspect)
    c.dtype = ""  # "" = bfloat16 for to-hf (the released dtype), float32 for from-hf (master weights)
    c.max_shard_size = "5GB"  # to-hf: shard size limit, e.g. 5GB, 500MB, 2GiB
    c.tokenizer = ""  # to-hf: tokenizer file or directory; "" = found beside the source
    c.vision_from = ""  # to-hf: HF directory whose vision tower / projector tensors are carried
    c.text_only = False  # to-hf: export without vision tensors even if the source had them
    c.dequantize = False  # to-hf: write a quantized checkpoint's weights as float (values x scales)
    c.overwrite = False  # replace an existing output directory (never the source)
    c.against = ""  # inspect: "hf" or "orbax" to report tensors that layout would miss or reject
    c.hf_config = ""  # inspect: config.json to check a lone .safetensors file against
    c.summary = False  # inspect: counts only, no per-tensor listing
    return c
