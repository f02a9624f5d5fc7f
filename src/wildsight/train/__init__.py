"""Training machinery: optimiser, schedules, checkpoints, distributed helpers, precision."""
