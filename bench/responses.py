"""A chained 10-turn conversation over the Responses API, turn by turn, against the same turns as chat completions.

    python bench/responses.py                          # memory and SQLite response stores
    python bench/responses.py --store redis://127.0.0.1:6379/0 --store postgresql://postgres@127.0.0.1/test

Each Responses turn sends only the new message and names the previous response (``previous_response_id``): the
server loads the stored conversation, sends the backend all of it and stores the new turn. Each chat turn sends the
whole conversation so far, as a chat client must. Both run in-process (the ASGI app called directly, no socket),
on the echo backend, with an enterprise key whose budgets never bind; conversations alternate between the two so
that load from other processes falls on both alike. A figure is the median over ``--conversations`` of one turn's
wall time; every answer is checked (status 200, the echo of the turn's message), so a broken path cannot look fast.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.inproc import post  # noqa: E402  # the same in-process request driver as the chat bench

TURNS = 10
QUESTION = "Turn {n}: tell me something about the number {n}, in one short sentence please."


async def call(app: Any, path: str, key: str, payload: dict[str, Any]) -> dict[str, Any]:
    """POST ``payload`` to ``path`` of the API (mounted at /v1) as uvicorn would; the parsed answer, or an error."""
    status, text = await post(app, "/v1" + path, key, json.dumps(payload).encode(), root_path="/v1")
    answer: dict[str, Any] = json.loads(text)
    if status != 200:
        raise RuntimeError(f"{path}: status {status}: {answer}")
    return answer


CREATED: list[str] = []  # response ids, deleted when a store is done: the servers are shared


async def responses_conversation(app: Any, key: str) -> list[float]:
    times = []
    previous: str | None = None
    for n in range(1, TURNS + 1):
        question = QUESTION.format(n=n)
        payload: dict[str, Any] = {"model": "echo", "input": question}
        if previous is not None:
            payload["previous_response_id"] = previous
        began = time.perf_counter()
        answer = await call(app, "/responses", key, payload)
        times.append(time.perf_counter() - began)
        text = answer["output"][0]["content"][0]["text"]
        if text != question:
            raise RuntimeError(f"responses turn {n}: {text!r}")
        previous = answer["id"]
        CREATED.append(previous)
    return times


async def chat_conversation(app: Any, key: str) -> list[float]:
    times = []
    messages: list[dict[str, str]] = []
    for n in range(1, TURNS + 1):
        question = QUESTION.format(n=n)
        messages.append({"role": "user", "content": question})
        began = time.perf_counter()
        answer = await call(app, "/chat/completions", key, {"model": "echo", "messages": messages})
        times.append(time.perf_counter() - began)
        text = answer["choices"][0]["message"]["content"]
        if text != question:
            raise RuntimeError(f"chat turn {n}: {text!r}")
        messages.append({"role": "assistant", "content": text})
    return times


async def measure(store_url: str, conversations: int) -> list[tuple[float, float]]:
    from ozwell_asgi import OzwellAPI

    app = OzwellAPI(response_store=store_url, key_cache_ttl=1e6)
    try:
        _, key = await app.keys.create(name="bench", owner="bench", plan="enterprise", rpm=10**9, tpm=10**12)
        await app.startup()
        for _ in range(3):  # warm up: tables, pools, the tokenizer's caches
            await responses_conversation(app, key)
            await chat_conversation(app, key)
        per_turn: list[tuple[list[float], list[float]]] = [([], []) for _ in range(TURNS)]
        for _ in range(conversations):
            for n, seconds in enumerate(await responses_conversation(app, key)):
                per_turn[n][0].append(seconds)
            for n, seconds in enumerate(await chat_conversation(app, key)):
                per_turn[n][1].append(seconds)
        return [(statistics.median(r), statistics.median(c)) for r, c in per_turn]
    finally:
        store = app.services.responses
        while CREATED and store is not None:
            await store.delete("bench", CREATED.pop())
        await app.aclose()


def report(label: str, rows: list[tuple[float, float]]) -> None:
    print(f"\nresponse store {label}: median ms per turn (responses, chained / chat completions, whole history)")
    print("| turn | responses | chat | responses / chat |")
    print("|---|---|---|---|")
    for n, (r, c) in enumerate(rows, 1):
        print(f"| {n} | {r * 1e3:.2f} | {c * 1e3:.2f} | {r / c:.2f} |")
    total_r = sum(r for r, _ in rows)
    total_c = sum(c for _, c in rows)
    print(f"| all 10 | {total_r * 1e3:.2f} | {total_c * 1e3:.2f} | {total_r / total_c:.2f} |")


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stores = args.store or ["memory://", f"sqlite:///{tmp}/responses.db"]
        for url in stores:
            rows = await measure(url, args.conversations)
            report(url.split("@")[-1] if "@" in url else url.replace(tmp, "<tmp>"), rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", action="append", help="a response store URL (repeatable)")
    parser.add_argument("--conversations", type=int, default=30)
    args = parser.parse_args()
    import uvloop

    uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
