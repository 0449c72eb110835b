"""The training methods, one module each (registered in trainer.registry)."""
