"""The official ``openai`` SDK wired to an ASGI app in-process (sync and async), and a real server on a loopback
port for clients that cannot be wired in-process (another language, a subprocess).

Needs the ``testing`` extra (``openai``, ``httpx2``), which this module imports: import it only when you use it.

- :func:`sync_openai` yields an ``openai.OpenAI`` whose requests run the app on an event loop in a helper thread
  (httpx2's own ``ASGITransport`` is async only);
- :func:`async_openai` returns an ``openai.AsyncOpenAI`` whose requests run the app as tasks of the caller's
  asyncio loop;
- :func:`serve_in_thread` serves an app with uvicorn on ``127.0.0.1`` and a free port, in a thread.

Both in-process transports stream: the request body is read whole and given to the app as one message; the
response is returned once the app has started it, and its body arrives as the app sends it, at most
:data:`MESSAGE_BUFFER` ASGI messages ahead of the reader. They honour the request's read timeout (the SDK's
``timeout=``): a wait longer than it raises ``httpx2.ReadTimeout``, which the SDK reports as
``openai.APITimeoutError``. Closing a response before its end (leaving a ``with`` block, ``stream.close()``) tells
the app that the client went away (``http.disconnect``) and cancels it, as a closed socket would. An exception
that escapes the app is raised to the caller, as httpx2's ``ASGITransport`` does by default. A bare
:class:`~ozwell_asgi.OzwellAPI` is served as if mounted at ``/v1`` (what ``ozwell-asgi serve`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.from_thread
import httpx2
import openai
import uvicorn
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..app import OzwellAPI

__all__ = [
    "IN_PROCESS_BASE_URL",
    "MESSAGE_BUFFER",
    "AsyncASGITransport",
    "SyncASGITransport",
    "async_openai",
    "free_port",
    "serve_in_thread",
    "sync_openai",
]

IN_PROCESS_BASE_URL = "http://testserver/v1"
MESSAGE_BUFFER = 16  # ASGI messages an app may send ahead of the client reading them
SERVER_START_TIMEOUT = 10.0  # seconds serve_in_thread waits for uvicorn to listen
SERVER_STOP_TIMEOUT = 10.0  # seconds it waits for uvicorn's thread to end
STOP_TIMEOUT = 10.0  # seconds a closed in-process response waits for its cancelled app to unwind

Message = MutableMapping[str, Any]
_TIMED_OUT: Any = object()


def _root_path(app: Any) -> str:
    return "/v1" if isinstance(app, OzwellAPI) else ""


def _scope(request: httpx2.Request, root_path: str, client: tuple[str, int]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": request.method,
        "headers": [(k.lower(), v) for k, v in request.headers.raw],
        "scheme": request.url.scheme,
        "path": request.url.path,
        "raw_path": request.url.raw_path.split(b"?")[0],
        "query_string": request.url.query,
        "server": (request.url.host, request.url.port),
        "client": client,
        "root_path": root_path,
    }


def _read_timeout(request: httpx2.Request) -> float | None:
    timeout = request.extensions.get("timeout")
    return timeout.get("read") if isinstance(timeout, dict) else None


class _Exchange:
    """One request's run of the app, on the loop it was made on (make it there: it holds loop primitives).

    The app's messages go through a stream of :data:`MESSAGE_BUFFER` slots; ``receive`` gives the request body
    once, then waits until the response is complete or the client is gone and says ``http.disconnect``.
    """

    def __init__(self, app: Any, scope: dict[str, Any], body: bytes) -> None:
        self.app = app
        self.scope = scope
        self.body: bytes | None = body
        outgoing: tuple[MemoryObjectSendStream[Message], MemoryObjectReceiveStream[Message]]
        outgoing = anyio.create_memory_object_stream[Message](MESSAGE_BUFFER)
        self._to_client, self._from_app = outgoing
        self._over = anyio.Event()  # the response is complete, or the client went away
        self.cancel_scope = anyio.CancelScope()
        self.error: Exception | None = None
        self.complete = False  # the app sent its last body message
        self._finished = anyio.Event()  # the app returned

    async def run(self) -> None:
        try:
            with self.cancel_scope:
                async with self._to_client:
                    try:
                        await self.app(self.scope, self._receive, self._send)
                    except Exception as exc:
                        self.error = exc
        finally:
            self._finished.set()

    async def _receive(self) -> Message:
        body, self.body = self.body, None
        if body is not None:
            return {"type": "http.request", "body": body, "more_body": False}
        await self._over.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        try:
            await self._to_client.send(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise OSError("the client went away") from None
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
            self._over.set()

    async def next(self, wait: float | None) -> Message | None:
        """The app's next message; ``None`` once it has returned; ``_TIMED_OUT`` after ``wait`` seconds."""
        with anyio.move_on_after(wait):
            try:
                return await self._from_app.receive()
            except anyio.EndOfStream:
                return None
        return _TIMED_OUT  # type: ignore[no-any-return]

    async def abort(self) -> None:
        """The client is gone: the app hears ``http.disconnect`` and, unless its response was complete, is
        cancelled; then it is given up to :data:`STOP_TIMEOUT` seconds to unwind (its ``finally`` blocks, the
        backend's ``aclose``), so what it does on a disconnect has happened when this returns."""
        self._over.set()
        self._from_app.close()
        if not self.complete:
            self.cancel_scope.cancel()
            with anyio.move_on_after(STOP_TIMEOUT, shield=True):
                await self._finished.wait()


