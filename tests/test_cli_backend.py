"""``ozwell-asgi serve --backend SPEC`` as real processes: a ``serve`` in front of another ``serve`` (the official SDK's
chat, stream, embeddings and errors through it), ``module:attribute`` from ``OZWELL_BACKEND``, a router file with
routes, an alias and a fallback, ``--workers 2`` with the upstream key given to workers only as a file, backends
closed at shutdown, and bad specs refused (exit 2, one line) before anything starts."""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import openai
import pytest

from ozwell_asgi.cli import ServeConfig, build_app, main
from tests.harness import async_openai
from tests.test_cli import OZWELL_ENV, cli_env, create_key, run_cli, serve_process, serving
from tests.test_serve_hardening import descendants, worker_environments

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "hello through the front"}]

MODULE = '''
import os
from pathlib import Path

from ozwell_asgi import BadGatewayError, EchoBackend, function_backend


async def shout(request):
    return request.messages[-1].content.upper()


shouting = function_backend(shout, models=("shout",))


async def down(request):
    raise BadGatewayError("The upstream model server failed.")


failing = function_backend(down, models=("gpt-4o",))


class Closing(EchoBackend):
    """Echo that leaves a file in $MARK_DIR, named by its process id, when it is closed."""

    def __init__(self):
        super().__init__(chat_models=("closing",))

    async def aclose(self):
        Path(os.environ["MARK_DIR"], str(os.getpid())).write_text("closed")


raise_at_import = os.environ.get("CLI_BACKEND_RAISE") == "1"
if raise_at_import:
    raise RuntimeError("this module refuses to load")
'''


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in OZWELL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``cli_backend_mod.py`` (backends named ``cli_backend_mod:...``), for PYTHONPATH."""
    directory = tmp_path_factory.mktemp("modules")
    (directory / "cli_backend_mod.py").write_text(textwrap.dedent(MODULE))
    return directory


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """An echo ``serve`` and a key on it: (its base URL, the key)."""
    cwd = tmp_path_factory.mktemp("upstream")
    key = create_key("--plan", "enterprise", cwd=cwd)
    with serving(cwd=cwd) as base:
        yield base, key


@pytest.fixture(scope="module")
def front(upstream: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """``serve --backend openai+http://…`` in front of ``upstream``, its key from OZWELL_UPSTREAM_KEY: a client."""
    base, upstream_key = upstream
    cwd = tmp_path_factory.mktemp("front")
    key = create_key("--plan", "enterprise", cwd=cwd)
    env = cli_env(OZWELL_UPSTREAM_KEY=upstream_key)
    with serving("--backend", "openai+" + base, cwd=cwd, env=env) as front_base:
        client = openai.OpenAI(base_url=front_base, api_key=key, max_retries=0)
        yield client
        client.close()


# ------------------------------------------------------------------------------------- serve in front of serve


def test_chat_and_stream_through_a_front_serve(front: openai.OpenAI) -> None:
    assert [m.id for m in front.models.list()] == ["echo", "echo-embedding"]  # the upstream's
    answer = front.chat.completions.create(model="echo", messages=HELLO)
    assert answer.choices[0].message.content == "hello through the front"
    assert answer.model == "echo"
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0
    chunks = list(
        front.chat.completions.create(model="echo", messages=HELLO, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello through the front"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens > 0


def test_embeddings_through_a_front_serve(front: openai.OpenAI) -> None:
    as_base64 = front.embeddings.create(model="echo-embedding", input=["a", "b"], dimensions=8)  # the SDK's default
    as_floats = front.embeddings.create(model="echo-embedding", input=["a", "b"], dimensions=8, encoding_format="float")
    for result in (as_base64, as_floats):
        assert [len(item.embedding) for item in result.data] == [8, 8]
        assert result.usage.prompt_tokens > 0
    for packed, plain in zip(as_base64.data, as_floats.data, strict=True):  # float32 on the wire: 1e-6 apart
        assert packed.embedding == pytest.approx(plain.embedding, abs=1e-6)
    assert sum(x * x for x in as_floats.data[0].embedding) == pytest.approx(1.0, rel=1e-5)


def test_errors_through_a_front_serve(front: openai.OpenAI, upstream: tuple[str, str]) -> None:
    bad_schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "array", "minItems": -1}}}
    with pytest.raises(openai.BadRequestError) as raised:  # the upstream's 400, passed on as it said it
        front.chat.completions.create(model="echo", messages=HELLO, response_format=bad_schema)  # type: ignore[arg-type]
    error = raised.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"], error["type"]) == (
        "invalid_json_schema",
        "response_format",
        "invalid_request_error",
    )
    with pytest.raises(openai.NotFoundError) as missing:
        front.chat.completions.create(model="no-such-model", messages=HELLO)
    assert isinstance(missing.value.body, dict)
    assert missing.value.body["code"] == "model_not_found"
    for exc in (raised.value, missing.value):
        assert upstream[1] not in str(exc.body)
        assert upstream[0].removesuffix("/v1") not in str(exc.body)


