"""Settings of `kalm-export SOURCE OUTPUT [--config.KEY=VALUE ...]`: a training run's model
with LoRA merged, written as a standalone kalm-jax model checkpoint (with the run's tokenizer)."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = ""  # training workdir, step dir, model checkpoint or HF dir (positional)
    c.output = ""  # model checkpoint directory to write (positional)
    c.keep_lora = False  # keep the adapters separate (no merge)
    c.quantization = ""  # write int8 | int8-dynamic | fp8 weights (kalm_jax.model.quantization); "" = as loaded
    c.overwrite = False
    return c
