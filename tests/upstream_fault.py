"""A fault-injecting OpenAI-compatible upstream for tests, served by uvicorn (``tests.harness.uvicorn_server``).

Its behaviour is chosen per request by the model name: the part before any ``#`` (so a test can make its own
counter, ``flaky-2#t1``). Chat (``/chat/completions``, stream or not):

| model | answer |
|---|---|
| ``ok`` | "Hello from upstream" in three pieces, ``stop``, usage (non-stream: one message) |
| ``slow`` | nothing for 30 s (ends early when the client goes away) |
| ``hang`` | one chunk, then nothing until the client goes away |
| ``error-<status>`` | that status with an OpenAI error body (``param`` "temperature", ``code`` "invalid_value") |
| ``unknown`` | 404 ``model_not_found`` |
| ``html-<status>`` | that status with an HTML page |
| ``flaky-<n>`` | 503 for the first ``n`` attempts of that model, then ``ok`` |
| ``drop`` | two chunks, then the connection is dropped |
| ``malformed`` | an event whose data is not JSON |
| ``long-line`` | a 4 KiB data line |
| ``error-frame`` / ``event-error`` | one chunk, then ``data: {"error": …}`` / ``event: error`` |
| ``no-done`` | one unfinished chunk, then a clean end without ``[DONE]`` |
| ``finished-no-done`` | ``ok`` without ``[DONE]`` |
| ``tools`` / ``custom-tool`` | two parallel function calls with streamed argument deltas / one custom tool call |
| ``reasoning`` / ``reasoning-field`` | ``reasoning_content`` / ``reasoning`` deltas, then the answer |
| ``details`` | usage with prompt and completion token details |
| ``extra`` | unknown delta and message fields, logprobs, both choices of ``n=2`` in one chunk |
| ``usage-each`` | (cumulative) usage on every chunk |
| ``crlf`` / ``cr`` | ``ok`` with CRLF / CR line endings, written a few bytes at a time, with comments and ids |
| ``json`` | a plain JSON completion even for a stream |

Embeddings (``/embeddings``): ``emb`` (vectors in reverse order, by ``index``), ``emb-base64``, ``emb-short`` (one
vector missing), ``emb-nodims`` (ignores ``dimensions``), ``emb-nousage``; the error models above apply too.
``/models`` lists :data:`MODELS` (or answers ``models_status`` when set).

Everything received is recorded (:class:`Received`), with whether the client went away while it was served.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio

from ozwell_asgi.types import Receive, Scope, Send

MODELS = ("ok", "tools", "hang", "drop", "error-400", "text-embedding-3-small", "nomic-embed-text", "bge-m3")
ANSWER = ("Hello", " from", " upstream")
FINGERPRINT = "fp_fault"


class _QuietDrop(logging.Filter):
    """uvicorn logs the connection dropped on purpose (``drop``) as an error: that one is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


logging.getLogger("uvicorn.error").addFilter(_QuietDrop())


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    client_port: int
    disconnected: threading.Event = field(default_factory=threading.Event)


def _chunk(choices: list[dict[str, Any]], usage: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fault-model-v2",
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
        "usage": usage,
        **extra,
    }


