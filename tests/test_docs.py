"""Every fenced code block of README.md and docs/*.md is run or checked here; a block that is neither fails.

The convention (docs/contributing.md says the same, for whoever writes a page):

- A page's blocks run in order, in one scratch directory per page, so what one block makes (``./ozwell.secret``
  from ``ozwell-asgi keys create``, a database file) is there for the next, as for a reader following the page.
- ```` ```python ```` blocks run, each in a fresh interpreter from a file of its own (``__file__`` is set): a
  block is self-contained (it imports what it uses; no name carries over from the block before), so a reader can
  copy any one of them.
- ```` ```sh ````, ```` ```bash ````, ```` ```shell ```` and ```` ```console ```` blocks run with ``bash -euo
  pipefail``; ``ozwell-asgi`` and ``python`` on their ``PATH`` are this checkout's, and no ``OZWELL_*`` variable
  leaks in from the machine.
- ```` ```json ```` blocks must parse as JSON, ```` ```toml ```` blocks as TOML.
- Any block that cannot run here (it starts a server, needs one, installs packages, is another program's
  configuration) is preceded by the marker ``<!-- not-run: REASON -->`` on the line before it, with a REASON of at
  least three words. A block of any other language needs the marker too. The test checks every marker has its
  reason; a block with neither a way to run nor a marker fails.
- Every page has a paragraph starting ``Install:`` before its first block, giving the install line its examples need
  (from a checkout, ``pip install -e ".[testing]"`` for the in-process examples: they use the ``testing`` extra's
  ``openai`` and ``httpx2``); the test checks that it names the extras the page's python blocks import. No page
  promises ``pip install ozwell-asgi`` from the package index: it is not published yet.
- Each docs/ page opens with its title, its install line, then a ```` ```python ```` example that runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)(?P<rest>.*)$")
NOT_RUN = re.compile(r"^<!-- not-run: (?P<reason>.+?) -->$")
SHELLS = {"sh", "bash", "shell", "console"}
INSTALL = re.compile(r"^Install:", re.M)
PYPI_PROMISE = re.compile(r"pip install\s+['\"]?ozwell-asgi\b")
# A python block importing one of these needs its install line to name one of the words beside it.
EXTRAS = {
    "httpx2": ("[testing]", "[dev]"),
    "openai": ("[testing]", "[dev]"),
    "pytest": ("[testing]", "[dev]"),
    "asgi_lifespan": ("[testing]", "[dev]"),
    "fastapi": ("fastapi", "[dev]"),
    "django": ("django",),
    "redis": ("redis", "[dev]"),
    "asyncpg": ("postgres", "[dev]"),
}
BLOCK_TIMEOUT = 120


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the marker's reason, or None

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ```{self.lang}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, in order, with the not-run marker on the line before each, if any."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{page.name}:{start + 1}: a code block that never closes"
        before = lines[start - 1].strip() if start > 0 else ""
        marker = NOT_RUN.match(before)
        if before.startswith("<!--") and "not-run" in before:
            assert marker is not None, f"{page.name}:{start}: write the marker as <!-- not-run: REASON -->"
        code = "\n".join(lines[start + 1 : end]) + "\n"
        found.append(Block(page.name, start + 1, match["lang"].lower(), code, marker["reason"] if marker else None))
        i = end + 1
    return found


def shims(directory: Path) -> Path:
    """A directory of ``ozwell-asgi`` and ``python`` commands that run this checkout with this interpreter."""
    bin_dir = directory / ".bin"
    bin_dir.mkdir(exist_ok=True)
    for name, command in (("ozwell-asgi", f'"{sys.executable}" -m ozwell_asgi'), ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)
    return bin_dir


def environment(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OZWELL_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{shims(scratch)}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_block(block: Block, scratch: Path, env: dict[str, str]) -> None:
    if block.lang == "python":
        # A file of its own, as a reader would save it: ``__file__`` is set (a test file that runs itself works).
        script = scratch / f"block_{Path(block.page).stem.replace('-', '_')}_{block.line}.py"
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    assert done.returncode == 0, f"{block} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def check_block(block: Block, scratch: Path, env: dict[str, str]) -> None:
    """Run or check one block, or check its not-run marker has a reason."""
    if block.not_run is not None:
        assert len(block.not_run.split()) >= 3, f"{block}: say why it is not run, in a few words"
        return
    if block.lang == "python" or block.lang in SHELLS:
        run_block(block, scratch, env)
    elif block.lang == "json":
        try:
            json.loads(block.code)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{block} is not JSON: {exc}")
    elif block.lang == "toml":
        try:
            tomllib.loads(block.code)
        except tomllib.TOMLDecodeError as exc:
            pytest.fail(f"{block} is not TOML: {exc}")
    else:
        pytest.fail(f"{block}: no way to run a ```{block.lang or '(no language)'} block; mark it <!-- not-run: why -->")


def test_there_are_pages() -> None:
    names = {p.name for p in PAGES}
    assert {"getting-started.md", "configuration.md", "errors.md", "backends.md", "keys.md", "rate-limits.md"} <= names
    assert "contributing.md" in names  # where the convention above is written for page authors


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_block_runs_or_says_why_not(page: Path, tmp_path: Path) -> None:
    blocks = blocks_of(page)
    env = environment(tmp_path)
    for block in blocks:
        check_block(block, tmp_path, env)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_page_says_what_to_install_and_promises_no_index(page: Path) -> None:
    text = page.read_text()
    blocks = blocks_of(page)
    assert PYPI_PROMISE.search(text) is None, f"{page.name} promises ozwell-asgi from the package index"
    if not blocks:
        return
    first_block = sum(len(line) + 1 for line in text.splitlines()[: blocks[0].line - 1])
    install = INSTALL.search(text, 0, first_block)
    assert install is not None, f"{page.name}: a line starting 'Install:' must come before the first code block"
    end = text.find("\n\n", install.start())
    install_line = " ".join(text[install.start() : end if end >= 0 else len(text)].split())  # its paragraph
    for block in blocks:
        if block.lang != "python":
            continue
        for module, words in EXTRAS.items():
            if re.search(rf"^\s*(?:from|import) {module}\b", block.code, re.M):
                assert any(word in install_line for word in words), (
                    f"{block} imports {module}: the install line must name {' or '.join(words)}: {install_line}"
                )


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent.name == "docs"], ids=lambda p: p.name)
def test_each_docs_page_opens_with_a_runnable_example(page: Path) -> None:
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# "), f"{page.name} must open with its title"
    blocks = blocks_of(page)
    if page.name == "contributing.md":
        return
    assert blocks, f"{page.name} has no example"
    assert blocks[0].lang == "python", f"{page.name}'s first block must be a ```python example"
    assert blocks[0].not_run is None, f"{page.name}'s opening example must run"
    between = [line for line in lines[1 : blocks[0].line - 1] if line.strip()]
    assert len(between) <= 3 and any(line.startswith("Install:") for line in between), between


def test_the_parser_sees_markers_and_languages(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# T\n\nInstall: x\n\n```python\nprint(1)\n```\n\n<!-- not-run: starts a server here -->\n```sh\nozwell-asgi"
        " serve\n```\n\n```\nplain\n```\n"
    )
    first, second, third = blocks_of(page)
    assert (first.lang, first.code, first.not_run) == ("python", "print(1)\n", None)
    assert (second.lang, second.not_run, second.line) == ("sh", "starts a server here", 10)
    assert third.lang == ""
    env = environment(tmp_path)
    check_block(first, tmp_path, env)
    check_block(second, tmp_path, env)  # not run: it would serve forever
    with pytest.raises(pytest.fail.Exception, match="no way to run"):
        check_block(third, tmp_path, env)
    with pytest.raises(AssertionError, match="say why"):
        check_block(Block("p", 1, "sh", "x", "because"), tmp_path, env)
    with pytest.raises(AssertionError, match="failed"):
        check_block(Block("p", 1, "sh", "false\n", None), tmp_path, env)
    with pytest.raises(pytest.fail.Exception, match="not JSON"):
        check_block(Block("p", 1, "json", "{'a': 1}", None), tmp_path, env)
