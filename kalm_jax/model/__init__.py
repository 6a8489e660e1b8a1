"""The T5Gemma 2 encoder-decoder: config, layers, attention, the model, MEP pooling."""
