"""A stand-in for a real model server, for bench/proxy.py: a raw ASGI app (uvicorn ``bench.model_server:app``) that
answers ``POST /v1/chat/completions`` the way vLLM or Ollama do, paced like a model generating.

A stream sends its first token ``BENCH_TTFT`` seconds after the request (the prompt's prefill), then one token
every ``BENCH_INTERVAL`` seconds, ``BENCH_TOKENS`` tokens in all, then the finish chunk, the usage chunk (when
``stream_options.include_usage``) and ``[DONE]``. A non-stream answer arrives whole after the same total time, with
its ``content-length``. The times are kept against the request's arrival, as a GPU keeps its pace whatever the CPU
does: a late wake-up on a busy machine delays one token, not all that follow. With both delays 0 it answers at once
(CPU-bound). ``BENCH_KEY``, when set, is the only bearer token accepted. ``GET /v1/models`` lists one model. Frames
are built once per (model, include_usage): its own CPU stays small.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

TTFT = float(os.environ.get("BENCH_TTFT", "0.02"))
INTERVAL = float(os.environ.get("BENCH_INTERVAL", "0.005"))
TOKENS = int(os.environ.get("BENCH_TOKENS", "32"))
KEY = os.environ.get("BENCH_KEY", "")
MODEL = "bench-model"

_AUTH = f"Bearer {KEY}".encode()
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_MAX_BODY = 1024 * 1024
_frames: dict[tuple[str, bool], list[bytes]] = {}
_answers: dict[str, bytes] = {}


def _frames_for(model: str, usage: bool) -> list[bytes]:
    """One frame per token (the first also carries the role), then the finish (with usage and ``[DONE]``)."""
    frames = _frames.get((model, usage))
    if frames is None:
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": model,
                "system_fingerprint": "fp_bench"}  # fmt: skip

        def frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"

        frames = [frame({"role": "assistant", "content": "tok"})]
        frames += [frame({"content": " tok"}) for _ in range(TOKENS - 1)]
        last = frame({}, "stop")
        if usage:
            counts = {"prompt_tokens": 12, "completion_tokens": TOKENS, "total_tokens": 12 + TOKENS}
            last += b"data: " + json.dumps({**base, "choices": [], "usage": counts}).encode() + b"\n\n"
        frames.append(last + b"data: [DONE]\n\n")
        _frames[(model, usage)] = frames
    return frames


def _answer_for(model: str) -> bytes:
    answer = _answers.get(model)
    if answer is None:
        message = {"role": "assistant", "content": "tok" + " tok" * (TOKENS - 1)}
        answer = json.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "system_fingerprint": "fp_bench",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": TOKENS, "total_tokens": 12 + TOKENS},
            }
        ).encode()
        _answers[model] = answer
    return answer


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _chat(receive: Any, send: Any) -> None:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > _MAX_BODY:
            await _respond(send, 413, _JSON, b'{"error": {"message": "too large", "type": "invalid_request_error"}}')
            return
        if not message.get("more_body"):
            break
    start = asyncio.get_running_loop().time()
    request = json.loads(b"".join(chunks))
    model = str(request.get("model", MODEL))
    if not request.get("stream"):
        await _until(start + TTFT + INTERVAL * (TOKENS - 1))
        await _respond(send, 200, _JSON, _answer_for(model))
        return
    usage = bool((request.get("stream_options") or {}).get("include_usage"))
    frames = _frames_for(model, usage)
    await _until(start + TTFT)
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        if 0 < i < last:
            await _until(start + TTFT + INTERVAL * i)
        await send({"type": "http.response.body", "body": frame, "more_body": i < last})


async def _until(moment: float) -> None:
    """Sleep until ``moment`` (the loop's clock): a late wake-up delays one token, not every one after it."""
    delay = moment - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] != "http":
        return
    auth = dict(scope["headers"]).get(b"authorization", b"")
    if KEY and auth != _AUTH:
        await _respond(send, 401, _JSON, b'{"error": {"message": "bad key", "type": "invalid_request_error"}}')
        return
    path, method = scope["path"], scope["method"]
    if path == "/v1/chat/completions" and method == "POST":
        await _chat(receive, send)
    elif path == "/v1/models" and method == "GET":
        listing = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1, "owned_by": "bench"}]}
        await _respond(send, 200, _JSON, json.dumps(listing).encode())
    else:
        await _respond(send, 404, _JSON, b'{"error": {"message": "no such route", "type": "invalid_request_error"}}')
