"""``ozwell-asgi serve`` and files: by default metadata in the key store's SQLite file (one engine) and the bytes
in a directory beside it; ``--files`` and ``--file-content`` (a directory, or the store itself); real processes,
the official SDK."""

from __future__ import annotations

import stat
from pathlib import Path

import openai
import pytest

from tests.test_cli import cli_env, create_key, run_cli, serving

pytestmark = pytest.mark.slow


def round_trip(base: str, key: str) -> str:
    client = openai.OpenAI(api_key=key, base_url=base, max_retries=0)
    created = client.files.create(file=("notes.txt", b"hello files" * 1000), purpose="user_data")
    assert client.files.content(created.id).content == b"hello files" * 1000
    assert [f.id for f in client.files.list()] == [created.id]
    client.close()
    return created.id


def test_serve_keeps_files_beside_its_sqlite_database(tmp_path: Path) -> None:
    key = create_key(cwd=tmp_path)
    with serving(cwd=tmp_path) as base:
        file_id = round_trip(base, key)
    content = tmp_path / "ozwell-files"
    assert content.is_dir()
    assert stat.S_IMODE(content.stat().st_mode) == 0o700
    stored = [p for p in content.rglob("*") if p.is_file() and file_id in p.name]
    assert len(stored) == 1 and stored[0].stat().st_size == len(b"hello files" * 1000)
    with serving(cwd=tmp_path) as base:  # a restart finds it again
        client = openai.OpenAI(api_key=key, base_url=base, max_retries=0)
        assert client.files.retrieve(file_id).bytes == len(b"hello files" * 1000)
        client.close()


def test_files_and_file_content_flags(tmp_path: Path) -> None:
    key = create_key(cwd=tmp_path)
    files_db = tmp_path / "files.db"
    with serving("--files", f"sqlite:///{files_db}", "--file-content", "store", cwd=tmp_path) as base:
        round_trip(base, key)
    assert files_db.is_file()
    assert stat.S_IMODE(files_db.stat().st_mode) == 0o600
    assert not (tmp_path / "files-files").exists()  # the bytes are in the store itself
    elsewhere = tmp_path / "blobs"
    env = cli_env(OZWELL_FILE_CONTENT_URL=elsewhere.as_uri())
    with serving(cwd=tmp_path, env=env) as base:
        round_trip(base, key)
    assert any(p.is_file() for p in elsewhere.rglob("*"))


def test_a_bad_file_content_url_exits_2(tmp_path: Path) -> None:
    done = run_cli("serve", "--file-content", "ftp://example/files", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("ozwell-asgi: error: --file-content: ")
    assert len(done.stderr.strip().splitlines()) == 1
