"""Training on every rank: the loop, the step and its health checks, generation, checkpoints,
the bundled corpus and fp16 loss scaling."""
