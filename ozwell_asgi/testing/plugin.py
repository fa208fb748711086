"""The pytest plugin: fixtures for testing code that calls OpenAI against a scripted model, in-process.

Registered by the ``pytest11`` entry point of the package, so installing ``ozwell-asgi[testing]`` is enough (no
conftest). Each fixture is function-scoped and imports what it needs when it is first used: a test session that
uses none of them loads nothing more than this module.

- ``ozwell_backend``: a :class:`~ozwell_asgi.testing.ScriptedBackend`; queue answers on it, read ``.requests``.
  When the test ends its gates are opened and, unless ``check_at_teardown`` was set to ``False`` or the test has
  already failed, :meth:`~ozwell_asgi.testing.ScriptedBackend.check` fails the test if a request found no answer
  queued or a queued answer was never used.
- ``ozwell_app``: an :class:`~ozwell_asgi.OzwellAPI` answering from ``ozwell_backend``, with memory stores.
- ``ozwell_api_key``: an ``ozw_`` key of ``ozwell_app`` (owner ``"pytest"``, plan ``"enterprise"``: no limits).
- ``openai_client``: an ``openai.OpenAI`` of ``ozwell_app`` with that key, in-process, ``max_retries=0``.
- ``async_openai_client``: the same as an ``openai.AsyncOpenAI`` (for asyncio tests: anyio's or pytest-asyncio's).
- ``ozwell_server``: ``ozwell_app`` served by uvicorn on ``127.0.0.1`` and a free port for the test; the base URL
  to give any client, ``http://127.0.0.1:PORT/v1``.

Override any of them in your own conftest (``ozwell_backend`` with other models, ``ozwell_app`` with other
settings); the others build on what you return.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import openai

    from ..app import OzwellAPI
    from .scripted import ScriptedBackend

__all__ = [
    "async_openai_client",
    "openai_client",
    "ozwell_api_key",
    "ozwell_app",
    "ozwell_backend",
    "ozwell_server",
]


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Note whether the test itself failed: its own failure then says what went wrong, not the teardown check."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture
def ozwell_backend(request: pytest.FixtureRequest) -> Iterator[ScriptedBackend]:
    """A scripted chat backend: ``.reply(text)``, ``.tool_call(name, arguments)``, ``.error(status, message)``,
    ``.gate()``; ``.requests`` lists the chat requests that came, parsed, in order."""
    from .scripted import ScriptedBackend

    backend = ScriptedBackend()
    yield backend
    backend.open_gates()
    if backend.check_at_teardown and not request.node.stash.get(_CALL_FAILED, False):
        backend.check()


@pytest.fixture
def ozwell_app(ozwell_backend: ScriptedBackend) -> OzwellAPI:
    """The Ozwell API over ``ozwell_backend``: memory key store (a random secret), limiter and files."""
    from ..app import OzwellAPI

    return OzwellAPI(backend=ozwell_backend)


@pytest.fixture
def ozwell_api_key(ozwell_app: OzwellAPI) -> str:
    """A key of ``ozwell_app``: owner ``"pytest"``, plan ``"enterprise"`` (no rate limits)."""
    import anyio.from_thread

    async def create() -> str:
        return (await ozwell_app.keys.create(name="pytest", owner="pytest", plan="enterprise"))[1]

    # On a loop of its own in a helper thread: right whether or not a loop runs in this thread.
    with anyio.from_thread.start_blocking_portal() as portal:
        return portal.call(create)


@pytest.fixture
def openai_client(ozwell_app: OzwellAPI, ozwell_api_key: str) -> Iterator[openai.OpenAI]:
    """``openai.OpenAI`` talking to ``ozwell_app`` in-process (no socket), streaming, with no retries."""
    from .clients import sync_openai

    with sync_openai(ozwell_app, ozwell_api_key, max_retries=0) as client:
        yield client


@pytest.fixture
def async_openai_client(ozwell_app: OzwellAPI, ozwell_api_key: str) -> openai.AsyncOpenAI:
    """``openai.AsyncOpenAI`` talking to ``ozwell_app`` in-process on the test's asyncio loop, with no retries."""
    from .clients import async_openai

    return async_openai(ozwell_app, ozwell_api_key, max_retries=0)


@pytest.fixture
def ozwell_server(ozwell_app: OzwellAPI, ozwell_backend: object) -> Iterator[str]:
    """``ozwell_app`` served over HTTP on 127.0.0.1 for the test; yields its base URL, ``http://127.0.0.1:PORT/v1``.
    Use it with ``ozwell_api_key`` from any client: another language's SDK, a subprocess, a raw HTTP client."""
    from ..app import PrefixedApp
    from .clients import serve_in_thread

    with serve_in_thread(PrefixedApp(ozwell_app), before_stop=getattr(ozwell_backend, "open_gates", None)) as origin:
        yield origin + "/v1"
