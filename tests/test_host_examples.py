"""The host examples run: examples/fastapi_app.py, examples/starlette_app.py and examples/production.py in-process
through the official SDK and raw HTTP (production against the machine's PostgreSQL and Redis, and under its own
``__main__``), and examples/django_project both in-process with asgi-lifespan and under uvicorn with
``--lifespan on``, as its asgi.py says to run it."""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio.to_thread
import httpx2
import openai
import pytest
from asgi_lifespan import LifespanManager

from ozwell_asgi import OzwellAPI
from tests.harness import async_openai, free_port, raw_client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DJANGO_PROJECT = EXAMPLES / "django_project"
SECRET = "x" * 32
HI = [{"role": "user", "content": "hello host"}]


def started(app: Any) -> LifespanManager:
    """asgi-lifespan's manager, patient: loading the tokenizer takes seconds on a busy machine."""
    return LifespanManager(app, startup_timeout=120, shutdown_timeout=60)


@contextmanager
def fresh_import(name: str) -> Iterator[ModuleType]:
    """Import ``name`` anew (the examples read the environment at import), and forget it afterwards."""
    sys.modules.pop(name, None)
    try:
        yield importlib.import_module(name)
    finally:
        sys.modules.pop(name, None)


# -- the host pages --------------------------------------------------------------------------------------------

HOST_PAGES = ("fastapi.md", "starlette.md", "django.md", "mounting.md")


@pytest.mark.parametrize("page", HOST_PAGES)
def test_host_pages_python_blocks_compile_and_name_real_examples(page: str) -> None:
    """tests/test_docs.py runs each page's first block; the rest are fragments, which must at least be Python, and
    every example a page names must exist."""
    text = (ROOT / "docs" / page).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, re.S | re.M)
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, page, "exec")
    for named in re.findall(r"`(examples/[^`]+)`", text):
        assert (ROOT / named).exists(), f"{page} names {named}, which does not exist"


def test_django_page_shows_the_example_asgi_py_as_it_is() -> None:
    page = (ROOT / "docs" / "django.md").read_text()
    shown = re.search(r"^## asgi.py\n.*?^```python\n(.*?)^```$", page, re.S | re.M)
    assert shown is not None
    assert shown.group(1) in (DJANGO_PROJECT / "mysite" / "asgi.py").read_text()


