"""`python -m pocketd.trainer.convert GGUF OUT_DIR PARENT_PID`: the GGUF conversion in its own process.

Run by trainer.model.convert_gguf, which kills it on a stop request. It dies with its
parent (PR_SET_PDEATHSIG), writes why it failed to OUT_DIR/CONVERT_ERROR (exit 2), and
leaves the stages it finished in OUT_DIR (trainer.model.convert_stages).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "NO")

log = logging.getLogger("pocketd.trainer.convert")

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent exits (Linux, Android); exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        sys.exit(3)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        sys.stderr.write("usage: python -m pocketd.trainer.convert GGUF OUT_DIR PARENT_PID\n")
        return 2
    gguf, out_dir, parent = Path(args[0]), Path(args[1]), int(args[2])
    die_with_parent(parent)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .errors import ModelNotFound
    from .model import CONVERT_ERROR, convert_stages
    from .stopping import test_delay

    test_delay("converter")  # tests only: a conversion slow enough to be stopped on the tiny model

    try:
        convert_stages(gguf, out_dir)
    except ModelNotFound as e:
        (out_dir / CONVERT_ERROR).write_text(str(e), encoding="utf-8")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