def test_a_wrong_upstream_key_is_a_502_for_the_client(upstream: tuple[str, str]) -> None:
    """What ``serve --backend openai+… --upstream-key WRONG`` builds: the operator's mistake, not the client's."""
    wrong = "sk-wrong-upstream-key-1234"
    config = ServeConfig(backend="openai+" + upstream[0], upstream_key=wrong, store_url="memory://", secret="s" * 32)
    app = build_app(config)

    async def run() -> None:
        _, key = await app.api.keys.create(name="t", owner="o", plan="enterprise")
        client = async_openai(app, key, max_retries=0)
        try:
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model="echo", messages=HELLO)
        finally:
            await client.close()
            await app.api.aclose()
            await app.limiter.aclose()
            await app.backend.aclose()  # type: ignore[attr-defined]
        assert raised.value.status_code == 502
        assert isinstance(raised.value.body, dict)
        assert raised.value.body["code"] == "upstream_error"
        assert wrong not in raised.value.response.text

    anyio.run(run)


# --------------------------------------------------------------------------------- module:attribute, router file


def test_module_attribute_from_the_environment(module_dir: Path, tmp_path: Path) -> None:
    env = cli_env(OZWELL_BACKEND="cli_backend_mod:shouting", PYTHONPATH=str(module_dir))
    key = create_key(cwd=tmp_path, env=env)
    with serving(cwd=tmp_path, env=env) as base:
        client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        assert [m.id for m in client.models.list()] == ["shout"]
        answer = client.chat.completions.create(model="shout", messages=[{"role": "user", "content": "hi there"}])
        assert answer.choices[0].message.content == "HI THERE"
        with pytest.raises(openai.NotFoundError):  # a chat-only backend serves no embeddings route
            client.embeddings.create(model="shout", input="x")
        client.close()


ROUTER = """
[backends]
upstream = {{ spec = "{upstream}", key_env = "CLI_TEST_UPSTREAM_KEY" }}
failing = "cli_backend_mod:failing"
fns = "cli_backend_mod:shouting"

[[routes]]
model = "gpt-*"
backend = "failing"
fallbacks = [{{ model = "echo", backend = "upstream" }}]

[[routes]]
model = "echo*"
backend = "upstream"

[aliases]
loud = {{ model = "shout", backend = "fns" }}
"""


def test_a_router_file_with_routes_an_alias_and_a_fallback(
    module_dir: Path, upstream: tuple[str, str], tmp_path: Path
) -> None:
    (tmp_path / "router.toml").write_text(ROUTER.format(upstream="openai+" + upstream[0]))
    env = cli_env(PYTHONPATH=str(module_dir), CLI_TEST_UPSTREAM_KEY=upstream[1])
    key = create_key(cwd=tmp_path, env=env)
    with serving("--backend", "router.toml", cwd=tmp_path, env=env) as base:
        client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        assert [m.id for m in client.models.list()] == ["gpt-4o", "echo", "echo-embedding", "loud"]
        # gpt-4o fails with a 502 before its first chunk: its fallback, echo on the upstream, answers
        answer = client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert (answer.model, answer.choices[0].message.content) == ("echo", "hello through the front")
        # the alias: another model on another backend, named in the answer and in every chunk
        answer = client.chat.completions.create(model="loud", messages=[{"role": "user", "content": "hi"}])
        assert (answer.model, answer.choices[0].message.content) == ("shout", "HI")
        stream = client.chat.completions.create(model="loud", messages=[{"role": "user", "content": "hi"}], stream=True)
        chunks = list(stream)
        assert {c.model for c in chunks} == {"shout"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "HI"
        vectors = client.embeddings.create(model="echo-embedding", input="a", dimensions=4)
        assert len(vectors.data[0].embedding) == 4
        client.close()


# ------------------------------------------------------------------------------------------------------- workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ")
def test_two_workers_in_front_of_an_upstream_get_its_key_only_as_a_file(
    upstream: tuple[str, str], tmp_path: Path
) -> None:
    base, upstream_key = upstream
    key = create_key("--plan", "enterprise", cwd=tmp_path)
    argv = ("--workers", "2", "--backend", "openai+" + base, "--upstream-key", upstream_key)
    with serve_process(*argv, cwd=tmp_path) as (front_base, proc):
        envs = worker_environments(proc, 2)
        workers = [env for _, env in envs if "OZWELL_BACKEND" in env]
        assert len(workers) >= 2
        for raw, env in envs:
            assert upstream_key.encode() not in raw
            assert "OZWELL_UPSTREAM_KEY" not in env
        [key_file] = {Path(env["OZWELL_UPSTREAM_KEY_FILE"]) for env in workers}
        assert key_file.read_text().strip() == upstream_key
        assert oct(key_file.stat().st_mode & 0o777) == oct(0o600)
        assert {env["OZWELL_BACKEND"] for env in workers} == {"openai+" + base}
        for i in range(6):  # a client (a connection) each, so that both workers are likely to answer some
            with openai.OpenAI(base_url=front_base, api_key=key, max_retries=0) as each:
                answer = each.chat.completions.create(model="echo", messages=[{"role": "user", "content": f"n{i}"}])
            assert answer.choices[0].message.content == f"n{i}"
        client = openai.OpenAI(base_url=front_base, api_key=key, max_retries=0)
        assert (
            "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(model="echo", messages=HELLO, stream=True)
                if c.choices
            )
            == "hello through the front"
        )
        client.close()
    assert not key_file.exists()  # removed when serve exited


