"""Issue 11, serve: connections are bounded by serve's own uvicorn configuration (header deadline, header size,
requests in progress), over real sockets on both of uvicorn's HTTP/1.1 parsers and through a real ``serve``
process; the SQLite key store is private (0600) with its -wal and -shm files; workers never see the secret."""

from __future__ import annotations

import json
import os
import pickle
import select
import socket
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from ozwell_asgi.cli import ConnectionLimits, main
from ozwell_asgi.stores.urls import create_private_sqlite_file
from ozwell_asgi.types import Call, ChatChunk, ModelInfo
from tests.harness import uvicorn_server
from tests.test_cli import OZWELL_ENV, cli_env, create_key, serve_process

pytestmark = pytest.mark.slow

PROTOCOLS = ["httptools", "h11"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in OZWELL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


class SlowBackend:
    """Streams a word every 50 ms until its client goes away."""

    def __init__(self) -> None:
        self.open_streams = 0

    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="slow"),)

    async def stream_chat(self, request: Any, call: Call) -> AsyncIterator[ChatChunk]:
        self.open_streams += 1
        try:
            yield ChatChunk(role="assistant", content="")
            while True:
                await anyio.sleep(0.05)
                yield ChatChunk(content=" word")
        finally:
            self.open_streams -= 1


def make_api(backend: Any = None) -> tuple[OzwellAPI, str]:
    api = OzwellAPI(secret="s" * 32, backend=backend)

    async def create() -> str:
        return (await api.keys.create(name="t", owner="o", plan="enterprise"))[1]

    return api, anyio.run(create)


