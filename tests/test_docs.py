"""Each docs page opens with a runnable example; this runs it (in a fresh interpreter, in a scratch directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
_FIRST_BLOCK = re.compile(r"\A# [^\n]+\n+```python\n(.*?)\n```", re.S)


def test_there_are_pages() -> None:
    names = {p.name for p in PAGES}
    assert {"getting-started.md", "configuration.md", "errors.md", "backends.md", "keys.md", "rate-limits.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_opens_with_a_runnable_example(page: Path, tmp_path: Path) -> None:
    match = _FIRST_BLOCK.match(page.read_text())
    assert match, f"{page.name} must open with its title and then a ```python example"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(script)]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{page.name}'s example failed:\n{out.stderr[-3000:]}"
