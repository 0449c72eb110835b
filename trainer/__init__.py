"""Model loading, the ZO step, training sessions, replay, evaluation, generation.

This package's __init__ imports nothing heavy: the daemon reads `trainer.config`
without loading torch.

pocketd never downloads anything: every transformers call uses local_files_only,
and importing this package turns Hugging Face hub access off for the process (and
its children) before transformers or huggingface_hub are imported, unless the
user set these variables themselves.
"""

import os as _os

_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# transformers 5 would otherwise reach for hub kernels (the `kernels` package, which downloads).
_os.environ.setdefault("USE_HUB_KERNELS", "NO")