def _response_start(request: httpx2.Request, message: Message | None, exchange: _Exchange) -> Message:
    if message is _TIMED_OUT:
        raise httpx2.ReadTimeout("the app did not start its response within the read timeout", request=request)
    if message is None:
        if exchange.error is not None:
            raise exchange.error
        raise httpx2.RemoteProtocolError("the ASGI app returned without starting a response", request=request)
    if message["type"] != "http.response.start":
        raise httpx2.RemoteProtocolError(f"the ASGI app sent {message['type']!r} first", request=request)
    return message


def _body_piece(request: httpx2.Request, message: Message | None, exchange: _Exchange) -> tuple[bytes, bool]:
    """(bytes to hand over, whether the body goes on) for one message of the app after the response start."""
    if message is _TIMED_OUT:
        raise httpx2.ReadTimeout("the app sent nothing within the read timeout", request=request)
    if message is None:
        if exchange.error is not None:
            raise exchange.error
        raise httpx2.RemoteProtocolError("the ASGI app returned before the end of its response body", request=request)
    if message["type"] != "http.response.body":
        return b"", True  # trailers, extensions: nothing a client reads here
    body: bytes = message.get("body", b"")
    return (b"" if request.method == "HEAD" else body), bool(message.get("more_body", False))


def _keep(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    """Hold a reference to ``task`` until it is done (the loop holds tasks weakly)."""
    tasks.add(task)
    task.add_done_callback(tasks.discard)


# -- sync --------------------------------------------------------------------------------------------------------


class _SyncBody(httpx2.SyncByteStream):
    def __init__(self, transport: SyncASGITransport, request: httpx2.Request, exchange: _Exchange) -> None:
        self._transport = transport
        self._request = request
        self._exchange = exchange

    def __iter__(self) -> Iterator[bytes]:
        timeout = _read_timeout(self._request)
        more = True
        while more:
            message = self._transport.portal.call(self._exchange.next, timeout)
            piece, more = _body_piece(self._request, message, self._exchange)
            if piece:
                yield piece

    def close(self) -> None:
        self._transport._end(self._exchange)


class SyncASGITransport(httpx2.BaseTransport):
    """Runs an ASGI app for a sync httpx2 client, on the event loop of ``portal`` (an
    ``anyio.from_thread.BlockingPortal``, in a helper thread). ``close`` cancels the requests still running."""

    def __init__(
        self,
        app: Any,
        portal: anyio.from_thread.BlockingPortal,
        *,
        root_path: str | None = None,
        client: tuple[str, int] = ("127.0.0.1", 123),
    ) -> None:
        self.app = app
        self.portal = portal
        self.root_path = _root_path(app) if root_path is None else root_path
        self.client = client
        self._running: set[_Exchange] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        scope = _scope(request, self.root_path, self.client)

        async def begin() -> _Exchange:
            exchange = _Exchange(self.app, scope, body)
            _keep(self._tasks, asyncio.get_running_loop().create_task(exchange.run()))
            return exchange

        exchange = self.portal.call(begin)
        with self._lock:
            self._running.add(exchange)
        try:
            start = _response_start(request, self.portal.call(exchange.next, _read_timeout(request)), exchange)
        except BaseException:
            self._end(exchange)
            raise
        return httpx2.Response(
            start["status"], headers=start.get("headers", []), stream=_SyncBody(self, request, exchange)
        )

    def _end(self, exchange: _Exchange) -> None:
        with self._lock:
            if exchange not in self._running:
                return
            self._running.discard(exchange)
        with contextlib.suppress(RuntimeError):  # the portal has stopped: its tasks were cancelled with it
            self.portal.call(exchange.abort)

    def close(self) -> None:
        with self._lock:
            running = list(self._running)
        for exchange in running:
            self._end(exchange)


@contextmanager
def sync_openai(app: Any, api_key: str, base_url: str = IN_PROCESS_BASE_URL, **kwargs: Any) -> Iterator[openai.OpenAI]:
    """An ``openai.OpenAI`` client of ``app``, in-process; ``kwargs`` go to ``openai.OpenAI`` (``max_retries``,
    ``timeout``...). The app runs on an event loop in a helper thread, stopped (its requests cancelled) on exit."""
    with anyio.from_thread.start_blocking_portal() as portal:
        http = httpx2.Client(transport=SyncASGITransport(app, portal), base_url=base_url)
        client = openai.OpenAI(api_key=api_key, base_url=base_url, http_client=http, **kwargs)
        try:
            yield client
        finally:
            client.close()


# -- async -------------------------------------------------------------------------------------------------------


class _AsyncBody(httpx2.AsyncByteStream):
    def __init__(self, transport: AsyncASGITransport, request: httpx2.Request, exchange: _Exchange) -> None:
        self._transport = transport
        self._request = request
        self._exchange = exchange

    async def __aiter__(self) -> AsyncIterator[bytes]:
        timeout = _read_timeout(self._request)
        more = True
        while more:
            piece, more = _body_piece(self._request, await self._exchange.next(timeout), self._exchange)
            if piece:
                yield piece

    async def aclose(self) -> None:
        await self._transport._end(self._exchange)


class AsyncASGITransport(httpx2.AsyncBaseTransport):
    """Runs an ASGI app for an async httpx2 client, each request as a task of the caller's asyncio loop (the app
    needs asyncio). ``aclose`` cancels the requests still running."""

    def __init__(self, app: Any, *, root_path: str | None = None, client: tuple[str, int] = ("127.0.0.1", 123)) -> None:
        self.app = app
        self.root_path = _root_path(app) if root_path is None else root_path
        self.client = client
        self._running: set[_Exchange] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "the in-process async client runs the app on asyncio, not on this event loop "
                "(with anyio's pytest plugin, return 'asyncio' from an anyio_backend fixture)"
            ) from None
        body = await request.aread()
        exchange = _Exchange(self.app, _scope(request, self.root_path, self.client), body)
        _keep(self._tasks, loop.create_task(exchange.run()))
        self._running.add(exchange)
        try:
            start = _response_start(request, await exchange.next(_read_timeout(request)), exchange)
        except BaseException:
            await self._end(exchange)
            raise
        return httpx2.Response(
            start["status"], headers=start.get("headers", []), stream=_AsyncBody(self, request, exchange)
        )

    async def _end(self, exchange: _Exchange) -> None:
        if exchange in self._running:
            self._running.discard(exchange)
            with anyio.CancelScope(shield=True):
                await exchange.abort()

    async def aclose(self) -> None:
        for exchange in list(self._running):
            await self._end(exchange)


