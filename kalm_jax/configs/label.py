"""Settings of the `label` command (`kalm-label --config.KEY=VALUE ...`): teacher scores
written into training JSONL for stage-3 distillation."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher = ""  # teacher checkpoint: HF dir (tokenizer.model or tokenizer.json), export, workdir
    c.input = ""  # training JSONL to score
    c.output = ""  # where the labelled copy goes (never the input)
    c.tokenizer = ""  # tokenizer file/dir; "" = the teacher's own
    c.ratio = 4  # MEP ratio the teacher scores at
    c.format = "prob"  # "prob" (teacher P(yes), matches loss.teacher_format="prob") or "logit" (margin)
    c.max_document_tokens = 512  # passage tokens (the '<Document>: ' prefix included); training length
    c.max_query_tokens = 128  # query tokens; training length
    c.batch_size = 64  # passages / pairs per device step
    c.dtype = ""  # parameter dtype to load the teacher in; "" = the checkpoint's own
    c.quantization = ""  # teacher weights: int8 | int8-dynamic | fp8 | none (model.quantization); "" = as loaded
    c.device_states = "compute"  # passage states to the score program: compute (dtype) | int8 (+ scale per window)
    c.shard_size = 1024  # examples per shard: the unit split across processes and resumed after a kill
    return c
