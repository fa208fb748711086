"""Backends named by a string (``serve --backend SPEC``): echo, an OpenAI-compatible URL, ``module:attribute``, and
router files in TOML and JSON, each built once; every bad spec a ValueError that says what is wrong."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from ozwell_asgi import EchoBackend, OpenAICompatibleBackend, OzwellAPI, RouterBackend
from ozwell_asgi.backends.spec import backend_from_spec
from tests.harness import async_openai

pytestmark = pytest.mark.anyio


def test_echo_and_upstream_urls() -> None:
    assert isinstance(backend_from_spec("echo"), EchoBackend)
    upstream = backend_from_spec("openai+http://127.0.0.1:11434/v1", upstream_key="sk-test-key-123")
    assert isinstance(upstream, OpenAICompatibleBackend)
    assert upstream.base_url == "http://127.0.0.1:11434/v1"
    secure = backend_from_spec("openai+https://api.example.com/v1/")
    assert isinstance(secure, OpenAICompatibleBackend)
    assert secure.base_url == "https://api.example.com/v1"


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "my_backends.py").write_text(
        textwrap.dedent(
            """
            from ozwell_asgi import EchoBackend, function_backend

            instance = EchoBackend(chat_models=("instance-model",))

            def factory():
                return EchoBackend(chat_models=("factory-model",))

            class Custom(EchoBackend):
                def __init__(self):
                    super().__init__(chat_models=("class-model",))

            async def shout(request):
                return request.messages[-1].content.upper()

            shouting = function_backend(shout, models=("shout",))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_backends", None)


@pytest.mark.parametrize(
    ("spec", "model"),
    [
        ("my_backends:instance", "instance-model"),
        ("my_backends:factory", "factory-model"),
        ("my_backends:Custom", "class-model"),
        ("my_backends:shouting", "shout"),
    ],
)
async def test_module_attribute_a_backend_a_factory_or_a_class(module_dir: Path, spec: str, model: str) -> None:
    backend = backend_from_spec(spec)
    assert model in [m.id for m in await backend.list_models()]
    OzwellAPI(secret="s" * 32, backend=backend)  # and the app accepts it


ROUTER_TOML = """
[backends]
echo = "echo"
fns = "my_backends:shouting"
remote = { spec = "openai+http://127.0.0.1:9/v1", key_env = "OZWELL_TEST_UPSTREAM_KEY" }

[[routes]]
model = "shout"
backend = "fns"

[[routes]]
model = "echo*"
backend = "echo"

[aliases]
"gpt-4" = { model = "shout", backend = "fns" }
"""


async def test_a_router_file_in_toml(module_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OZWELL_TEST_UPSTREAM_KEY", "sk-from-the-environment")
    path = module_dir / "router.toml"
    path.write_text(ROUTER_TOML)
    backend = backend_from_spec(str(path))
    assert isinstance(backend, RouterBackend)
    api = OzwellAPI(secret="s" * 32, backend=backend)
    _, key = await api.keys.create(name="t", owner="o")
    client = async_openai(api, key)
    ids = {m.id for m in (await client.models.list()).data}
    assert {"shout", "echo", "echo-embedding", "gpt-4"} <= ids
    answer = await client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "HI"
    assert answer.model == "shout"
    echoed = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert echoed.choices[0].message.content == "hi"
    await client.close()
    await backend.aclose()


async def test_a_router_file_in_json(module_dir: Path) -> None:
    path = module_dir / "router.json"
    path.write_text(
        json.dumps({"backends": {"a": "echo"}, "routes": [{"model": "echo", "backend": "a"}], "aliases": {}})
    )
    backend = backend_from_spec(str(path))
    assert [m.id for m in await backend.list_models()] == ["echo"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("vllm", "unknown backend 'vllm'"),
        ("http://127.0.0.1:8000/v1", "write an OpenAI-compatible server as openai+http://"),
        ("openai+ftp://x/v1", "unknown backend"),
        ("no_such_module_xyz:thing", "cannot import 'no_such_module_xyz'"),
        ("my_backends:nothing", "has no attribute 'nothing'"),
        ("missing.toml", "router file 'missing.toml'"),
    ],
)
def test_bad_specs_say_what_is_wrong(module_dir: Path, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace(".", r"\.")):
        backend_from_spec(spec)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("routes = [", "not valid TOML"),
        ("[[routes]]\nmodel = 'x'\nbackend = 'a'", "needs a \\[backends\\] table"),
        ("[backends]\na = 5", "backends.a: expected a spec string"),
        ("[backends]\na = { spec = 'echo', colour = 'red' }", "unknown field\\(s\\) colour"),
        ("[backends]\na = { spec = 'echo', key_env = 'OZWELL_NO_SUCH_VARIABLE' }", "is not set"),
        ("[backends]\na = 'other.toml'", "cannot be another router file"),
        ("[backends]\na = 'vllm'", "backends.a: unknown backend"),
        ("[backends]\na = 'echo'\n[[routes]]\nmodel = 'x'\nbackend = 'b'", "router file"),
    ],
)
def test_bad_router_files_say_where(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "router.toml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        backend_from_spec(str(path))
