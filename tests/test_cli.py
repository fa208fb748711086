"""The ``ozwell-asgi`` command line: keys create/list/revoke/rotate in-process, argument errors, the secret file, and
``serve`` as real processes (the official SDK against it; exact rate limits across workers and hosts)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from ozwell_asgi.cli import SERVE_SETTINGS, ConnectionLimits, ServeConfig, build_parser, main
from ozwell_asgi.cli.settings import GROUPS, Setting, resolve, rows
from tests.conftest import PG_ADMIN_DB, PG_HOST, PG_PORT, PG_USER, need_service
from tests.harness import free_port, raw_client

# Every variable the CLI reads: each serve setting's (a secret's <env>_FILE too) and OZWELL_SECRET.
OZWELL_ENV = (
    *(item.env for item in SERVE_SETTINGS),
    *(item.file_env for item in SERVE_SETTINGS if item.secret),
    "OZWELL_SECRET",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No OZWELL_* setting leaks in from the machine, and relative defaults land in tmp_path."""
    for name in OZWELL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


class CLI:
    """Runs ``main`` in-process against one store and secret file, capturing its output."""

    def __init__(self, capsys: pytest.CaptureFixture[str], store: str, secret_file: Path) -> None:
        self.capsys = capsys
        self.store = store
        self.secret_file = secret_file

    def run(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(list(argv))
        out, err = self.capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    def create(self, *extra: str) -> tuple[str, str, str]:
        """Create a key; returns (id, secret, stdout)."""
        code, out, err = self.run(
            "keys", "create", "--name", "ci", "--store", self.store, "--secret-file", str(self.secret_file), *extra
        )
        assert code == 0, err
        secret = out.rstrip("\n").splitlines()[-1]
        key_id = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("id:"))
        return key_id, secret, out

    def list_json(self, *extra: str) -> list[dict[str, object]]:
        code, out, err = self.run("keys", "list", "--json", "--store", self.store, *extra)
        assert code == 0, err
        rows: list[dict[str, object]] = json.loads(out)
        return rows

    @property
    def server_secret(self) -> str:
        return self.secret_file.read_text().strip()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> CLI:
    return CLI(capsys, f"sqlite:///{tmp_path / 'keys.db'}", tmp_path / "test.secret")


def models_status(store: str, secret: str, key: str) -> int:
    """GET /v1/models with ``key`` on a fresh in-process app over ``store``: the HTTP status."""

    async def run() -> int:
        api = OzwellAPI(key_store=store, secret=secret, key_cache_ttl=0)
        try:
            async with raw_client(PrefixedApp(api)) as http:
                response = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
                return response.status_code
        finally:
            await api.aclose()

    return anyio.run(run)