def async_openai(app: Any, api_key: str, base_url: str = IN_PROCESS_BASE_URL, **kwargs: Any) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` client of ``app``, in-process, for use on an asyncio loop; ``kwargs`` go to
    ``openai.AsyncOpenAI``. Needs no closing (``await client.close()`` cancels requests still running)."""
    http = httpx2.AsyncClient(transport=AsyncASGITransport(app), base_url=base_url)
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url, http_client=http, **kwargs)


# -- a real server -----------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it before you bind it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serve_in_thread(app: Any, *, before_stop: Callable[[], None] | None = None, **config: Any) -> Iterator[str]:
    """Serve ``app`` (as it is: wrap a bare ``OzwellAPI`` in ``PrefixedApp`` to have it under ``/v1``) with uvicorn
    on 127.0.0.1 and a port free at the time, in a daemon thread; yields the origin, ``http://127.0.0.1:PORT``.

    ``config`` goes to ``uvicorn.Config`` (``log_level`` is ``"warning"`` unless given; requests still running at
    exit get ``timeout_graceful_shutdown``, 5 seconds unless given, then are cancelled). ``before_stop`` is called
    before the server is asked to stop. ``RuntimeError`` if uvicorn does not listen within
    :data:`SERVER_START_TIMEOUT` seconds."""
    config.setdefault("log_level", "warning")
    config.setdefault("timeout_graceful_shutdown", 5)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if before_stop is not None:
            before_stop()
        server.should_exit = True
        thread.join(SERVER_STOP_TIMEOUT)
