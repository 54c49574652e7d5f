"""Training on every rank: the loop, the step and its health checks, generation, checkpoints,
the bundled corpus (byte-level, or tokenised by a Hugging Face tokenizer for --init-from) and fp16
loss scaling."""