def assert_is_key(line: str) -> None:
    assert line.startswith("ozw_")
    assert len(line) >= 36
    assert " " not in line


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A plain ``postgresql://`` URL of a database made for this test and dropped after it.

    Like conftest's ``postgres_url``, but a sync fixture: these tests call ``main``, which runs its own event loop.
    """
    need_service("PostgreSQL", PG_HOST, PG_PORT)
    import asyncpg

    name = f"ozwell_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    anyio.run(admin, f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        anyio.run(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------------------------- keys, in-process


def test_create_prints_the_secret_alone_on_the_last_line_and_it_authenticates(cli: CLI) -> None:
    key_id, secret, out = cli.create("--owner", "acme", "--plan", "pro", "--rpm", "7", "--expires-in", "30d")
    assert_is_key(secret)
    assert out.endswith(secret + "\n")
    assert key_id.startswith("key_")
    for shown in ("acme", "pro", "7 requests/min", "100000 tokens/min"):
        assert shown in out
    assert models_status(cli.store, cli.server_secret, secret) == 200
    assert models_status(cli.store, cli.server_secret, "ozw_" + "x" * 43) == 401
    # Another secret means other hashes: the key does not authenticate there.
    assert models_status(cli.store, "another secret of 32 bytes......", secret) == 401


def test_create_options_are_stored(cli: CLI) -> None:
    key_id, _, _ = cli.create("--models", "echo, gpt-*", "--scopes", "api,admin", "--tpm", "500", "--expires-in", "1h")
    [row] = cli.list_json()
    assert row["id"] == key_id
    assert row["models"] == ["echo", "gpt-*"]
    assert row["scopes"] == ["api", "admin"]
    assert row["plan"] == "free"
    assert (row["rpm"], row["tpm"]) == (20, 500)
    assert row["owner"] == "default"
    expires_at, created_at = row["expires_at"], row["created_at"]
    assert isinstance(expires_at, int) and isinstance(created_at, int)
    assert expires_at - created_at == 3600
    assert row["status"] == "active"


def test_list_never_shows_a_secret_or_hash(cli: CLI) -> None:
    from ozwell_asgi.auth import KeyHasher

    _, secret_a, _ = cli.create()
    cli.create("--owner", "other")
    hashes = [KeyHasher(cli.server_secret).hash(secret_a)]
    code, table, _ = cli.run("keys", "list", "--store", cli.store)
    assert code == 0
    _, as_json, _ = cli.run("keys", "list", "--json", "--store", cli.store)
    for out in (table, as_json):
        assert secret_a not in out
        assert hashes[0] not in out
        assert secret_a[:8] in out  # the hint, which tells keys apart
    lines = table.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "NAME", "OWNER", "PLAN"]
    assert len(lines) == 3
    rows = json.loads(as_json)
    assert {r["owner"] for r in rows} == {"default", "other"}
    assert not any("key_hash" in r for r in rows)
    assert [r["owner"] for r in cli.list_json("--owner", "other")] == ["other"]


def test_revoke_stops_the_key(cli: CLI) -> None:
    key_id, secret, _ = cli.create()
    keep_id, keep, _ = cli.create()
    assert models_status(cli.store, cli.server_secret, secret) == 200
    code, out, _ = cli.run("keys", "revoke", key_id, "--store", cli.store)
    assert code == 0
    assert key_id in out
    assert models_status(cli.store, cli.server_secret, secret) == 401
    assert models_status(cli.store, cli.server_secret, keep) == 200
    status = {r["id"]: r["status"] for r in cli.list_json()}
    assert status == {key_id: "revoked", keep_id: "active"}
    code, out, _ = cli.run("keys", "revoke", key_id, "--store", cli.store)  # idempotent
    assert code == 0
    assert "already revoked" in out


def test_rotate_replaces_the_secret(cli: CLI) -> None:
    key_id, old, _ = cli.create()
    code, out, _ = cli.run("keys", "rotate", key_id, "--store", cli.store, "--secret-file", str(cli.secret_file))
    assert code == 0
    new = out.rstrip("\n").splitlines()[-1]
    assert_is_key(new)
    assert new != old
    assert models_status(cli.store, cli.server_secret, new) == 200
    assert models_status(cli.store, cli.server_secret, old) == 401
    [row] = cli.list_json()
    assert row["id"] == key_id
    assert row["hint"] == new[:8]


def test_unknown_or_revoked_ids(cli: CLI) -> None:
    key_id, _, _ = cli.create()
    for command in (["revoke", "key_nope"], ["rotate", "key_nope", "--secret-file", str(cli.secret_file)]):
        code, out, err = cli.run("keys", *command, "--store", cli.store)
        assert code == 1
        assert "key_nope" in err
        assert out == ""
    cli.run("keys", "revoke", key_id, "--store", cli.store)
    code, out, err = cli.run("keys", "rotate", key_id, "--store", cli.store, "--secret-file", str(cli.secret_file))
    assert code == 1
    assert "revoked" in err
    assert "ozw_" not in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "required"),
        (["keys"], "required"),
        (["frobnicate"], "invalid choice"),
        (["keys", "create"], "--name"),
        (["keys", "create", "--name", "x", "--plan", "gold"], "plan"),
        (["keys", "create", "--name", "x", "--rpm", "-1"], "rpm"),
        (["keys", "create", "--name", "x", "--rpm", "0"], "rpm"),
        (["keys", "create", "--name", "x", "--tpm", "many"], "--tpm"),
        (["keys", "create", "--name", "x", "--expires-in", "3q"], "duration"),
        (["keys", "create", "--name", "x", "--expires-in", "0"], "duration"),
        (["keys", "create", "--name", "x", "--scopes", "api,root"], "scope"),
        (["keys", "create", "--name", "x", "--models", ","], "--models"),
        (["keys", "create", "--name", ""], "name"),
        (["keys", "create", "--name", "x", "--store", "ftp://host/db"], "unsupported key store"),
        (["keys", "list", "--store", "not a url"], "key store"),
        (["keys", "list", "--store", "postgresql://user:hunter2@127.0.0.1:1/db"], "key store"),
        (["keys", "list", "--store", "sqlite:////nonexistent-dir/x/y.db"], "key store"),
        (["keys", "revoke"], "ID"),
        (["serve", "--store", "ftp://host/db"], "unsupported key store"),
        (["serve", "--store", "postgresql://user:hunter2@127.0.0.1:1/db"], "key store"),
        (["serve", "--limiter", "nosuch://x"], "--limiter"),
        (["serve", "--limiter", "no-scheme"], "--limiter"),
        (["serve", "--on-limiter-error", "maybe"], "--on-limiter-error must be one of closed, open, got 'maybe'"),
        (["serve", "--log-level", "loud"], "--log-level"),
        (["serve", "--workers", "many"], "--workers must be an integer >= 1, got 'many'"),
        (["serve", "--host", " "], "--host"),
        (["serve", "--key-cache-ttl", "nan"], "--key-cache-ttl"),
        (["serve", "--timeout-headers", "inf"], "--timeout-headers"),
        (["serve", "--access-log=yes"], "--access-log"),
        (["serve", "--backend", ""], "--backend"),
        (["serve", "--upstream-key", " "], "--upstream-key must be a non-empty string"),
        (["serve", "--workers", "0"], "--workers"),
        (["serve", "--port", "http"], "--port"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--key-cache-ttl", "-1"], "--key-cache-ttl"),
        (["serve", "--limit-concurrency", "-1"], "--limit-concurrency"),
        (["serve", "--limit-concurrency", "many"], "--limit-concurrency"),
        (["serve", "--timeout-headers", "0"], "--timeout-headers"),
        (["serve", "--timeout-headers", "soon"], "--timeout-headers"),
        (["serve", "--max-header-size", "100"], "--max-header-size"),
        (["serve", "--timeout-keep-alive", "-1"], "--timeout-keep-alive"),
        (["serve", "--backlog", "0"], "--backlog"),
        (["serve", "--timeout-graceful-shutdown", "-5"], "--timeout-graceful-shutdown"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if argv[:2] == ["keys", "create"] and "--store" not in argv:
        argv = [*argv, "--store", f"sqlite:///{tmp_path / 'k.db'}"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0
    assert "ozw_" not in out
    assert "Traceback" not in err
    assert "hunter2" not in err  # a store URL's password is never echoed
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle.lower() in lines[0].lower()


@pytest.mark.parametrize(
    "argv",
    [[], ["serve"], ["keys"], ["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["keys", "rotate"]],
)
def test_help_works_for_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("usage: ozwell-asgi")


# ------------------------------------------------------------------------------------------- secret and environment


def test_secret_file_is_created_0600_once_and_reused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    assert main(["keys", "create", "--name", "a", "--store", store]) == 0
    first_out, err = capsys.readouterr()
    path = tmp_path / "ozwell.secret"  # the default, relative to the working directory
    assert "ozwell.secret" in err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_text()
    assert len(bytes.fromhex(content.strip())) == 32
    assert main(["keys", "create", "--name", "b", "--store", store]) == 0
    second_out, err = capsys.readouterr()
    assert err == ""  # nothing new was created
    assert path.read_text() == content
    for out in (first_out, second_out):
        assert models_status(store, content.strip(), out.splitlines()[-1]) == 200
    assert sorted(p.name for p in tmp_path.iterdir() if "secret" in p.name) == ["ozwell.secret"]  # no temp files


def test_secret_file_from_env_and_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    monkeypatch.setenv("OZWELL_SECRET_FILE", str(tmp_path / "env.secret"))
    assert main(["keys", "create", "--name", "a", "--store", store]) == 0
    assert (tmp_path / "env.secret").exists()
    assert (
        main(["keys", "create", "--name", "a", "--store", store, "--secret-file", str(tmp_path / "flag.secret")]) == 0
    )
    assert (tmp_path / "flag.secret").exists()
    assert not (tmp_path / "ozwell.secret").exists()
    capsys.readouterr()


def test_secret_file_flag_wins_over_env_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'k.db'}"
    monkeypatch.setenv("OZWELL_SECRET", "an environment secret, long enough")
    secret_file = tmp_path / "flag.secret"
    assert main(["keys", "create", "--name", "f", "--store", store, "--secret-file", str(secret_file)]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    file_secret = secret_file.read_text().strip()
    assert models_status(store, file_secret, key) == 200
    assert models_status(store, "an environment secret, long enough", key) == 401


def test_rotate_never_creates_the_secret_file(cli: CLI, tmp_path: Path) -> None:
    key_id, _, _ = cli.create()
    missing = tmp_path / "missing.secret"
    code, _, err = cli.run("keys", "rotate", key_id, "--store", cli.store, "--secret-file", str(missing))
    assert code == 1
    assert "missing.secret" in err
    assert not missing.exists()
    # list and revoke do not need the secret at all
    code, _, _ = cli.run("keys", "list", "--store", cli.store)
    assert code == 0
    code, _, _ = cli.run("keys", "revoke", key_id, "--store", cli.store)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if "secret" in p.name) == ["test.secret"]


def test_env_store_and_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env_store = f"sqlite:///{tmp_path / 'env.db'}"
    secret = "an environment secret, long enough"
    monkeypatch.setenv("OZWELL_STORE_URL", env_store)
    monkeypatch.setenv("OZWELL_SECRET", secret)
    assert main(["keys", "create", "--name", "from-env"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert not (tmp_path / "ozwell.secret").exists()  # OZWELL_SECRET wins: no file is made
    assert not (tmp_path / "ozwell.db").exists()
    assert models_status(env_store, secret, key) == 200
    assert main(["keys", "list", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["from-env"]
    # the flag wins over the environment
    flag_store = f"sqlite:///{tmp_path / 'flag.db'}"
    assert main(["keys", "list", "--json", "--store", flag_store]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_short_env_secret_is_rejected(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OZWELL_SECRET", "short")
    assert main(["keys", "create", "--name", "x", "--store", "memory://"]) != 0
    err = capsys.readouterr().err
    assert "OZWELL_SECRET" in err
    assert "16 bytes" in err


def test_concurrent_processes_agree_on_one_secret_file(tmp_path: Path) -> None:
    from ozwell_asgi.cli import resolve_secret

    path = tmp_path / "race.secret"
    code = f"import sys; from ozwell_asgi.cli import resolve_secret; print(resolve_secret({str(path)!r}, create=True))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert {out.strip() for out, _ in outputs} == {path.read_text().strip()}
    assert sum("created a new key-hashing secret" in err for _, err in outputs) == 1
    assert resolve_secret(str(path), create=False) == path.read_text().strip()


def test_serve_hands_its_settings_to_workers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import uvicorn

    from ozwell_asgi.cli import _ServedApp, app_from_env

    monkeypatch.setattr(os, "environ", dict(os.environ))  # serve exports its settings; keep them out of other tests
    calls: list[tuple[object, dict[str, object]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    store = f"sqlite:///{tmp_path / 'w.db'}"
    monkeypatch.setenv("OZWELL_STORE_URL", "ftp://ignored-because-the-flag-wins")
    argv = [
        "serve",
        "--store",
        store,
        "--key-cache-ttl",
        "0",
        "--on-limiter-error",
        "open",
        "--limiter-namespace",
        "n1",
    ]
    assert main([*argv, "--workers", "3", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err
    assert "memory://" in err  # limits would be per worker
    [(target, options)] = calls
    assert target == "ozwell_asgi.cli:app_from_env"
    assert (options["factory"], options["workers"], options["port"]) == (True, 3, 0)
    secret = (tmp_path / "ozwell.secret").read_text().strip()
    assert "OZWELL_SECRET" not in os.environ  # workers are told where the secret is, never what it is
    assert secret not in "".join(os.environ.values())
    assert os.environ["OZWELL_SECRET_FILE"] == str((tmp_path / "ozwell.secret").resolve())
    assert os.environ["OZWELL_STORE_URL"] == store
    assert os.environ["OZWELL_LIMITER_URL"] == "memory://"
    assert os.environ["OZWELL_LIMITER_NAMESPACE"] == "n1"
    assert float(os.environ["OZWELL_KEY_CACHE_TTL"]) == 0
    assert os.environ["OZWELL_ON_LIMITER_ERROR"] == "open"

    # what each worker builds from those variables serves keys made by the CLI
    assert main(["keys", "create", "--name", "w", "--store", store, "--rpm", "1"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    app = app_from_env()
    assert isinstance(app, _ServedApp)

    async def statuses() -> list[int]:
        try:
            async with raw_client(app) as http:
                auth = {"Authorization": f"Bearer {key}"}
                return [(await http.get("/v1/models", headers=auth)).status_code for _ in range(2)]
        finally:
            await app.api.aclose()
            await app.limiter.aclose()

    assert anyio.run(statuses) == [200, 429]

    # one worker: the app itself, no factory and no exported settings needed
    calls.clear()
    assert main([*argv, "--port", "0"]) == 0
    [(target, options)] = calls
    assert isinstance(target, PrefixedApp)
    assert "workers" not in options
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the serve settings

# Every serve setting's flag, variable and default, as people use them outside this test suite.
SERVE_NAMES = [
    ("--host", "OZWELL_HOST", "127.0.0.1"),
    ("--port", "OZWELL_PORT", 8000),
    ("--workers", "OZWELL_WORKERS", 1),
    ("--log-level", "OZWELL_LOG_LEVEL", "info"),
    ("--access-log", "OZWELL_ACCESS_LOG", True),
    ("--reload", "OZWELL_RELOAD", False),
    ("--backend", "OZWELL_BACKEND", "echo"),
    ("--upstream-key", "OZWELL_UPSTREAM_KEY", None),
    ("--store", "OZWELL_STORE_URL", "sqlite:///./ozwell.db"),
    ("--files", "OZWELL_FILES_URL", None),
    ("--responses", "OZWELL_RESPONSES_URL", None),
    ("--file-content", "OZWELL_FILE_CONTENT_URL", None),
    ("--limiter", "OZWELL_LIMITER_URL", "memory://"),
    ("--limiter-namespace", "OZWELL_LIMITER_NAMESPACE", "ozwell"),
    ("--key-cache-ttl", "OZWELL_KEY_CACHE_TTL", 5.0),
    ("--sources-model", "OZWELL_SOURCES_MODEL", None),
    ("--on-limiter-error", "OZWELL_ON_LIMITER_ERROR", "closed"),
    ("--cors-origin", "OZWELL_CORS_ORIGINS", None),
    ("--secret-file", "OZWELL_SECRET_FILE", "./ozwell.secret"),
    ("--limit-concurrency", "OZWELL_LIMIT_CONCURRENCY", 1000),
    ("--timeout-headers", "OZWELL_TIMEOUT_HEADERS", 10.0),
    ("--max-header-size", "OZWELL_MAX_HEADER_SIZE", 32768),
    ("--timeout-keep-alive", "OZWELL_TIMEOUT_KEEP_ALIVE", 5.0),
    ("--backlog", "OZWELL_BACKLOG", 2048),
    ("--timeout-graceful-shutdown", "OZWELL_TIMEOUT_GRACEFUL_SHUTDOWN", 10.0),
]

# setting -> (its variable's text, its value; the flag's arguments, their value): none of them the default.
OTHER_VALUES: dict[str, tuple[str, object, list[str], object]] = {
    "host": ("10.1.2.3", "10.1.2.3", ["--host", "::1"], "::1"),
    "port": ("9001", 9001, ["--port", "0"], 0),
    "workers": ("3", 3, ["--workers", "2"], 2),
    "log_level": ("debug", "debug", ["--log-level", "warning"], "warning"),
    "access_log": ("off", False, ["--access-log"], True),
    "reload": ("yes", True, ["--no-reload"], False),
    "backend": (
        "pkg.mod:thing",
        "pkg.mod:thing",
        ["--backend", "openai+http://127.0.0.1:9/v1"],
        "openai+http://127.0.0.1:9/v1",
    ),
    "upstream_key": ("sk-from-env", "sk-from-env", ["--upstream-key", "sk-from-flag"], "sk-from-flag"),
    "store_url": ("sqlite:///env.db", "sqlite:///env.db", ["--store", "memory://"], "memory://"),
    "files_url": ("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0", ["--files", "memory://"], "memory://"),
    "responses_url": ("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0", ["--responses", "memory://"], "memory://"),
    "file_content_url": ("file:///srv/files", "file:///srv/files", ["--file-content", "store"], "store"),
    "limiter_url": (
        "redis://127.0.0.1:1/0",
        "redis://127.0.0.1:1/0",
        ["--limiter", "async+memory://"],
        "async+memory://",
    ),
    "limiter_namespace": ("env-ns", "env-ns", ["--limiter-namespace", "flag-ns"], "flag-ns"),
    "key_cache_ttl": ("0.5", 0.5, ["--key-cache-ttl", "0"], 0.0),
    "sources_model": ("env-embed", "env-embed", ["--sources-model", "echo-embedding"], "echo-embedding"),
    "on_limiter_error": ("open", "open", ["--on-limiter-error", "closed"], "closed"),
    "cors_origins": (
        " https://App.Example.com/ ,*",
        ("https://app.example.com", "*"),
        ["--cors-origin", "https://a.example.com:443", "--cors-origin", "http://localhost:5173,https://*.example.org"],
        ("https://a.example.com", "http://localhost:5173", "https://*.example.org"),
    ),
    "secret_file": ("/etc/env.secret", "/etc/env.secret", ["--secret-file", "flag.secret"], "flag.secret"),
    "limit_concurrency": ("0", 0, ["--limit-concurrency", "5"], 5),
    "timeout_headers": ("2.5", 2.5, ["--timeout-headers", "1"], 1.0),
    "max_header_size": ("4096", 4096, ["--max-header-size", "2048"], 2048),
    "timeout_keep_alive": ("0", 0.0, ["--timeout-keep-alive", "3"], 3.0),
    "backlog": ("64", 64, ["--backlog", "16"], 16),
    "timeout_graceful_shutdown": ("1", 1.0, ["--timeout-graceful-shutdown", "0"], 0.0),
}


def test_every_serve_setting_keeps_its_flag_variable_and_default() -> None:
    assert [(item.flag, item.env, item.default) for item in SERVE_SETTINGS] == SERVE_NAMES


@pytest.mark.parametrize("item", SERVE_SETTINGS, ids=lambda item: item.name)
def test_each_serve_setting_is_its_flag_else_its_variable_else_its_default(
    item: Setting, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_text, env_value, flag_argv, flag_value = OTHER_VALUES[item.name]
    [group] = [group for group in GROUPS if item in rows(group)]

    def value(*argv: str) -> object:
        return getattr(resolve(group, build_parser().parse_args(["serve", *argv])), item.name)

    assert value() == item.default
    monkeypatch.setenv(item.env, env_text)
    assert value() == env_value
    assert value(*flag_argv) == flag_value
    monkeypatch.setenv(item.env, "  ")  # blank counts as unset
    assert value() == item.default


def test_a_secret_setting_may_come_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "key").write_text("sk-from-a-file\n")
    monkeypatch.setenv("OZWELL_UPSTREAM_KEY_FILE", str(tmp_path / "key"))
    assert resolve(ServeConfig).upstream_key == "sk-from-a-file"
    monkeypatch.setenv("OZWELL_UPSTREAM_KEY", "sk-from-the-variable")  # the variable wins over the file
    assert resolve(ServeConfig).upstream_key == "sk-from-the-variable"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OZWELL_HOST", " "),
        ("OZWELL_PORT", "http"),
        ("OZWELL_PORT", "70000"),
        ("OZWELL_WORKERS", "0"),
        ("OZWELL_LOG_LEVEL", "loud"),
        ("OZWELL_ACCESS_LOG", "maybe"),
        ("OZWELL_ON_LIMITER_ERROR", "maybe"),
        ("OZWELL_KEY_CACHE_TTL", "-1"),
        ("OZWELL_TIMEOUT_HEADERS", "nan"),
        ("OZWELL_LIMIT_CONCURRENCY", "-1"),
        ("OZWELL_MAX_HEADER_SIZE", "1k"),
        ("OZWELL_LIMITER_URL", "nosuch://x"),
        ("OZWELL_CORS_ORIGINS", "https://app.example.com,null"),
        ("OZWELL_BACKEND", "vllm"),
        ("OZWELL_UPSTREAM_KEY_FILE", "/nonexistent-dir/key"),
    ],
)
def test_bad_variables_exit_2_with_one_line_naming_them(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv(name, value)
    if name == "OZWELL_HOST":
        monkeypatch.setenv(name, "")  # blank is unset: only a flag can be blank
        assert main(["serve", "--host", value]) == 2
        assert "--host" in capsys.readouterr().err
        return
    assert main(["serve", "--store", f"sqlite:///{tmp_path / 'k.db'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ozwell-asgi: error: {name}")
    assert not (tmp_path / "k.db").exists()  # refused before anything was made


def test_the_app_settings_reach_workers_and_back_without_a_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = ServeConfig(
        backend="openai+http://127.0.0.1:9/v1",
        upstream_key="sk-upstream-key-never-exported",
        store_url="sqlite:///w.db",
        files_url="sqlite:///files.db",
        responses_url="sqlite:///responses.db",
        file_content_url="file:///srv/files",
        limiter_url="redis://127.0.0.1:1/0",
        limiter_namespace="ns",
        key_cache_ttl=0.25,
        sources_model="echo-embedding",
        on_limiter_error="open",
        cors_origins=("https://app.example.com", "https://*.example.org"),
        secret_file=str(tmp_path / "ozwell.secret"),
        secret="a key-hashing secret, never exported",
    )
    assert "never" not in repr(config)
    files: dict[str, str] = {}

    def private_file(name: str, value: str) -> str:
        (tmp_path / name).write_text(value)
        files[name] = value
        return str(tmp_path / name)

    exported = config.to_env(private_file)
    assert "never" not in "".join(exported.values())
    assert files == {"upstream_key": "sk-upstream-key-never-exported"}
    plain = {item.env for item in rows(ServeConfig) if not item.secret}
    assert set(exported) == plain | {"OZWELL_UPSTREAM_KEY_FILE"}
    for name, text in exported.items():
        monkeypatch.setenv(name, text)
    assert resolve(ServeConfig) == dataclasses.replace(config, secret="")  # a worker reads the secret itself
    with pytest.raises(ValueError, match="absolute"):
        dataclasses.replace(config, secret_file="ozwell.secret").to_env(private_file)
    with pytest.raises(ValueError, match="--key-cache-ttl"):
        dataclasses.replace(config, key_cache_ttl=-1)
    with pytest.raises(ValueError, match="--max-header-size must be an integer >= 1024, got 100"):
        ConnectionLimits(max_header_size=100)


def test_serve_hands_the_backend_to_workers_and_its_key_only_as_a_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import uvicorn

    monkeypatch.setattr(os, "environ", dict(os.environ))
    seen: list[tuple[dict[str, object], dict[str, str], str]] = []

    def run(app: object, **options: object) -> None:
        key_file = os.environ.get("OZWELL_UPSTREAM_KEY_FILE", "")
        seen.append((options, dict(os.environ), Path(key_file).read_text() if key_file else ""))

    monkeypatch.setattr(uvicorn, "run", run)
    key = "sk-upstream-key-for-the-workers"
    monkeypatch.setenv("OZWELL_UPSTREAM_KEY", key)
    monkeypatch.setenv("OZWELL_ACCESS_LOG", "off")
    monkeypatch.setenv("OZWELL_WORKERS", "2")
    store = f"sqlite:///{tmp_path / 'w.db'}"
    assert main(["serve", "--store", store, "--backend", "openai+http://user:hunter2@127.0.0.1:9/v1?k=v"]) == 0
    err = capsys.readouterr().err
    [(options, environ, key_file_text)] = seen
    assert options["workers"] == 2
    assert options["access_log"] is False
    assert environ["OZWELL_BACKEND"] == "openai+http://user:hunter2@127.0.0.1:9/v1?k=v"
    assert "OZWELL_UPSTREAM_KEY" not in environ
    assert key not in "".join(environ.values())
    assert key_file_text.strip() == key
    assert not Path(environ["OZWELL_UPSTREAM_KEY_FILE"]).exists()  # removed when serve returned
    # the banner names the backend, never its password, query or key
    assert "serving http://127.0.0.1:8000/v1 on the backend openai+http://127.0.0.1:9/v1 with an upstream key, 2" in err
    assert "hunter2" not in err
    assert key not in err
    assert "k=v" not in err


def test_the_serve_table_in_the_docs_lists_every_setting() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    section = page.split("## `ozwell-asgi serve`", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| `--")]
    for item in SERVE_SETTINGS:
        [line] = [line for line in lines if line.startswith((f"| `{item.flag} ", f"| `{item.flag}`"))]
        assert f"`{item.env}`" in line
        assert (f"| `{item.shown_default()}`" if item.default is not None else "| none |") in line, line
    assert len(lines) == len(SERVE_SETTINGS)


def test_keys_against_postgres(pg_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plain = pg_url  # a plain postgresql:// URL, as people paste it
    cli = CLI(capsys, plain, tmp_path / "pg.secret")
    key_id, secret, _ = cli.create("--plan", "enterprise", "--rpm", "5")
    assert_is_key(secret)
    [row] = cli.list_json()
    assert (row["id"], row["rpm"], row["tpm"]) == (key_id, 5, None)
    assert models_status(plain, cli.server_secret, secret) == 200
    code, out, _ = cli.run("keys", "rotate", key_id, "--store", plain, "--secret-file", str(cli.secret_file))
    assert code == 0
    new = out.splitlines()[-1]
    assert models_status(plain, cli.server_secret, new) == 200
    assert models_status(plain, cli.server_secret, secret) == 401
    assert cli.run("keys", "revoke", key_id, "--store", plain)[0] == 0
    assert models_status(plain, cli.server_secret, new) == 401


# ------------------------------------------------------------------------------------------------ real processes


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OZWELL_ENV}
    env.update(extra)
    return env


def run_cli(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ozwell_asgi", *argv],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def create_key(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """``ozwell-asgi keys create ... | tail -1``."""
    done = run_cli("keys", "create", "--name", "ci", *argv, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    key = done.stdout.splitlines()[-1]
    assert_is_key(key)
    return key


@contextmanager
def serving(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """``ozwell-asgi serve --port P ...`` as a subprocess, until it answers; yields its base URL (…/v1)."""
    with serve_process(*argv, cwd=cwd, env=env) as (base, _):
        yield base


@contextmanager
def serve_process(
    *argv: str, cwd: Path, env: dict[str, str] | None = None, prelude: str = ""
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like :func:`serving`, yielding the process too; ``prelude`` (Python statements: rlimits, umask) runs in that
    process before it becomes ``serve`` (an ``exec``, so the pid stays the server's)."""
    port = free_port()
    log = (cwd / f"serve-{port}.log").open("w")
    launch = [sys.executable]
    if prelude:
        launch += ["-c", f"{prelude}; import os, sys; os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]
    proc = subprocess.Popen(
        [*launch, "-m", "ozwell_asgi", "serve", "--port", str(port), "--log-level", "warning", *argv],
        cwd=cwd,
        env=env or cli_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so its workers can be killed with it
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}: {(cwd / f'serve-{port}.log').read_text()}")
            try:
                if httpx.get(base + "/models", timeout=2).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("serve did not answer within 60 s")
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def wait_for_fresh_window(margin: float = 3.0) -> None:
    """Limit windows are clock-aligned minutes: keep a burst clear of a minute boundary."""
    into = time.time() % 60
    if into > 60 - margin:
        time.sleep(60 - into + 0.5)


async def burst(urls: list[str], key: str, count: int) -> list[httpx.Response]:
    """``count`` concurrent GET /models, round-robin over ``urls``, each on a fresh connection."""
    responses: list[httpx.Response] = []

    async def one(i: int) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            responses.append(
                await http.get(urls[i % len(urls)] + "/models", headers={"Authorization": f"Bearer {key}"})
            )

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return responses


def assert_exactly_admitted(responses: list[httpx.Response], budget: int) -> None:
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * budget + [429] * (len(responses) - budget), statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.slow
def test_serve_with_the_openai_sdk(tmp_path: Path) -> None:
    store = "sqlite:///tmp.db"
    key = create_key("--store", store, cwd=tmp_path)
    with serving("--store", store, cwd=tmp_path) as base:
        client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        completion = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi there"}])
        assert completion.choices[0].message.content
        assert completion.usage is not None
        chunks = list(
            client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "stream me"}], stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "echo" in [m.id for m in client.models.list()]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="ozw_" + "x" * 43, max_retries=0).models.list()
        # a key created while the server runs works at once; a revoked one stops within the key cache TTL
        second = run_cli("keys", "create", "--name", "late", "--store", store, cwd=tmp_path)
        late = second.stdout.splitlines()[-1]
        assert openai.OpenAI(base_url=base, api_key=late, max_retries=0).models.list().data
        assert httpx.get(base.removesuffix("/v1") + "/elsewhere").status_code == 404
    assert (tmp_path / "ozwell.secret").exists()


