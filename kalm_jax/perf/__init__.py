"""Performance: TPU ahead-of-time analysis, the benchmark suite, FLOP counts and TPU planning."""
