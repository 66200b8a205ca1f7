"""cocoa.train: the training application. Config and presets, preflight checks, data and batches,
the stage runner (stages 1-3, resume, checkpoints), distributed setup (DDP / FSDP2), metrics."""
