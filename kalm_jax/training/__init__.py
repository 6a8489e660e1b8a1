"""Training: losses, optimiser, sharding, the jitted train step, checkpoints and the train loop."""