# -- FastAPI ---------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fastapi_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OZWELL_SECRET", SECRET)
    monkeypatch.setenv("OZWELL_STORE_URL", f"sqlite:///{tmp_path}/ozwell.db")
    monkeypatch.setenv("APP_USERS", "ann:pw-ann, bob:pw-bob")
    with fresh_import("examples.fastapi_app") as module:
        async with started(module.app) as manager, raw_client(manager.app) as http:
            assert module.ozwell._started  # the combined lifespan started the API
            assert (await http.get("/")).json() == {"product": "My product", "api": "/v1"}

            # The product's own auth
            anonymous = await http.get("/me")
            assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic")
            assert (await http.get("/me", auth=("ann", "wrong"))).status_code == 401
            assert (await http.get("/me", auth=("eve", "pw-ann"))).status_code == 401
            assert (await http.get("/me", auth=("ann", "pw-ann"))).json() == {"user": "ann"}

            # ... hands out API keys to its users
            made = await http.post("/me/keys", params={"name": "laptop"}, auth=("ann", "pw-ann"))
            assert made.status_code == 201
            key = made.json()["key"]
            assert key.startswith("ozw_")
            assert [k["name"] for k in (await http.get("/me/keys", auth=("ann", "pw-ann"))).json()] == ["laptop"]
            assert (await http.get("/me/keys", auth=("bob", "pw-bob"))).json() == []

            # ... which open /v1 and nothing else; the product's login never opens /v1
            assert (await http.get("/me", headers={"authorization": f"Bearer {key}"})).status_code == 401
            refused = await http.get("/v1/models", auth=("ann", "pw-ann"))
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
            # The product's middleware wraps the API's answers too, errors included
            assert refused.headers["x-served-by"] == "my-product" and "x-request-id" in refused.headers

        client = async_openai(manager.app, key, base_url="http://testserver/v1")
        raw = await client.chat.completions.with_raw_response.create(model="echo", messages=HI)
        assert raw.parse().choices[0].message.content == "hello host"
        assert raw.headers["x-served-by"] == "my-product" and raw.headers["server-timing"].startswith("app;dur=")
        stream = await client.chat.completions.create(model="echo", messages=HI, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "hello host"
        await client.close()


# -- Starlette -------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_starlette_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OZWELL_SECRET", SECRET)
    monkeypatch.setenv("OZWELL_STORE_URL", f"sqlite:///{tmp_path}/ozwell.db")
    monkeypatch.setenv("APP_ORIGINS", "https://app.example.com")
    with fresh_import("examples.starlette_app") as module:
        ozwell: OzwellAPI = module.ozwell
        async with started(module.app) as manager:
            assert ozwell._started and ozwell._loop_end is None  # started by the host's lifespan, not lazily
            _, key = await ozwell.keys.create(name="browser", owner="ann")
            client = async_openai(manager.app, key, base_url="http://testserver/v1")
            reply = await client.chat.completions.create(model="echo", messages=HI)
            assert reply.choices[0].message.content == "hello host"
            await client.close()
            async with raw_client(manager.app) as http:
                assert "<h1>My site</h1>" in (await http.get("/")).text
                assert (await http.get("/health")).json() == {"ok": True}
                preflight = {
                    "origin": "https://app.example.com",
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "authorization, content-type, x-stainless-lang",
                }
                allowed = await http.options("/v1/chat/completions", headers=preflight)
                assert allowed.status_code == 200
                assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
                assert "access-control-allow-credentials" not in allowed.headers
                foreign = await http.options("/v1/chat/completions", headers={**preflight, "origin": "https://evil"})
                assert foreign.status_code == 400 and "access-control-allow-origin" not in foreign.headers
                answered = await http.post(
                    "/v1/chat/completions",
                    json={"model": "echo", "messages": HI},
                    headers={"origin": "https://app.example.com", "authorization": f"Bearer {key}"},
                )
                assert answered.status_code == 200
                exposed = answered.headers["access-control-expose-headers"].lower()
                assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
                missing = await http.get("/v1/nope", headers={"origin": "https://app.example.com"})
                assert missing.json()["error"]["message"] == "Invalid URL (GET /v1/nope)"


# -- Django ----------------------------------------------------------------------------------------------------


def django_env(tmp_path: Path) -> dict[str, str]:
    return {
        "OZWELL_SECRET": SECRET,
        "OZWELL_STORE_URL": f"sqlite:///{tmp_path}/ozwell.db",
        "DJANGO_DB_PATH": str(tmp_path / "db.sqlite3"),
        "DJANGO_SECRET_KEY": "test-" + "k" * 50,
    }


def test_django_project_passes_its_checks(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "ERROR"],
        cwd=DJANGO_PROJECT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **django_env(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.anyio
async def test_django_asgi_in_process_with_lifespan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in django_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    monkeypatch.syspath_prepend(str(DJANGO_PROJECT))
    try:
        with fresh_import("mysite.asgi") as module:
            assert os.environ["DJANGO_SETTINGS_MODULE"] == "mysite.settings"  # asgi.py sets it
            ozwell: OzwellAPI = module.ozwell
            async with started(module.application) as manager:
                assert ozwell._started
                _, key = await ozwell.keys.create(name="django", owner="ann")
                client = async_openai(manager.app, key, base_url="http://testserver/v1")
                reply = await client.chat.completions.create(model="echo", messages=HI)
                assert reply.choices[0].message.content == "hello host"
                await client.close()
                async with raw_client(manager.app) as http:
                    home = await http.get("/")
                    assert home.json() == {"site": "mysite", "framework": "django", "api": "http://testserver/v1"}
                    assert (await http.get("/health")).json() == {"ok": True}
                    assert (await http.get("/nowhere")).status_code == 404  # Django's own 404
                    missing = await http.get("/v1/nowhere")
                    assert missing.json()["error"]["message"] == "Invalid URL (GET /v1/nowhere)"
    finally:
        for name in [m for m in sys.modules if m == "mysite" or m.startswith("mysite.")]:
            sys.modules.pop(name)


def run_until_ready(command: list[str], cwd: Path, env: dict[str, str], url: str) -> subprocess.Popen[str]:
    """Start ``command`` and wait (at most 60 s) until ``url`` answers."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{command} exited with {proc.returncode}:\n{out}\n{err[-3000:]}")
        try:
            httpx2.get(url, timeout=2)
            return proc
        except httpx2.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{command} did not answer at {url} within 60 s")
            time.sleep(0.1)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.anyio
async def test_django_asgi_under_uvicorn_with_lifespan_on(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **django_env(tmp_path)}
    env.pop("DJANGO_SETTINGS_MODULE", None)  # asgi.py must set it itself
    maker = OzwellAPI(key_store=env["OZWELL_STORE_URL"], secret=SECRET)  # as `ozwell-asgi keys create` would
    _, key = await maker.keys.create(name="uvicorn", owner="ann")
    await maker.aclose()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "uvicorn", "mysite.asgi:application", "--lifespan", "on", "--port", str(port)]

    def serve() -> tuple[int, str, str, str, str]:
        proc = run_until_ready(command, DJANGO_PROJECT, env, base + "/health")
        try:
            client = openai.OpenAI(api_key=key, base_url=base + "/v1", max_retries=0)
            content = client.chat.completions.create(model="echo", messages=HI).choices[0].message.content or ""
            client.close()
            home = httpx2.get(base + "/").json()["framework"]
        finally:
            code, out, err = stop(proc)
        return code, out, err, content, home

    code, _, err, content, home = await anyio.to_thread.run_sync(serve)
    assert (content, home) == ("hello host", "django")
    assert code == 0, err[-3000:]
    assert "Application startup complete." in err and "Application shutdown complete." in err
    assert "unsupported" not in err.lower() and "Traceback" not in err


# -- Production: PostgreSQL and Redis --------------------------------------------------------------------------


def production_env(postgres_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    return {
        "OZWELL_SECRET": SECRET,
        "OZWELL_STORE_URL": postgres_url,
        "OZWELL_LIMITER_URL": redis_url,
        "OZWELL_LIMITER_NAMESPACE": redis_prefix + "prod",
        "OZWELL_KEY_CACHE_TTL": "0",
    }


@pytest.mark.services
@pytest.mark.anyio
async def test_production_example_on_postgresql_and_redis(
    postgres_url: str, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncpg
    import redis.asyncio as aioredis

    for name, value in production_env(postgres_url, redis_url, redis_prefix).items():
        monkeypatch.setenv(name, value)
    with fresh_import("examples.production") as module:
        ozwell: OzwellAPI = module.ozwell
        async with started(module.app) as manager, raw_client(manager.app) as http:
            assert (await http.get("/livez")).json() == {"ok": True}
            assert (await http.get("/readyz")).json() == {"ok": True}
            record, key = await ozwell.keys.create(name="prod", owner="ann", rpm=2)
            client = async_openai(manager.app, key, base_url="http://testserver/v1", max_retries=0)
            for _ in range(2):
                reply = await client.chat.completions.create(model="echo", messages=HI)
                assert reply.choices[0].message.content == "hello host"
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="echo", messages=HI)
            await client.close()
        assert module.limiter._storage is None  # the lifespan closed the limiter it was given

    # The key is in PostgreSQL, the counters in Redis under the configured namespace
    connection = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        assert await connection.fetchval("SELECT owner FROM ozwell_api_keys WHERE id = $1", record.id) == "ann"
    finally:
        await connection.close()
    inspector = aioredis.Redis.from_url(redis_url)
    try:
        counters = [k async for k in inspector.scan_iter(match=f"*{redis_prefix}prod*")]
    finally:
        await inspector.aclose()
    assert counters


@pytest.mark.anyio
async def test_production_example_refuses_local_fallbacks_and_reports_an_unready_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OZWELL_SECRET", SECRET)
    monkeypatch.delenv("OZWELL_STORE_URL", raising=False)
    monkeypatch.setenv("OZWELL_LIMITER_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(SystemExit, match="OZWELL_STORE_URL"), fresh_import("examples.production"):
        pass  # pragma: no cover
    # A store nobody listens on: /readyz says so, /livez does not care, and nothing connects at import
    monkeypatch.setenv("OZWELL_STORE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    monkeypatch.setenv("OZWELL_ON_LIMITER_ERROR", "open")
    with fresh_import("examples.production") as module:
        async with started(module.app) as manager, raw_client(manager.app) as http:
            assert (await http.get("/livez")).status_code == 200
            unready = await http.get("/readyz")
            assert unready.status_code == 503 and unready.json()["ok"] is False
            assert "postgres" not in unready.text  # the URL is never echoed


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.anyio
async def test_production_example_serves_under_its_main(
    tmp_path: Path, postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OZWELL_")}
    env.update(
        production_env(postgres_url, redis_url, redis_prefix),
        PYTHONPATH=str(ROOT),
        OZWELL_PORT=str(port),
        OZWELL_LOG_LEVEL="warning",
        OZWELL_LIMIT_CONCURRENCY="50",
    )
    maker = OzwellAPI(key_store=postgres_url, secret=SECRET)
    _, key = await maker.keys.create(name="main", owner="ann")
    await maker.aclose()
    base = f"http://127.0.0.1:{port}"

    def serve() -> tuple[int, str, str, str]:
        proc = run_until_ready([sys.executable, "-m", "examples.production"], tmp_path, env, base + "/livez")
        try:
            client = openai.OpenAI(api_key=key, base_url=base + "/v1", max_retries=0)
            content = client.chat.completions.create(model="echo", messages=HI).choices[0].message.content or ""
            client.close()
        finally:
            code, out, err = stop(proc)
        return code, out, err, content

    code, _, err, content = await anyio.to_thread.run_sync(serve)
    assert content == "hello host"
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "Unclosed" not in err
