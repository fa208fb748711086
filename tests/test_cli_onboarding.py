"""What a new user trips on: the CLI's secret in a mounted app, missing drivers, serve's log lines and banner,
``--version``, ``--reload``, and a host running with ``-W error``."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import anyio
import httpx
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from ozwell_asgi.cli import build_parser, load_secret, main
from ozwell_asgi.cli.serve import LOG_FORMAT, install_log_handler
from tests.harness import raw_client
from tests.redis_server import PrivateRedis
from tests.test_cli import OZWELL_ENV, cli_env, create_key, serve_process

ROOT = Path(__file__).resolve().parent.parent
# A line of serve's log handler: "2026-01-01 12:00:00,123 WARNING ozwell_asgi.ratelimit: ..."
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in OZWELL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def models_status(api: OzwellAPI, key: str) -> int:
    async def run() -> int:
        try:
            async with raw_client(PrefixedApp(api)) as http:
                return (await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code
        finally:
            await api.aclose()

    return anyio.run(run)


# ------------------------------------------------------------------------------------------------------ the secret


def test_a_mounted_app_uses_the_cli_secret_through_load_secret(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    assert main(["keys", "create", "--name", "me", "--store", store]) == 0  # makes ./ozwell.secret
    key = capsys.readouterr().out.splitlines()[-1]
    secret = load_secret()
    assert secret == (tmp_path / "ozwell.secret").read_text().strip()
    assert models_status(OzwellAPI(key_store=store, secret=secret), key) == 200
    # the file's trailing newline is not part of the secret: reading the file raw is what made every key 401
    raw = (tmp_path / "ozwell.secret").read_text()
    assert raw.endswith("\n")
    assert models_status(OzwellAPI(key_store=store, secret=raw), key) == 401


def test_whitespace_around_a_secret_in_a_file_is_ignored(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    padded = tmp_path / "padded.secret"
    padded.write_text("  a secret written by hand, with spaces  \r\n\n")
    assert main(["keys", "create", "--name", "me", "--store", store, "--secret-file", str(padded)]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    secret = "a secret written by hand, with spaces"
    assert load_secret(padded) == secret
    assert models_status(OzwellAPI(key_store=store, secret=secret), key) == 200
    monkeypatch.setenv("OZWELL_SECRET", f"\n{secret}\n")  # the variable is stripped alike
    assert load_secret() == secret
    assert main(["keys", "create", "--name", "again", "--store", store]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert models_status(OzwellAPI(key_store=store, secret=load_secret()), key) == 200


def test_load_secret_never_creates_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ozwell\.secret does not exist and OZWELL_SECRET is not set"):
        load_secret()
    assert not (tmp_path / "ozwell.secret").exists()
    (tmp_path / "short.secret").write_text("short\n")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        load_secret(tmp_path / "short.secret")


def test_secret_file_help_states_the_precedence_the_code_has(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for argv in (["serve", "--help"], ["keys", "create", "--help"], ["keys", "rotate", "--help"]):
        assert main(argv) == 0
        text = " ".join(capsys.readouterr().out.split())
        help_text = text.split("--secret-file PATH", 2)[-1]
        order = [
            help_text.index(word) for word in ("wins over $OZWELL_SECRET", "$OZWELL_SECRET_FILE", "./ozwell.secret")
        ]
        assert order == sorted(order), help_text
    # ... and the code: the flag, else OZWELL_SECRET, else the file OZWELL_SECRET_FILE names, else ./ozwell.secret
    files = {name: tmp_path / f"{name}.secret" for name in ("flag", "env-file", "default")}
    for name, path in files.items():
        path.write_text(f"the {name} secret, long enough\n")
    files["default"].rename(tmp_path / "ozwell.secret")
    assert load_secret() == "the default secret, long enough"
    monkeypatch.setenv("OZWELL_SECRET_FILE", str(files["env-file"]))
    assert load_secret() == "the env-file secret, long enough"
    monkeypatch.setenv("OZWELL_SECRET", "the variable's secret, long enough")
    assert load_secret() == "the variable's secret, long enough"
    assert load_secret(files["flag"]) == "the flag secret, long enough"


# ------------------------------------------------------------------------------------------------- missing drivers

# Runs the CLI (or Python code) in a fresh interpreter in which the named top-level modules cannot be imported.
BLOCKER = """
import sys

class Blocker:
    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker(set(sys.argv.pop(1).split(","))))