def _delta(index: int = 0, finish: str | None = None, logprobs: Any = None, **delta: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _usage(prompt: int = 7, completion: int = 3, details: bool = False) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if details:
        usage["prompt_tokens_details"] = {"cached_tokens": 5, "audio_tokens": 0}
        usage["completion_tokens_details"] = {"reasoning_tokens": 2, "accepted_prediction_tokens": 0}
    return usage


def _ok_chunks() -> list[dict[str, Any]]:
    return [
        _chunk([_delta(role="assistant", content="")]),
        *(_chunk([_delta(content=piece)]) for piece in ANSWER),
        _chunk([_delta(finish="stop")]),
        _chunk([], _usage()),
    ]


TOOL_ARGS = ('{"city": "Par', 'is"}', '{"city": "Ro', 'me"}')


def _stream_chunks(kind: str) -> list[dict[str, Any]]:
    if kind == "tools":
        head = [
            _chunk([_delta(role="assistant", content=None)]),
            _chunk(
                [
                    _delta(
                        tool_calls=[
                            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather"}},
                        ]
                    )
                ]
            ),
        ]
        args = [
            _chunk([_delta(tool_calls=[{"index": 0, "function": {"arguments": TOOL_ARGS[0]}}])]),
            _chunk([_delta(tool_calls=[{"index": 0, "function": {"arguments": TOOL_ARGS[1]}}])]),
            _chunk(
                [
                    _delta(
                        tool_calls=[
                            {
                                "index": 1,
                                "id": "call_b",
                                "type": "function",
                                "function": {"name": "weather", "arguments": TOOL_ARGS[2]},
                            }
                        ]
                    )
                ]
            ),
            _chunk([_delta(tool_calls=[{"index": 1, "function": {"arguments": TOOL_ARGS[3]}}])]),
        ]
        return [*head, *args, _chunk([_delta(finish="tool_calls")]), _chunk([], _usage())]
    if kind == "custom-tool":
        call = {"index": 0, "id": "call_c", "type": "custom", "custom": {"name": "sql", "input": "SELECT 1"}}
        return [
            _chunk([_delta(role="assistant", tool_calls=[call])]),
            _chunk([_delta(finish="tool_calls")]),
            _chunk([], _usage()),
        ]
    if kind in ("reasoning", "reasoning-field"):
        name = "reasoning_content" if kind == "reasoning" else "reasoning"
        return [
            _chunk([_delta(role="assistant", content="")]),
            _chunk([_delta(**{name: "Let me think."})]),
            _chunk([_delta(**{name: " Done."})]),
            _chunk([_delta(content="42")]),
            _chunk([_delta(finish="stop")]),
            _chunk([], _usage()),
        ]
    if kind == "details":
        return [*_ok_chunks()[:-1], _chunk([], _usage(details=True))]
    if kind == "extra":
        logprobs = {"content": [{"token": "A", "logprob": -0.5, "bytes": [65], "top_logprobs": []}], "refusal": None}
        return [
            _chunk([_delta(0, role="assistant", content=""), _delta(1, role="assistant", content="")]),
            _chunk(
                [
                    {**_delta(0, logprobs=logprobs, content="A", x_vendor={"score": 1}), "stop_reason": None},
                    _delta(1, content="B", audio={"id": "audio_1"}, annotations=[], function_call=None),
                ],
                obfuscation="xyz",
            ),
            _chunk([_delta(0, finish="stop"), _delta(1, finish="length")]),
            _chunk([], _usage()),
        ]
    if kind == "usage-each":
        chunks = [_chunk([_delta(role="assistant", content="")], _usage(7, 0))]
        for n, piece in enumerate(ANSWER, 1):
            chunks.append(_chunk([_delta(content=piece)], _usage(7, n)))
        chunks.append(_chunk([_delta(finish="stop")], _usage(7, 3)))
        return chunks
    return _ok_chunks()


def _completion(kind: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(ANSWER), "refusal": None, "annotations": []}
    finish = "stop"
    usage = _usage(details=kind == "details")
    if kind == "tools":
        message["content"] = None
        message["tool_calls"] = [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
        ]
        finish = "tool_calls"
    elif kind == "custom-tool":
        message["content"] = None
        message["tool_calls"] = [{"id": "call_c", "type": "custom", "custom": {"name": "sql", "input": "SELECT 1"}}]
        finish = "tool_calls"
    elif kind == "reasoning":
        message["reasoning_content"] = "Let me think. Done."
    elif kind == "reasoning-field":
        message["reasoning"] = "Let me think. Done."
    elif kind == "extra":
        message["annotations"] = [{"type": "url_citation", "url_citation": {"url": "https://example.com"}}]
        message["audio"] = None
        message["x_vendor"] = {"score": 1}
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "created": 1,
        "model": "fault-model-v2",
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def _vector(index: int, size: int) -> list[float]:
    return [float(index + 1)] + [0.5] * (size - 1)


class FaultUpstream:
    """The ASGI app. Thread-safe to inspect from the test while uvicorn serves it in another thread."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.attempts: Counter[str] = Counter()
        self.models_status: int | None = None
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.received.clear()
            self.attempts.clear()
            self.models_status = None

    def last(self, path_end: str = "/chat/completions") -> Received:
        with self._lock:
            return next(r for r in reversed(self.received) if r.path.endswith(path_end))

    def count(self, path_end: str) -> int:
        with self._lock:
            return sum(1 for r in self.received if r.path.endswith(path_end))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = json.loads(raw) if raw else None
        record = Received(scope["method"], scope["path"], headers, body, scope["client"][1])
        with self._lock:
            self.received.append(record)
        host = headers.get("host", "")
        exchange = _Exchange(record, receive, send, host)
        path: str = scope["path"]
        if path.endswith("/models"):
            await self._models(exchange)
        elif path.endswith("/chat/completions"):
            await self._chat(exchange, body)
        elif path.endswith("/embeddings"):
            await self._embeddings(exchange, body)
        else:
            await exchange.json(404, {"error": {"message": f"Invalid URL ({path})", "type": "invalid_request_error"}})

    async def _models(self, ex: _Exchange) -> None:
        if self.models_status is not None:
            await ex.json(self.models_status, {"error": {"message": "models down", "type": "server_error"}})
            return
        data = [{"id": m, "object": "model", "created": 100 + i, "owned_by": "fault"} for i, m in enumerate(MODELS)]
        await ex.json(200, {"object": "list", "data": data}, [(b"set-cookie", b"session=one-callers; Path=/")])

    async def _errors(self, ex: _Exchange, model: str, kind: str) -> bool:
        """Answer the error models; True if one was answered."""
        with self._lock:
            self.attempts[model] += 1
            attempt = self.attempts[model]
        if kind.startswith("error-") and kind[6:].isdigit():
            status = int(kind[6:])
            body = {
                "error": {
                    "message": f"upstream refused it: bad temperature (seen at http://{ex.host}/v1)",
                    "type": "invalid_request_error",
                    "param": "temperature",
                    "code": "invalid_value",
                }
            }
            extra = [(b"retry-after", b"7")] if status == 429 else []
            await ex.json(status, body, extra)
            return True
        if kind.startswith("html-"):
            page = f"<html><body><h1>{kind[5:]} Error</h1><p>nginx at {ex.host}</p></body></html>"
            await ex.send_all(int(kind[5:]), "text/html", page.encode())
            return True
        if kind == "unknown":
            body = {
                "error": {
                    "message": f"The model `{model}` does not exist or you do not have access to it.",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            }
            await ex.json(404, body)
            return True
        if kind.startswith("flaky-") and attempt <= int(kind.removeprefix("flaky-")):
            await ex.json(503, {"error": {"message": "warming up", "type": "server_error"}})
            return True
        return False

    async def _chat(self, ex: _Exchange, body: dict[str, Any]) -> None:
        model: str = body["model"]
        kind = model.split("#")[0]
        if await self._errors(ex, model, kind):
            return
        if kind == "slow":
            await ex.wait_for_disconnect(30)
            return
        if not body.get("stream") or kind == "json":
            await ex.json(200, _completion(kind))
            return
        await ex.start(200, "text/event-stream")
        if kind == "hang":
            await ex.event(_chunk([_delta(role="assistant", content="")]))
            await ex.wait_for_disconnect(30)
            return
        if kind == "drop":
            await ex.event(_ok_chunks()[0])
            await ex.event(_ok_chunks()[1])
            return  # uvicorn closes the connection mid-body
        if kind == "malformed":
            await ex.write(b'data: {"choices": [\n\n')
            await ex.write(b"data: [DONE]\n\n")
            await ex.end()
            return
        if kind == "long-line":
            await ex.write(b'data: {"x": "' + b"a" * 4096 + b'"}\n\n')
            await ex.end()
            return
        if kind in ("error-frame", "event-error"):
            await ex.event(_ok_chunks()[0])
            error = {"error": {"message": f"overloaded mid-way at {ex.host}", "type": "server_error", "code": None}}
            if kind == "event-error":
                await ex.write(b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n")
            else:
                await ex.event(error)
            await ex.end()
            return
        if kind == "no-done":
            await ex.event(_ok_chunks()[0])
            await ex.end()
            return
        if kind in ("crlf", "cr"):
            eol = b"\r\n" if kind == "crlf" else b"\r"
            frames = [b": ping" + eol + eol, b"retry: 100" + eol]
            for n, chunk in enumerate(_ok_chunks()):
                frames.append(b"id: " + str(n).encode() + eol + b"data: " + json.dumps(chunk).encode() + eol + eol)
            frames.append(b"data: [DONE]" + eol + eol)
            data = b"".join(frames)
            for start in range(0, len(data), 5):
                await ex.write(data[start : start + 5])
            await ex.end()
            return
        for chunk in _stream_chunks(kind):
            await ex.event(chunk)
        if kind != "finished-no-done":
            await ex.write(b"data: [DONE]\n\n")
        await ex.end()

    async def _embeddings(self, ex: _Exchange, body: dict[str, Any]) -> None:
        model: str = body["model"]
        kind = model.split("#")[0]
        if await self._errors(ex, model, kind):
            return
        inputs = body["input"]
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        size = 3 if kind == "emb-nodims" else body.get("dimensions", 3)
        data: list[dict[str, Any]] = []
        for index in reversed(range(len(inputs))):
            vector: Any = _vector(index, size)
            if kind == "emb-base64":
                vector = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        if kind == "emb-short":
            data.pop()
        answer: dict[str, Any] = {"object": "list", "data": data, "model": "fault-embed-v1"}
        if kind != "emb-nousage":
            answer["usage"] = {"prompt_tokens": 11, "total_tokens": 11}
        await ex.json(200, answer)


class _Exchange:
    """One request's answer, written piece by piece."""

    def __init__(self, record: Received, receive: Receive, send: Send, host: str) -> None:
        self.record = record
        self.receive = receive
        self._send = send
        self.host = host

    async def start(self, status: int, content_type: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"content-type", content_type.encode()), *(extra or [])]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def event(self, payload: Any) -> None:
        await self.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def send_all(
        self, status: int, content_type: str, data: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        await self.start(status, content_type, extra)
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def json(self, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.send_all(status, "application/json", json.dumps(payload).encode(), extra)

    async def wait_for_disconnect(self, seconds: float) -> None:
        """Wait until the client goes away (recorded) or ``seconds`` pass."""
        with anyio.move_on_after(seconds):
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    self.record.disconnected.set()
                    return
