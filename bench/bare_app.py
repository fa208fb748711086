"""The baseline: a bare Starlette route doing the minimum an OpenAI-compatible endpoint must do.

It parses the JSON body, checks the bearer token against one known key, and returns a chat.completion (or streams
the same chunks the echo backend would, word by word, then ``[DONE]``). No validation, no limits, no counting.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

KEY = os.environ.get("BENCH_KEY", "")
_WORDS = re.compile(r"\s*\S+|\s+")


async def chat(request: Request) -> Response:
    if request.headers.get("authorization") != f"Bearer {KEY}":
        return JSONResponse({"error": {"message": "bad key", "type": "authentication_error"}}, status_code=401)
    body = json.loads(await request.body())
    text = body["messages"][-1]["content"]
    cid, created, model = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), body["model"]
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def frames() -> AsyncIterator[bytes]:
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        deltas = [{"role": "assistant", "content": ""}] + [{"content": w} for w in _WORDS.findall(text)]
        for delta in deltas:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield b"data: " + json.dumps(done).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
