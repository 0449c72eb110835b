"""Every Python example in the README runs as written.

Each ```python block is run in its own interpreter, in an empty folder holding a `notes/`
folder with two notes (the examples ingest "notes/"), with HOME and the XDG dirs private
to the test. A block may continue an earlier one if it starts with `# continued`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)


def _programs() -> list[str]:
    programs: list[str] = []
    for block in BLOCKS:
        if block.startswith("# continued") and programs:
            programs[-1] += "\n" + block
        else:
            programs.append(block)
    return programs


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("program", _programs(), ids=lambda p: p.splitlines()[0][:40])
def test_example_runs(program: str, tmp_path: Path, isolated_home: Path) -> None:
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "garden.md").write_text("Planted garlic in the south bed on the first of October.\n")
    (work / "notes" / "bread.txt").write_text("Rye starter: feed it twice a day, keep it warm.\n")
    script = work / "example.py"
    script.write_text(program)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"README example failed:\n{program}\n--- stderr ---\n{out.stderr[-3000:]}"