@pytest.mark.slow
def test_two_workers_share_one_redis_budget_exactly(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    key = create_key("--store", store, "--plan", "free", "--rpm", "7", cwd=tmp_path)
    argv = ("--workers", "2", "--limiter", redis_url, "--limiter-namespace", redis_prefix, "--store", store)
    with serving(*argv, cwd=tmp_path) as base:
        wait_for_fresh_window()
        responses = anyio.run(burst, [base], key, 40)
    assert_exactly_admitted(responses, 7)


@pytest.mark.slow
def test_two_hosts_share_redis_and_postgres_exactly(
    tmp_path: Path, redis_url: str, redis_prefix: str, pg_url: str
) -> None:
    store = pg_url
    env = cli_env(OZWELL_SECRET="a shared secret for both hosts", OZWELL_LIMITER_NAMESPACE=redis_prefix)
    key = create_key("--store", store, "--plan", "free", "--rpm", "7", cwd=tmp_path, env=env)
    argv = ("--limiter", redis_url, "--store", store)
    with serving(*argv, cwd=tmp_path, env=env) as one, serving(*argv, cwd=tmp_path, env=env) as two:
        wait_for_fresh_window()
        responses = anyio.run(burst, [one, two], key, 40)
    assert_exactly_admitted(responses, 7)
    assert not (tmp_path / "ozwell.secret").exists()
