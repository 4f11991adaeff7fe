"""Training loop, evaluation, checkpoints, timing and the run orchestration around them."""