"""


def without(modules: str, *argv: str, code: str = "", cwd: Path) -> subprocess.CompletedProcess[str]:
    """``ozwell-asgi ARGV`` (or ``code``) in a fresh interpreter where ``modules`` (comma-separated) are missing."""
    body = code or "from ozwell_asgi.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + body, modules, *argv],
        cwd=cwd,
        env=cli_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_postgres_store_without_asyncpg_says_which_extra_to_install(tmp_path: Path) -> None:
    for argv in (
        ["keys", "list", "--store", "postgresql://app:hunter2@127.0.0.1:1/db"],
        ["keys", "create", "--name", "x", "--store", "postgres://app:hunter2@127.0.0.1:1/db"],
        ["serve", "--port", "0", "--store", "postgresql+asyncpg://app:hunter2@127.0.0.1:1/db"],
    ):
        done = without("asyncpg", *argv, cwd=tmp_path)
        assert done.returncode == 1, done
        [line] = done.stderr.splitlines()
        assert line.startswith("ozwell-asgi: error: --store: the postgres")
        assert "asyncpg, which is not installed: install ozwell-asgi[postgres]" in line
        assert "hunter2" not in line
        assert "ModuleNotFoundError" not in line
    assert not (tmp_path / "ozwell.secret").exists()  # nothing was made for a command that could not run


def test_a_redis_limiter_without_redis_fails_at_startup(tmp_path: Path) -> None:
    began = time.monotonic()
    done = without("redis", "serve", "--port", "0", "--limiter", "redis://127.0.0.1:6379/0", cwd=tmp_path)
    assert done.returncode == 1, done
    [line] = done.stderr.splitlines()
    assert line.startswith("ozwell-asgi: error: --limiter: the redis:// rate limiter needs redis")
    assert "install ozwell-asgi[redis]" in line
    assert time.monotonic() - began < 30
    assert "serving" not in done.stderr  # it never started
    done = without("redis", "serve", "--port", "0", "--store", "redis://127.0.0.1:1/0", cwd=tmp_path)
    assert done.returncode == 1
    assert "the redis key store needs redis, which is not installed: install ozwell-asgi[redis]" in done.stderr


def test_an_app_built_with_a_missing_driver_fails_at_construction(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        from ozwell_asgi import OzwellAPI

        for kwargs in ({"rate_limiter": "redis://127.0.0.1:6379/0"}, {"key_store": "redis://127.0.0.1:1/0"}):
            try:
                OzwellAPI(secret="s" * 32, **kwargs)
            except ImportError as exc:
                print(exc)
            else:
                print("built")
        """
    )
    done = without("redis", code=code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("the redis:// rate limiter needs redis, which is not installed")
    assert lines[1].startswith("the redis storage needs redis, which is not installed")
    assert all("install ozwell-asgi[redis]" in line for line in lines)
    done = without("asyncpg", code=code.replace("redis://127.0.0.1:1/0", "postgresql://u@127.0.0.1:1/db"), cwd=tmp_path)
    assert "the postgresql storage needs asyncpg, which is not installed: install ozwell-asgi[postgres]" in done.stdout


# ------------------------------------------------------------------------------------------------- -W error


def test_the_first_request_works_in_a_host_running_with_w_error(tmp_path: Path) -> None:
    """bpe-openai's tables load through a deprecated importlib.resources call; that must not fail a request."""
    code = textwrap.dedent(
        """
        import asyncio

        import httpx
        import openai

        from ozwell_asgi import OzwellAPI


        async def main():
            api = OzwellAPI()
            _, key = await api.keys.create(name="w", owner="me")
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api, root_path="/v1"))
            client = openai.AsyncOpenAI(api_key=key, base_url="http://test/v1", http_client=http, max_retries=0)
            reply = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
            print(reply.choices[0].message.content, reply.usage.prompt_tokens)
            await http.aclose()
            await api.aclose()


        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=tmp_path,
        env=cli_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    content, prompt_tokens = done.stdout.split()
    assert content == "hi"
    assert int(prompt_tokens) > 0


# ------------------------------------------------------------------------------------------------- serve


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ozwell-asgi {version('ozwell-asgi')}"


def test_the_banner_names_the_url_the_backend_and_every_store_without_passwords(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
    monkeypatch.setattr(logging.getLogger("ozwell_asgi"), "handlers", [])
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    argv = ["serve", "--port", "8123", "--store", store, "--files", "redis://app:hunter2@127.0.0.1:1/2?ssl_key=x"]
    argv += ["--limiter", "redis://:sekrit@127.0.0.1:1/0", "--on-limiter-error", "open"]
    assert main(argv) == 0
    [line] = [line for line in capsys.readouterr().err.splitlines() if "serving" in line]
    assert line == (
        "ozwell-asgi: serving http://127.0.0.1:8123/v1 on the backend echo; "
        f"keys in sqlite:///{tmp_path / 'keys.db'}, files in redis://app@127.0.0.1:1/2, "
        "rate limits in redis://127.0.0.1:1/0 (fail open)"
    )
    # the default layout: keys and files in ./ozwell.db, file bytes beside it
    assert main(["serve", "--port", "8123"]) == 0
    [line] = [line for line in capsys.readouterr().err.splitlines() if "serving" in line]
    assert line.endswith(
        "keys in sqlite:///./ozwell.db, files in sqlite:///./ozwell.db "
        f"(bytes in {(tmp_path / 'ozwell-files').as_uri()}), rate limits in memory:// (fail closed)"
    )


def test_the_log_handler_has_time_and_level_unless_the_host_configured_logging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger = logging.getLogger("ozwell_asgi")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert install_log_handler("info")
    assert not install_log_handler("info")  # once
    logging.getLogger("ozwell_asgi.ratelimit").info("rate-limit storage recovered; counting resumes")
    logging.getLogger("ozwell_asgi.ratelimit").debug("not at info")
    [line] = err.getvalue().splitlines()
    match = LOG_LINE.match(line)
    assert match is not None, line
    assert match["level"] == "INFO"
    assert match["logger"] == "ozwell_asgi.ratelimit"
    assert LOG_FORMAT.startswith("%(asctime)s %(levelname)s")
    # a host that configured logging keeps its own
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
    assert not install_log_handler("debug")
    assert logger.handlers == []


@pytest.mark.slow
@pytest.mark.services
def test_serve_logs_the_limiter_outage_and_its_recovery_with_time_and_level(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    key = create_key("--store", store, cwd=tmp_path)
    argv = ("--store", store, "--limiter", private_redis.url, "--on-limiter-error", "open", "--log-level", "info")
    with serve_process(*argv, "--no-access-log", cwd=tmp_path) as (base, _):
        log = tmp_path / f"serve-{base.split(':')[2].split('/')[0]}.log"
        client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        assert client.models.list().data
        private_redis.stop()
        assert client.models.list().data  # admitted uncounted: fail open
        private_redis.start()
        deadline = time.monotonic() + 30
        while "recovered" not in log.read_text():  # the pool reconnects on a later call
            assert client.models.list().data
            assert time.monotonic() < deadline, log.read_text()
    lines = [LOG_LINE.match(line) for line in log.read_text().splitlines()]
    ours = [(m["level"], m["message"]) for m in lines if m is not None and m["logger"] == "ozwell_asgi.ratelimit"]
    assert [level for level, _ in ours] == ["WARNING", "INFO"], ours
    assert ours[0][1].startswith("rate-limit storage unavailable (")
    assert ours[0][1].endswith("admitting requests unlimited until it recovers")
    assert ours[1][1] == "rate-limit storage recovered; counting resumes"
    banner = [line for line in log.read_text().splitlines() if "ozwell-asgi: serving" in line]
    assert banner and f"{base} on the backend echo" in banner[0]


@pytest.mark.slow
def test_serve_reload_starts_a_server_that_answers(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    key = create_key("--store", store, cwd=tmp_path)
    with serve_process("--store", store, "--reload", cwd=tmp_path) as (base, _):
        models = httpx.get(base + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["echo", "echo-embedding"]


def test_reload_with_workers_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--reload", "--workers", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ozwell-asgi: error: --reload runs one server process: it cannot be used with --workers"
    )


def test_reload_hands_the_factory_its_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import uvicorn

    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.setattr(logging.getLogger("ozwell_asgi"), "handlers", [])
    calls: list[tuple[object, dict[str, object]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    store = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["serve", "--store", store, "--reload", "--log-level", "debug"]) == 0
    [(target, options)] = calls
    assert (target, options["factory"], options["reload"]) == ("ozwell_asgi.cli:app_from_env", True, True)
    assert "workers" not in options
    assert os.environ["OZWELL_STORE_URL"] == store
    assert os.environ["OZWELL_LOG_LEVEL"] == "debug"
    assert "reloading on code changes" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--no-reload"]).reload is False