@contextmanager
def served(app: Any, http: str, **limits: Any) -> Iterator[tuple[str, int]]:
    """``app`` under uvicorn with serve's own connection options (ConnectionLimits); yields (base URL, port)."""
    with uvicorn_server(app, lifespan="off", **ConnectionLimits(**limits).uvicorn_options(http=http)) as url:
        yield url, int(url.rsplit(":", 1)[1])


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def request_bytes(method: str, path: str, key: str | None = None, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_unread: dict[socket.socket, bytes] = {}  # what was received past the last response read, per socket


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The next response on ``sock`` (status, headers, body); responses are read in order, pipelined or not."""
    data = _unread.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response arrived: {data!r}")
        data += chunk
    head, _, data = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(data) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a response body")
        data += chunk
    if data[length:]:
        _unread[sock] = data[length:]
    return int(status_line.split()[1]), headers, data[:length]


def seconds_until_closed(sock: socket.socket, limit: float = 5.0) -> float:
    """How long until the server closes ``sock`` (EOF or reset); fails after ``limit`` seconds."""
    began = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {limit} s")
    return time.monotonic() - began


def assert_envelope(body: bytes, code: str) -> dict[str, Any]:
    """``body`` is OpenAI's error envelope with this ``code``; returns its ``error``."""
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    return error


# ------------------------------------------------------------------------------------ the header deadline


@pytest.mark.parametrize("http", PROTOCOLS)
def test_connections_whose_headers_never_finish_are_closed_at_the_deadline(http: str) -> None:
    api, _ = make_api()
    with served(PrefixedApp(api), http, timeout_headers=0.5) as (_, port):
        silent = connect(port)
        half = connect(port)
        half.sendall(b"GET /v1/models HTTP/1.1\r\nHost: te")
        for sock in (silent, half):
            waited = seconds_until_closed(sock)
            assert waited < 2.5
        # the deadline restarts at each response: a kept-alive connection that begins its next request and stalls
        kept = connect(port)
        kept.sendall(request_bytes("GET", "/v1/models"))
        assert read_response(kept)[0] == 401
        kept.sendall(b"GET /v1/models HTTP/1.1\r\n")
        assert 0.3 < seconds_until_closed(kept) < 2.5


@pytest.mark.parametrize("http", PROTOCOLS)
def test_headers_sent_slowly_but_within_the_deadline_are_served(http: str) -> None:
    api, key = make_api()
    with served(PrefixedApp(api), http, timeout_headers=1.5) as (_, port):
        sock = connect(port)
        data = request_bytes("GET", "/v1/models", key)
        for i in range(0, len(data), len(data) // 4 + 1):
            sock.sendall(data[i : i + len(data) // 4 + 1])
            time.sleep(0.15)
        status, _, body = read_response(sock)
        assert status == 200, body
        assert "echo" in body.decode()


@pytest.mark.parametrize("http", PROTOCOLS)
def test_long_answers_and_slow_bodies_are_not_cut_by_the_deadline(http: str) -> None:
    backend = SlowBackend()
    api, key = make_api(backend)
    stream = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": True}
    auth = {"authorization": f"Bearer {key}"}
    with (  # a stream answered for three deadlines long
        served(PrefixedApp(api), http, timeout_headers=0.4) as (url, _),
        httpx.stream("POST", url + "/v1/chat/completions", json=stream, headers=auth, timeout=10) as response,
    ):
        began, words = time.monotonic(), 0
        for line in response.iter_lines():
            words += "word" in line
            if time.monotonic() - began > 1.2:
                break
        assert words >= 10
    api, key = make_api()
    with served(PrefixedApp(api), http, timeout_headers=0.4) as (url, port):
        # a body that arrives over three deadlines is part of a request in progress, not of its headers
        sock = connect(port)
        body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "slow body"}]}).encode()
        data = request_bytes("POST", "/v1/chat/completions", key, body)
        head = len(data) - len(body)
        sock.sendall(data[:head])
        for i in range(0, len(body), len(body) // 3 + 1):
            time.sleep(0.4)
            sock.sendall(body[i : i + len(body) // 3 + 1])
        status, _, answer = read_response(sock)
        assert status == 200, answer
        assert json.loads(answer)["choices"][0]["message"]["content"] == "slow body"
        sock.sendall(request_bytes("GET", "/v1/models", key))  # and kept alive
        assert read_response(sock)[0] == 200


@pytest.mark.parametrize("http", PROTOCOLS)
def test_pipelined_requests_are_all_answered(http: str) -> None:
    api, key = make_api()
    with served(PrefixedApp(api), http, timeout_headers=0.5) as (_, port):
        sock = connect(port)
        sock.sendall(request_bytes("GET", "/v1/models", key) * 3)
        assert [read_response(sock)[0] for _ in range(3)] == [200, 200, 200]
        assert seconds_until_closed(sock) < 2.5  # idle again: the deadline applies anew


@pytest.mark.parametrize("http", PROTOCOLS)
def test_the_unread_rest_of_a_body_answered_early_is_drained_for_a_bounded_time(http: str) -> None:
    async def answers_at_once(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with served(answers_at_once, http, timeout_headers=0.5) as (_, port):
        sock = connect(port)
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000)
        assert read_response(sock)[:1] == (200,)
        stop = threading.Event()

        def trickle() -> None:  # the rest of the body, forever, one byte at a time
            while not stop.is_set():
                try:
                    sock.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.05)

        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        try:
            assert seconds_until_closed(sock) < 2.5
        finally:
            stop.set()
            feeder.join(5)


# -------------------------------------------------------------------------------------- the header size cap


@pytest.mark.parametrize("http", PROTOCOLS)
def test_request_headers_are_capped(http: str) -> None:
    api, key = make_api()
    with served(PrefixedApp(api), http, max_header_size=8192) as (_, port):
        sock = connect(port)
        sock.sendall(request_bytes("GET", "/v1/models", key, x_padding="p" * 6000))
        assert read_response(sock)[0] == 200  # under the cap
        first = connect(port)  # over it in the connection's first read
        first.sendall(b"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"p" * 20000)  # never ends
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-Padding: ")  # and in a kept-alive connection's
        for _ in range(40):  # later reads, until answered
            if select.select([sock], [], [], 0.05)[0]:
                break
            sock.sendall(b"p" * 3000)
        for answer in (read_all(first), read_all(sock)):
            assert_headers_too_large(answer, http)
        # a body larger than the cap, read together with the start of the next request, is no header
        pipelined = connect(port)
        body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "b" * 20000}]}).encode()
        second = request_bytes("GET", "/v1/models", key)
        pipelined.sendall(request_bytes("POST", "/v1/chat/completions", key, body) + second[:20])
        time.sleep(0.1)
        pipelined.sendall(second[20:])
        assert [read_response(pipelined)[0] for _ in range(2)] == [200, 200]


def read_all(sock: socket.socket) -> bytes:
    answer = _unread.pop(sock, b"")
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def assert_headers_too_large(answer: bytes, http: str) -> None:
    if http == "httptools":
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
        head, _, body = rest.partition(b"\r\n\r\n")
        assert b"x-request-id: req_" in head
        assert b"connection: close" in head
        assert_envelope(body, "request_header_fields_too_large")
    else:  # h11 enforces the same cap itself (h11_max_incomplete_event_size), with uvicorn's own answer
        assert answer.startswith(b"HTTP/1.1 400 ")


# ----------------------------------------------------------------------------------- requests in progress


