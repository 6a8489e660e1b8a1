"""Settings of `kalm-tokenizer --config.KEY=VALUE ...`: a SentencePiece tokenizer trained with the
Gemma special-token layout from BEIR corpus passages and/or text files."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out = ""  # output directory; tokenizer.model is written there (required)
    c.beir = ()  # BEIR dataset directories whose corpus passages to train on
    c.text = ()  # text files, one training text per line (.gz ok); beir and/or text is required
    c.vocab_size = 8000  # pieces in the vocabulary
    c.max_texts = 200_000  # training texts read at most (beir first, then text)
    c.model_type = "unigram"  # unigram | bpe
    c.gemma_layout = True  # turn markers at 105/106 (Gemma); false: at 4/5
    return c
