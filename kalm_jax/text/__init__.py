"""Text: SentencePiece and tokenizer.json tokenizers, and the reranking prompt."""