@pytest.mark.parametrize("http", PROTOCOLS)
def test_requests_over_the_concurrency_limit_get_a_503_and_idle_connections_do_not_count(http: str) -> None:
    backend = SlowBackend()
    api, key = make_api(backend)
    with served(PrefixedApp(api), http, limit_concurrency=2, timeout_headers=30) as (url, port):
        stalled = [connect(port) for _ in range(8)]  # half-sent and idle connections: not requests in progress
        for sock in stalled[:4]:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\n")
        client = openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=0)
        assert client.models.list().data
        streams = [
            client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}], stream=True)
            for _ in range(2)
        ]
        for stream in streams:
            next(iter(stream))
        assert backend.open_streams == 2
        began = time.monotonic()
        with pytest.raises(openai.InternalServerError) as raised:
            client.models.list()
        assert time.monotonic() - began < 2
        response = raised.value.response
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.headers["connection"] == "close"
        assert response.headers["x-request-id"].startswith("req_")
        assert "openai-processing-ms" in response.headers
        error = assert_envelope(response.content, "service_unavailable")
        assert error["type"] == "server_error"
        for stream in streams:
            stream.close()
        deadline = time.monotonic() + 5
        while backend.open_streams and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.models.list().data  # admitted again
        client.close()


# ---------------------------------------------------------------------------------- through a real serve


def test_stalled_connections_do_not_lock_a_client_out_of_serve(tmp_path: Path) -> None:
    """The finding: connections that never finish their headers held every descriptor (here 128 of them), and
    clients waited forever. Now each is cut at --timeout-headers and a client is answered."""
    prelude = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))"
    with serve_process("--timeout-headers", "1", cwd=tmp_path, prelude=prelude) as (base, _):
        port = int(base.rsplit(":", 1)[1].split("/")[0])
        stalled = []
        for _ in range(300):  # more than the server can hold at once
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: te")
            except OSError:  # turned away at once (uvloop does that when it has no descriptor left)
                sock.close()
                continue
            stalled.append(sock)
        began, status = time.monotonic(), None
        while status is None and time.monotonic() - began < 20:
            try:
                status = httpx.get(base + "/models", timeout=5).status_code
            except httpx.TransportError:  # turned away at once while every descriptor is taken
                time.sleep(0.05)
        assert status == 401, "a client was locked out by stalled connections"
        for sock in stalled[:20]:
            assert seconds_until_closed(sock, limit=15) < 15
            sock.close()
        for sock in stalled[20:]:
            sock.close()


def test_serve_flags_and_environment_reach_uvicorn(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import uvicorn

    from ozwell_asgi.guarded_http import GuardedHttpToolsProtocol

    monkeypatch.setattr(os, "environ", dict(os.environ))
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    store = f"sqlite:///{tmp_path / 'k.db'}"
    assert main(["serve", "--store", store, "--port", "0"]) == 0
    monkeypatch.setenv("OZWELL_BACKLOG", "64")
    monkeypatch.setenv("OZWELL_MAX_HEADER_SIZE", "4096")
    monkeypatch.setenv("OZWELL_TIMEOUT_HEADERS", "99")
    argv = ["serve", "--store", store, "--port", "0", "--timeout-headers", "2.5", "--limit-concurrency", "7"]
    assert main([*argv, "--timeout-keep-alive", "3", "--timeout-graceful-shutdown", "4"]) == 0
    assert main([*argv, "--workers", "2"]) == 0
    capsys.readouterr()
    defaults, chosen, workers = calls
    assert defaults["limit_concurrency"] is None  # uvicorn's own count of connections stays off
    assert (defaults["backlog"], defaults["timeout_keep_alive"], defaults["timeout_graceful_shutdown"]) == (2048, 5, 10)
    assert defaults["ws"] == "none"
    assert defaults["http"].func is GuardedHttpToolsProtocol
    assert defaults["http"].keywords == {"header_timeout": 10, "max_header_size": 32768, "limit_concurrency": 1000}
    assert (chosen["backlog"], chosen["timeout_keep_alive"], chosen["timeout_graceful_shutdown"]) == (64, 3, 4)
    assert chosen["h11_max_incomplete_event_size"] == 4096
    assert chosen["http"].keywords == {"header_timeout": 2.5, "max_header_size": 4096, "limit_concurrency": 7}
    # workers are separate processes: what they are given must survive pickling
    assert pickle.loads(pickle.dumps(workers["http"])).keywords == chosen["http"].keywords
    monkeypatch.setenv("OZWELL_LIMIT_CONCURRENCY", "0")
    assert main(["serve", "--store", store, "--port", "0"]) == 0
    assert calls[-1]["http"].keywords["limit_concurrency"] is None  # 0: no limit
    monkeypatch.setenv("OZWELL_BACKLOG", "lots")
    assert main(["serve", "--store", store, "--port", "0"]) == 2
    assert "OZWELL_BACKLOG" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the key store's files


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The common umask (0022, files 0644 unless made otherwise), inherited by the processes a test starts."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("usual_umask")
def test_the_sqlite_key_store_and_its_wal_and_shm_files_are_private(tmp_path: Path) -> None:
    create_key(cwd=tmp_path)  # the default store, sqlite:///./ozwell.db
    assert stat.S_IMODE((tmp_path / "ozwell.db").stat().st_mode) == 0o600
    (tmp_path / "ozwell.db").unlink()
    with serve_process(cwd=tmp_path) as (base, _):  # serve makes it this time
        key = create_key(cwd=tmp_path)
        client = openai.OpenAI(api_key=key, base_url=base, max_retries=0)
        assert client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}]).choices
        files = {name: tmp_path / name for name in ("ozwell.db", "ozwell.db-wal", "ozwell.db-shm")}
        modes = {name: stat.S_IMODE(path.stat().st_mode) for name, path in files.items()}  # all exist while served
    assert modes == dict.fromkeys(files, 0o600)


