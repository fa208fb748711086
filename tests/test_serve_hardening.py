"""Issue 11, serve: the SQLite key store is private (0600) with its -wal and -shm files; workers never see the
secret."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from ozwell_asgi.stores.urls import create_private_sqlite_file
from tests.test_cli import OZWELL_ENV, cli_env, create_key, serve_process

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in OZWELL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------- the key store's files


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The common umask (0022, files 0644 unless made otherwise), inherited by the processes a test starts."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("usual_umask")
def test_the_sqlite_key_store_and_its_wal_and_shm_files_are_private(tmp_path: Path) -> None:
    create_key(cwd=tmp_path)  # the default store, sqlite:///./ozwell.db
    assert stat.S_IMODE((tmp_path / "ozwell.db").stat().st_mode) == 0o600
    (tmp_path / "ozwell.db").unlink()
    with serve_process(cwd=tmp_path) as (base, _):  # serve makes it this time
        key = create_key(cwd=tmp_path)
        client = openai.OpenAI(api_key=key, base_url=base, max_retries=0)
        assert client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}]).choices
        files = {name: tmp_path / name for name in ("ozwell.db", "ozwell.db-wal", "ozwell.db-shm")}
        modes = {name: stat.S_IMODE(path.stat().st_mode) for name, path in files.items()}  # all exist while served
    assert modes == dict.fromkeys(files, 0o600)


def test_create_private_sqlite_file_only_creates_missing_sqlite_files(tmp_path: Path) -> None:
    made = create_private_sqlite_file(f"sqlite:///{tmp_path / 'a.db'}")
    assert made == tmp_path / "a.db"
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert create_private_sqlite_file(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}") is None  # exists: left alone
    existing = tmp_path / "shared.db"
    existing.touch(mode=0o640)
    assert create_private_sqlite_file(f"sqlite:///{existing}") is None
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    for url in (
        "memory://",
        "sqlite:///:memory:",
        "sqlite://",
        f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}",
        "postgresql://user@127.0.0.1:1/db",
        "redis://127.0.0.1:1/0",
        "sqlite:///file:x.db?mode=memory&uri=true",
    ):
        assert create_private_sqlite_file(url) is None, url
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "shared.db"]


# ------------------------------------------------------------------------------------ the workers' secret


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


def worker_environments(proc: Any, count: int) -> list[tuple[bytes, dict[str, str]]]:
    deadline = time.monotonic() + 30
    while True:
        envs = []
        for pid in descendants(proc.pid):
            try:
                envs.append((Path(f"/proc/{pid}/environ").read_bytes(), environ_of(pid)))
            except OSError:  # gone meanwhile
                continue
        if sum("OZWELL_STORE_URL" in env for _, env in envs) >= count or time.monotonic() > deadline:
            return envs
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ")
def test_workers_are_given_the_secret_files_path_never_the_secret(tmp_path: Path) -> None:
    key = create_key(cwd=tmp_path)
    secret = (tmp_path / "ozwell.secret").read_text().strip()
    with serve_process("--workers", "2", cwd=tmp_path) as (base, proc):
        envs = worker_environments(proc, 2)
        workers = [env for _, env in envs if "OZWELL_STORE_URL" in env]
        assert len(workers) >= 2
        for raw, env in envs:
            assert secret.encode() not in raw
            assert "OZWELL_SECRET" not in env
        assert {env["OZWELL_SECRET_FILE"] for env in workers} == {str((tmp_path / "ozwell.secret").resolve())}
        assert openai.OpenAI(api_key=key, base_url=base, max_retries=0).models.list().data


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ")
def test_a_secret_from_the_environment_reaches_workers_as_a_private_file(tmp_path: Path) -> None:
    secret = "an environment secret for the workers test"
    env = cli_env(OZWELL_SECRET=secret)
    key = create_key(cwd=tmp_path, env=env)
    with serve_process("--workers", "2", cwd=tmp_path, env=env) as (base, proc):
        envs = worker_environments(proc, 2)
        workers = [worker for _, worker in envs if "OZWELL_STORE_URL" in worker]
        assert len(workers) >= 2
        for raw, _ in envs:
            assert secret.encode() not in raw
        [path] = {Path(worker["OZWELL_SECRET_FILE"]) for worker in workers}
        assert path.read_text().strip() == secret
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert openai.OpenAI(api_key=key, base_url=base, max_retries=0).models.list().data
    assert not path.parent.exists()  # removed when serve exits
    assert not (tmp_path / "ozwell.secret").exists()
