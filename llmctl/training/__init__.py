"""The training loop on Accelerate, with its optimizers, schedules, batches and checkpoints."""