def test_create_private_sqlite_file_only_creates_missing_sqlite_files(tmp_path: Path) -> None:
    made = create_private_sqlite_file(f"sqlite:///{tmp_path / 'a.db'}")
    assert made == tmp_path / "a.db"
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert create_private_sqlite_file(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}") is None  # exists: left alone
    existing = tmp_path / "shared.db"
    existing.touch(mode=0o640)
    assert create_private_sqlite_file(f"sqlite:///{existing}") is None
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    for url in (
        "memory://",
        "sqlite:///:memory:",
        "sqlite://",
        f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}",
        "postgresql://user@127.0.0.1:1/db",
        "redis://127.0.0.1:1/0",
        "sqlite:///file:x.db?mode=memory&uri=true",
    ):
        assert create_private_sqlite_file(url) is None, url
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "shared.db"]


# ------------------------------------------------------------------------------------ the workers' secret


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


def worker_environments(proc: Any, count: int) -> list[tuple[bytes, dict[str, str]]]:
    deadline = time.monotonic() + 30
    while True:
        envs = []
        for pid in descendants(proc.pid):
            try:
                envs.append((Path(f"/proc/{pid}/environ").read_bytes(), environ_of(pid)))
            except OSError:  # gone meanwhile
                continue
        if sum("OZWELL_STORE_URL" in env for _, env in envs) >= count or time.monotonic() > deadline:
            return envs
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ")
def test_workers_are_given_the_secret_files_path_never_the_secret(tmp_path: Path) -> None:
    key = create_key(cwd=tmp_path)
    secret = (tmp_path / "ozwell.secret").read_text().strip()
    with serve_process("--workers", "2", cwd=tmp_path) as (base, proc):
        envs = worker_environments(proc, 2)
        workers = [env for _, env in envs if "OZWELL_STORE_URL" in env]
        assert len(workers) >= 2
        for raw, env in envs:
            assert secret.encode() not in raw
            assert "OZWELL_SECRET" not in env
        assert {env["OZWELL_SECRET_FILE"] for env in workers} == {str((tmp_path / "ozwell.secret").resolve())}
        assert openai.OpenAI(api_key=key, base_url=base, max_retries=0).models.list().data
        # the workers run serve's connection bounds too
        half = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1].split("/")[0])), timeout=20)
        half.sendall(b"GET /v1/models HTTP/1.1\r\n")
        assert seconds_until_closed(half, limit=15) < 15


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ")
def test_a_secret_from_the_environment_reaches_workers_as_a_private_file(tmp_path: Path) -> None:
    secret = "an environment secret for the workers test"
    env = cli_env(OZWELL_SECRET=secret)
    key = create_key(cwd=tmp_path, env=env)
    with serve_process("--workers", "2", cwd=tmp_path, env=env) as (base, proc):
        envs = worker_environments(proc, 2)
        workers = [worker for _, worker in envs if "OZWELL_STORE_URL" in worker]
        assert len(workers) >= 2
        for raw, _ in envs:
            assert secret.encode() not in raw
        [path] = {Path(worker["OZWELL_SECRET_FILE"]) for worker in workers}
        assert path.read_text().strip() == secret
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert openai.OpenAI(api_key=key, base_url=base, max_retries=0).models.list().data
    assert not path.parent.exists()  # removed when serve exits
    assert not (tmp_path / "ozwell.secret").exists()
