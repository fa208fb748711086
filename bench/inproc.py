"""Our own cost per request, without a server or a socket: chat requests driven straight through the ASGI apps.

    python bench/inproc.py                    # microseconds per request: serve's app and the bare route
    python bench/inproc.py --profile plain    # cProfile of serve's app, non-streaming (or: stream)
    python bench/inproc.py --root DIR         # the same, with ozwell_asgi imported from another source tree

The app is the one ``ozwell-asgi serve`` builds (SQLite key store behind the key cache, in-memory limiter, echo
backend, an enterprise key with huge budgets), on uvloop like ``serve``. Each request gets a scope like uvicorn's,
its body in one message, and a ``receive`` that then waits until the response is complete. ``--concurrency``
requests are in flight at once. A figure is CPU time per request (this process's), the best of ``--repeat`` runs
(least disturbed by other processes).
Every answer is checked (status 200 and the body's shape), so a broken path cannot look fast.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if "--root" in sys.argv:  # import ozwell_asgi from another source tree (A/B a change), before anything imports it
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
sys.path.insert(0, str(ROOT))

MESSAGE = "Hello, Ozwell! How are you today?"
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def body(stream: bool) -> bytes:
    return json.dumps({"model": "echo", "messages": [{"role": "user", "content": MESSAGE}], "stream": stream}).encode()


async def post(app: App, path: str, key: str, payload: bytes, root_path: str = "") -> tuple[int, bytes]:
    """POST ``payload`` (JSON) to ``path`` of ``app`` as uvicorn would, with ``key``: the status and the whole body.
    The ``receive`` it gives waits, after the body, until the response is complete (as a connected client does)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": root_path,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"authorization", b"Bearer " + key.encode()),
            (b"content-length", str(len(payload)).encode()),
        ],
        "state": {},
    }
    done = asyncio.Event()
    sent = False
    status = 0
    parts: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    return status, b"".join(parts)


async def one(app: App, key: str, payload: bytes, stream: bool) -> None:
    status, text = await post(app, "/v1/chat/completions", key, payload)
    if status != 200:
        raise RuntimeError(f"status {status}: {text[:300]!r}")
    if stream:
        if not text.endswith(b"data: [DONE]\n\n") or b"Ozwell!" not in text:
            raise RuntimeError(text[-300:])
    elif json.loads(text)["choices"][0]["message"]["content"] != MESSAGE:
        raise RuntimeError(text[:300])


async def run(app: App, key: str, stream: bool, count: int, concurrency: int) -> float:
    """CPU seconds per request over ``count`` requests, ``concurrency`` at a time."""
    payload = body(stream)
    per_worker = count // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await one(app, key, payload, stream)

    began = time.process_time()  # CPU time: what other processes on the machine do is not counted
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - began) / (per_worker * concurrency)


async def build(workdir: Path, key_cache_ttl: float) -> tuple[App, App, str]:
    os.environ["OZWELL_SECRET"] = "0123456789abcdef" * 4
    from ozwell_asgi.auth import KeyHasher, KeyManager
    from ozwell_asgi.cli import ServeConfig, build_app
    from ozwell_asgi.stores.urls import key_store_from_url

    store_url = f"sqlite:///{workdir}/bench.db"
    store = key_store_from_url(store_url)
    manager = KeyManager(store, KeyHasher(os.environ["OZWELL_SECRET"]))
    _, key = await manager.create(name="bench", owner="default", plan="enterprise", rpm=10**9, tpm=10**12)
    await store.aclose()  # type: ignore[attr-defined]
    config = ServeConfig(
        store_url=store_url,
        limiter_url="memory://",
        secret=os.environ["OZWELL_SECRET"],
        key_cache_ttl=key_cache_ttl,
        file_content_url="store",
    )
    served = build_app(config)
    await served.api.startup()
    os.environ["BENCH_KEY"] = key
    from bench.bare_app import app as bare

    return served, bare, key


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        served, bare, key = await build(Path(tmp), args.key_cache_ttl)
        kinds = {"plain": (False,), "stream": (True,), None: (False, True)}[args.only or args.profile]
        if args.profile:
            stream = args.profile == "stream"
            await run(served, key, stream, 500, args.concurrency)
            profiler = cProfile.Profile()
            profiler.enable()
            await run(served, key, stream, args.count, args.concurrency)
            profiler.disable()
            stats = pstats.Stats(profiler).strip_dirs().sort_stats(args.sort)
            stats.print_stats(args.lines)
            return
        apps = {"ozwell": served, "bare": bare}
        if args.app:
            apps = {args.app: apps[args.app]}
        for stream in kinds:
            name = "streaming" if stream else "non-streaming"
            best = dict.fromkeys(apps, float("inf"))
            for app in apps.values():  # warm up
                await run(app, key, stream, args.warm, args.concurrency)
            for _ in range(args.repeat):
                for label, app in apps.items():
                    best[label] = min(best[label], await run(app, key, stream, args.count, args.concurrency))
            line = "   ".join(f"{label} {seconds * 1e6:7.1f} us" for label, seconds in best.items())
            if len(best) == 2:
                line += f"   ours beyond bare {(best['ozwell'] - best['bare']) * 1e6:7.1f} us"
            print(f"{name:>14}: {line}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--only", choices=("plain", "stream"))
    parser.add_argument("--app", choices=("ozwell", "bare"), help="measure only this app")
    parser.add_argument("--warm", type=int, default=500, help="requests before measuring")
    parser.add_argument(
        "--key-cache-ttl",
        type=float,
        default=5.0,
        help="serve's default is 5 s; under a slow profiler, raise it so misses stay as rare as in real time",
    )
    parser.add_argument("--profile", choices=("plain", "stream"))
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--lines", type=int, default=45)
    parser.add_argument("--root", help="the source tree to import ozwell_asgi from (default: this one)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
