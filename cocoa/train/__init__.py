"""cocoa.train: the training application. Config and presets, preflight checks, the run directory, data
and batches, the method adapter, the stage runner (build / resume / steps / finish), checkpoints,
distributed setup (DDP / FSDP2), metrics; ``cocoa.train.run.run_training`` chains the stages."""