def test_every_process_closes_the_backend_it_built(module_dir: Path, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    env = cli_env(PYTHONPATH=str(module_dir), MARK_DIR=str(marks))
    key = create_key(cwd=tmp_path, env=env)
    with serve_process("--backend", "cli_backend_mod:Closing", "--workers", "2", cwd=tmp_path, env=env) as (base, p):
        parent = p.pid
        client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        assert client.chat.completions.create(model="closing", messages=HELLO).choices[0].message.content
        client.close()
        assert [m.name for m in marks.iterdir()] == [str(parent)]  # the parent's, built to check the spec
        workers = set(descendants(parent))
    closed = {int(m.name) for m in marks.iterdir()}
    assert closed - {parent} <= workers
    assert len(closed - {parent}) == 2, (closed, workers)  # and each worker closed its own at shutdown


def test_a_single_worker_closes_its_backend_at_shutdown(module_dir: Path, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    env = cli_env(PYTHONPATH=str(module_dir), MARK_DIR=str(marks))
    with serve_process("--backend", "cli_backend_mod:Closing", cwd=tmp_path, env=env) as (_, proc):
        assert list(marks.iterdir()) == []
        pid = proc.pid
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    assert [m.name for m in marks.iterdir()] == [str(pid)]


# ------------------------------------------------------------------------------------------------ bad specs


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("vllm", "--backend: unknown backend 'vllm'"),
        ("http://user:hunter2@127.0.0.1:8000/v1", "write an OpenAI-compatible server as openai+http://user:***@"),
        ("openai+ftp://127.0.0.1/v1", "--backend: unknown backend"),
        ("openai+http:///v1", "--backend: base_url must be an http:// or https:// URL"),
        ("no_such_module_xyz:thing", "--backend: backend 'no_such_module_xyz:thing': cannot import"),
        ("cli_backend_mod:nothing", "has no attribute 'nothing'"),
        ("os:getcwd", "--backend: str is not a model backend"),
        ("missing.toml", "--backend: router file 'missing.toml'"),
        ("bad.toml", "backends.a: unknown backend 'vllm'"),
        ("password.toml", "backends.a: 'http://u:***@127.0.0.1:9/v1': write an OpenAI-compatible server as"),
    ],
)
def test_bad_specs_exit_2_with_one_line(
    spec: str,
    message: str,
    module_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.syspath_prepend(str(module_dir))
    (tmp_path / "bad.toml").write_text("[backends]\na = 'vllm'\n")
    (tmp_path / "password.toml").write_text("[backends]\na = 'http://u:hunter2@127.0.0.1:9/v1'\n")
    code = main(["serve", "--backend", spec])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("ozwell-asgi: error: --backend: ")
    assert message in lines[0]
    assert "hunter2" not in err
    assert not (tmp_path / "ozwell.db").exists()  # refused before the key store was touched
    assert not (tmp_path / "ozwell.secret").exists()
    sys.modules.pop("cli_backend_mod", None)


def test_a_module_that_fails_to_load_exits_1_with_one_line(
    module_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(module_dir))
    monkeypatch.setenv("CLI_BACKEND_RAISE", "1")
    monkeypatch.setenv("OZWELL_BACKEND", "cli_backend_mod:shouting")
    sys.modules.pop("cli_backend_mod", None)
    assert main(["serve"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "ozwell-asgi: error: OZWELL_BACKEND: building 'cli_backend_mod:shouting' failed: RuntimeError: "
        "this module refuses to load"
    ]
    sys.modules.pop("cli_backend_mod", None)


def test_a_bad_spec_stops_serve_before_any_worker_starts(tmp_path: Path) -> None:
    began = time.monotonic()
    done = run_cli("serve", "--workers", "2", "--backend", "vllm", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ozwell-asgi: error: --backend: unknown backend 'vllm': expected echo, openai+http(s)://host/v1, "
        "package.module:attribute or a router file (.toml, .json)"
    ]
    assert time.monotonic() - began < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no key store, no secret: nothing was started
    env = cli_env(OZWELL_BACKEND="openai+https://")
    done = run_cli("serve", cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("ozwell-asgi: error: OZWELL_BACKEND: ")
