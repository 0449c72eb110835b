"""Model loading, the ZO step, training sessions, replay, evaluation, generation.

This package's __init__ imports nothing heavy: the daemon reads `trainer.config`
without loading torch.
"""
