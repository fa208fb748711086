"""The /files API: uploads streamed to the store in any part order and all or nothing, the size cap, pages, content
with Range, owner isolation, metering, the wire shapes, and the official Python SDK in-process and over a socket.

The tests that touch what a store keeps run over every FileStore adapter (the ``file_store`` fixture); the rest
(validation, caps, the route table) over the memory store alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx2
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp, _Endpoint, _RouteTable
from ozwell_asgi.context import Settings
from ozwell_asgi.multipart import CHUNK_BYTES, MAX_FIELDS
from ozwell_asgi.protocols import ContentStore, FileStore
from ozwell_asgi.ratelimit import LimitsRateLimiter
from ozwell_asgi.routes import ROUTES, RouteRow
from ozwell_asgi.stores.content import content_store_from_url
from ozwell_asgi.stores.memory import MemoryFileStore
from ozwell_asgi.stores.redis import RedisFileStore
from ozwell_asgi.stores.sql import SQLFileStore
from ozwell_asgi.stores.urls import StorageOptions, Storages
from ozwell_asgi.types import Message, PageQuery, StoredFile
from ozwell_asgi.wire.files import sanitize_filename
from tests.harness import async_openai, raw_client, sync_openai, uvicorn_server
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
BOUNDARY = "ozwellboundary0123456789"
NOW = 1_800_000_030.0  # 30 s into a 60 s rate-limit window


def fixed_clock() -> float:
    return NOW


# --- the stores every adapter test runs over: add an adapter here when it lands ---------------------------------


def _sqlite(request: pytest.FixtureRequest) -> str:
    return f"sqlite:///{request.getfixturevalue('tmp_path') / 'files.db'}"


def _postgres(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("postgres_url")
    return url


def _redis(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("redis_url")
    return url


def _local_content(request: pytest.FixtureRequest) -> ContentStore:
    return content_store_from_url(f"file://{request.getfixturevalue('tmp_path') / 'content'}")


# name -> (metadata storage URL, content store or None: the content lives with the metadata)
STORES: dict[str, tuple[Callable[[pytest.FixtureRequest], str], Callable[[pytest.FixtureRequest], ContentStore] | None]]
STORES = {
    "memory": (lambda request: "memory://", None),
    "sqlite": (_sqlite, None),
    "sqlite+local-dir": (_sqlite, _local_content),
    "postgresql": (_postgres, None),
    "redis": (_redis, None),
}


@pytest.fixture(params=sorted(STORES))
def storage(request: pytest.FixtureRequest, redis_prefix: str) -> tuple[str, ContentStore | None, str]:
    """An adapter's metadata URL, content store and Redis prefix (a sync fixture: it may start services)."""
    url_of, content_of = STORES[request.param]
    return url_of(request), None if content_of is None else content_of(request), redis_prefix


@pytest.fixture
async def file_store(storage: tuple[str, ContentStore | None, str]) -> AsyncIterator[FileStore]:
    url, content, prefix = storage
    storages = Storages(StorageOptions(redis_prefix=prefix))
    yield storages.file_store(url, content)
    await storages.aclose()


class World:
    """An app over ``store`` with keys: two of alice's, one of bob's (all 1000 requests/min)."""

    def __init__(self, store: FileStore, settings: Settings | None = None) -> None:
        self.store = store
        self.api = OzwellAPI(
            secret=SECRET,
            file_store=store,
            settings=settings,
            rate_limiter=LimitsRateLimiter("memory://", clock=fixed_clock),
        )

    async def setup(self) -> World:
        keys = self.api.keys
        _, self.alice = await keys.create(name="alice", owner="alice", rpm=1000)
        _, self.alice2 = await keys.create(name="alice 2", owner="alice", rpm=1000)
        _, self.bob = await keys.create(name="bob", owner="bob", rpm=1000)
        return self

    async def stored(self, owner: str = "alice") -> list[StoredFile]:
        return list((await self.store.list(owner, PageQuery(limit=100))).data)


@pytest.fixture
async def world(file_store: FileStore) -> AsyncIterator[World]:
    world = await World(file_store).setup()
    yield world
    await world.api.aclose()


async def memory_world(settings: Settings | None = None, store: FileStore | None = None) -> World:
    return await World(store or MemoryFileStore(), settings).setup()


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def envelope(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    validate("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# --- multipart by hand ------------------------------------------------------------------------------------------

Part = tuple[str, str] | tuple[str, str, bytes] | tuple[str, str, bytes, str]


def part_bytes(part: Part, boundary: str = BOUNDARY) -> bytes:
    """One part: ``(name, value)`` is a text field, ``(name, filename, content[, content_type])`` a file."""
    head = f"--{boundary}\r\n".encode()
    if len(part) == 2:
        name, value = part
        return head + f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    name, filename, content = part[0], part[1], part[2]
    content_type = part[3] if len(part) == 4 else "application/octet-stream"
    disposition = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
    return head + (disposition + f"Content-Type: {content_type}\r\n\r\n").encode() + content + b"\r\n"


def form(*parts: Part, boundary: str = BOUNDARY) -> bytes:
    return b"".join(part_bytes(p, boundary) for p in parts) + f"--{boundary}--\r\n".encode()


def form_headers(key: str, boundary: str = BOUNDARY) -> dict[str, str]:
    return {**auth(key), "content-type": f"multipart/form-data; boundary={boundary}"}


async def upload(api: OzwellAPI, key: str, body: bytes | AsyncIterable[bytes], **headers: str) -> httpx2.Response:
    async with raw_client(api) as http:
        return await http.post("/files", content=body, headers={**form_headers(key), **headers})


class Pulled:
    """A request body in pieces that records how many the server pulled."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            self.pulled += 1
            yield piece


def split_after_the_file(body: bytes) -> Pulled:
    """``body`` in two messages, the second starting at the part after the file: the store is called (and given
    the file's bytes) before the fields that follow the file have arrived."""
    file_at = body.index(b'name="file"')
    cut = body.index(f"\r\n--{BOUNDARY}".encode(), file_at)
    return Pulled(body[:cut], body[cut:])


async def asgi_post(app: Any, headers: list[tuple[bytes, bytes]], messages: list[Message]) -> tuple[int, bytes]:
    """POST /v1/files straight into the app: ``messages`` from ``receive``, then it blocks (a stalled client)."""
    sent: list[Message] = []
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/files",
        "raw_path": b"/v1/files",
        "root_path": "/v1",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    with anyio.fail_after(5):
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


# --- the official Python SDK ------------------------------------------------------------------------------------


def sdk_round_trip(client: openai.OpenAI, payload: bytes) -> dict[str, Any]:
    """create → retrieve → list (auto-paginated) → content → delete → 404, with the SDK alone."""
    created = client.files.create(file=("notes.jsonl", payload, "application/jsonl"), purpose="fine-tune")
    assert created.object == "file"
    assert created.id.startswith("file-")
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        len(payload),
        "notes.jsonl",
        "fine-tune",
        "processed",
    )
    assert client.files.retrieve(created.id) == created
    others = [client.files.create(file=(f"{i}.txt", b"x" * i), purpose="user_data").id for i in range(4)]
    listed = [f.id for f in client.files.list(limit=2)]  # auto-pagination: three pages
    assert sorted(listed) == sorted([created.id, *others])
    assert [f.id for f in client.files.list(purpose="fine-tune")] == [created.id]
    content = client.files.content(created.id)
    assert content.content == payload
    assert content.response.headers["content-type"] == "application/jsonl"
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError) as gone:
        client.files.retrieve(created.id)
    assert gone.value.code == "file_not_found"
    return {"listed": listed}


def loop_bound(store: FileStore) -> bool:
    """Whether the store's connections belong to the test's event loop (asyncpg and redis-py pools): the sync SDK
    tests serve the app on another loop, so they run on the other adapters; the async SDK test covers these."""
    return isinstance(store, RedisFileStore) or (
        isinstance(store, SQLFileStore) and store.db.engine.dialect.name == "postgresql"
    )


async def test_the_async_python_sdk_in_process(world: World) -> None:
    """create → retrieve → list (auto-paginated) → content → delete → 404, with the async SDK, on every adapter."""
    client = async_openai(world.api, world.alice, max_retries=0)
    payload = b'{"prompt": "hello"}\n' * 1000
    created = await client.files.create(file=("notes.jsonl", payload, "application/jsonl"), purpose="fine-tune")
    assert (created.bytes, created.filename, created.purpose) == (len(payload), "notes.jsonl", "fine-tune")
    assert await client.files.retrieve(created.id) == created
    others = [(await client.files.create(file=(f"{i}.txt", b"x" * i), purpose="user_data")).id for i in range(4)]
    listed = [f.id async for f in client.files.list(limit=2)]
    assert sorted(listed) == sorted([created.id, *others])
    assert (await client.files.content(created.id)).content == payload
    assert (await client.files.delete(created.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(created.id)
    await client.close()


async def test_the_python_sdk_in_process(world: World) -> None:
    if loop_bound(world.store):
        pytest.skip("the adapter's pool belongs to the test's loop; the async SDK test covers it")
    payload = b'{"prompt": "hello"}\n' * 1000

    def run() -> dict[str, Any]:
        with sync_openai(world.api, world.alice) as client:
            return sdk_round_trip(client, payload)

    result = await anyio.to_thread.run_sync(run)
    assert len(result["listed"]) == 5
    assert len(await world.stored()) == 4


async def test_the_python_sdk_over_a_socket(world: World) -> None:
    if loop_bound(world.store):
        pytest.skip("the adapter's pool belongs to the test's loop; the async SDK test covers it")
    payload = bytes(range(256)) * 8192  # 2 MiB, many request messages

    def run() -> None:
        with uvicorn_server(PrefixedApp(world.api)) as url:
            client = openai.OpenAI(api_key=world.alice, base_url=url + "/v1", max_retries=0)
            sdk_round_trip(client, payload)
            with client.files.with_streaming_response.content(client.files.list(limit=1).data[0].id) as response:
                assert response.headers["content-disposition"].startswith("attachment; ")
            client.close()

    await anyio.to_thread.run_sync(run)


async def test_the_sdk_sends_expires_after_and_evals() -> None:
    world = await memory_world()

    def run() -> None:
        with sync_openai(world.api, world.alice) as client:
            batch = client.files.create(
                file=("b.jsonl", b"{}\n"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 7200}
            )
            assert batch.expires_at == batch.created_at + 7200
            evals = client.files.create(file=("e.jsonl", b"{}\n"), purpose="evals")
            assert evals.purpose == "evals"  # OpenAIFile's published enum lacks it: answered as given
            assert evals.expires_at is None

    await anyio.to_thread.run_sync(run)


async def test_bodies_validate_against_openai_schemas(world: World) -> None:
    async with raw_client(world.api) as http:
        empty = (await http.get("/files", headers=auth(world.alice))).json()
        assert empty == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
        created = await http.post(
            "/files",
            content=form(("purpose", "assistants"), ("file", "a.pdf", b"%PDF-1.4", "application/pdf")),
            headers=form_headers(world.alice),
        )
        validate("OpenAIFile", created.json())
        expiring = await http.post(
            "/files",
            content=form(
                ("file", "b.txt", b"b"), ("purpose", "batch"), ("expires_after[anchor]", "created_at"),
                ("expires_after[seconds]", "3600"),
            ),
            headers=form_headers(world.alice),
        )  # fmt: skip
        validate("OpenAIFile", expiring.json())
        assert set(created.json()) == {"id", "object", "bytes", "created_at", "filename", "purpose", "status"}
        assert expiring.json()["expires_at"] == expiring.json()["created_at"] + 3600
        listed = (await http.get("/files", headers=auth(world.alice))).json()
        validate("ListFilesResponse", listed)
        retrieved = (await http.get(f"/files/{created.json()['id']}", headers=auth(world.alice))).json()
        validate("OpenAIFile", retrieved)
        deleted = (await http.delete(f"/files/{created.json()['id']}", headers=auth(world.alice))).json()
        validate("DeleteFileResponse", deleted)


# --- uploads: order, all or nothing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order",
    ["purpose first", "file first", "fields around the file"],
)
async def test_the_order_of_the_parts_does_not_matter(world: World, order: str) -> None:
    content = b"0123456789" * 50_000
    file_part: Part = ("file", "data.jsonl", content, "application/jsonl")
    purpose: Part = ("purpose", "batch")
    anchor: Part = ("expires_after[anchor]", "created_at")
    seconds: Part = ("expires_after[seconds]", "86400")
    parts = {
        "purpose first": (purpose, anchor, seconds, file_part),
        "file first": (file_part, purpose, seconds, anchor),
        "fields around the file": (purpose, anchor, file_part, seconds),
    }[order]
    response = await upload(world.api, world.alice, split_after_the_file(form(*parts)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["purpose"], body["bytes"], body["filename"]) == ("batch", len(content), "data.jsonl")
    assert body["expires_at"] == body["created_at"] + 86400
    [stored] = await world.stored()
    assert (stored.purpose, stored.expires_at, stored.bytes) == ("batch", body["expires_at"], len(content))
    async with raw_client(world.api) as http:
        download = await http.get(f"/files/{body['id']}/content", headers=auth(world.alice))
    assert download.content == content


@pytest.mark.parametrize(
    ("parts", "param", "code"),
    [
        ((("file", "a.txt", b"abc"), ("purpose", "nonsense")), "purpose", "invalid_value"),
        ((("file", "a.txt", b"abc"),), "purpose", "missing_required_parameter"),
        ((("purpose", "batch"), ("file", "a.txt", b"abc"), ("expires_after[seconds]", "60")), None, None),
        ((("file", "a.txt", b"abc"), ("purpose", "batch"), ("colour", "blue")), "colour", "unknown_parameter"),
        ((("purpose", "batch"), ("file", "a.txt", b"abc"), ("file", "b.txt", b"def")), "file", None),
    ],
    ids=["bad purpose after", "no purpose", "half an expiry after", "unknown field after", "second file"],
)
async def test_a_bad_field_after_the_file_leaves_nothing(
    world: World, parts: tuple[Part, ...], param: str | None, code: str | None
) -> None:
    response = await upload(world.api, world.alice, split_after_the_file(form(*parts)))
    assert response.status_code == 400, response.text
    error = envelope(response)
    if param is not None:
        assert (error["param"], error["code"]) == (param, code)
    assert await world.stored() == []


async def test_a_client_gone_mid_upload_leaves_nothing(world: World) -> None:
    head = part_bytes(("purpose", "assistants")) + part_bytes(("file", "a.bin", b"x" * 200_000))[:150_000]
    status, body = await asgi_post(
        world.api,
        [(k.encode(), v.encode()) for k, v in form_headers(world.alice).items()],
        [
            {"type": "http.request", "body": head[:100_000], "more_body": True},
            {"type": "http.request", "body": head[100_000:], "more_body": True},
            {"type": "http.disconnect"},
        ],
    )
    assert status == 400
    assert b"disconnected" in body
    assert await world.stored() == []


async def test_a_body_cut_before_its_closing_boundary_leaves_nothing(world: World) -> None:
    body = form(("purpose", "assistants"), ("file", "a.bin", b"x" * 1000))
    response = await upload(world.api, world.alice, body[: -len(f"--{BOUNDARY}--\r\n") - 10])
    assert response.status_code == 400
    assert "closing boundary" in envelope(response)["message"]
    assert await world.stored() == []


async def test_the_file_streams_to_the_store_in_bounded_pieces() -> None:
    """The store gets the file while the body is still arriving, in pieces of at least CHUNK_BYTES but the last,
    however small the request's messages are."""
    seen: list[tuple[int, int]] = []  # (piece size, body pieces the client had sent when the store got it)
    body = Pulled()

    class Recording(MemoryFileStore):
        async def create(self, file: StoredFile, content: AsyncIterable[bytes]) -> StoredFile:
            async def watched() -> AsyncIterator[bytes]:
                async for chunk in content:
                    seen.append((len(chunk), body.pulled))
                    yield chunk

            return await super().create(file, watched())

    world = await memory_world(store=Recording())
    payload = bytes(range(256)) * 4096  # 1 MiB
    whole = form(("purpose", "assistants"), ("file", "a.bin", payload))
    body.pieces = tuple(whole[i : i + 1000] for i in range(0, len(whole), 1000))  # 1 kB messages
    response = await upload(world.api, world.alice, body)
    assert response.status_code == 200, response.text
    sizes = [size for size, _ in seen]
    assert sum(sizes) == len(payload)
    assert all(size >= CHUNK_BYTES for size in sizes[:-1])
    assert max(sizes) < CHUNK_BYTES + 1000
    assert seen[0][1] < len(body.pieces) // 2  # the first piece was stored long before the body ended


async def test_a_store_that_reads_the_fields_early_is_caught() -> None:
    """FileStore.create must read a file's fields (beyond id and owner) once its content has ended: a store that
    keeps them as they were when it was called would keep fields sent after the file wrong. Such an upload is
    removed and answered 500; uploads whose fields all came first are unaffected."""

    class EarlyReader(MemoryFileStore):
        async def create(self, file: StoredFile, content: AsyncIterable[bytes]) -> StoredFile:
            snapshot = dataclasses.replace(file)  # every field, read before the content
            stored = await super().create(snapshot, content)
            return dataclasses.replace(file, bytes=stored.bytes)

    world = await memory_world(store=EarlyReader())
    body = split_after_the_file(form(("file", "a.txt", b"abc"), ("purpose", "batch")))
    late = await upload(world.api, world.alice, body)
    assert late.status_code == 500
    assert await world.stored() == []
    early = await upload(world.api, world.alice, form(("purpose", "batch"), ("file", "a.txt", b"abc")))
    assert early.status_code == 200
    assert [f.purpose for f in await world.stored()] == ["batch"]


# --- uploads: caps and bad input ----------------------------------------------------------------------------------


async def test_the_size_cap_answers_413_as_soon_as_it_is_passed() -> None:
    world = await memory_world(Settings(max_file_size=100_000))
    head = part_bytes(("purpose", "assistants"))[:-2] + b"\r\n"
    file_head = part_bytes(("file", "big.bin", b""))[:-2]
    body = Pulled(head + file_head, *([b"y" * 30_000] * 10), f"\r\n--{BOUNDARY}--\r\n".encode())
    response = await upload(world.api, world.alice, body)
    assert response.status_code == 413
    error = envelope(response)
    assert (error["code"], error["param"]) == ("payload_too_large", "file")
    assert error["message"] == "The file is too large: the limit is 100000 bytes."
    assert body.pulled == 5  # 4 x 30 kB passed the cap: the rest was never read
    assert await world.stored() == []
    exact = await upload(world.api, world.alice, form(("purpose", "assistants"), ("file", "ok.bin", b"z" * 100_000)))
    assert exact.status_code == 200
    assert exact.json()["bytes"] == 100_000


async def test_the_size_cap_over_a_socket() -> None:
    """A declared length over the cap, and a chunked body passing it: 413 through the SDK and raw HTTP, and the
    connection still serves the next request."""
    world = await memory_world(Settings(max_file_size=1_000_000))

    def run() -> None:
        with uvicorn_server(PrefixedApp(world.api)) as url:
            client = openai.OpenAI(api_key=world.alice, base_url=url + "/v1", max_retries=0)
            with pytest.raises(openai.APIStatusError) as refused:
                client.files.create(file=("big.bin", b"x" * 3_000_000), purpose="batch")
            assert (refused.value.status_code, refused.value.code) == (413, "payload_too_large")
            assert client.files.create(file=("small.bin", b"x" * 1000), purpose="batch").bytes == 1000
            client.close()

            def chunked() -> Iterator[bytes]:
                yield part_bytes(("purpose", "batch")) + part_bytes(("file", "big.bin", b""))[:-2]
                for _ in range(40):
                    yield b"y" * 100_000
                yield f"\r\n--{BOUNDARY}--\r\n".encode()

            with httpx2.Client(base_url=url) as http:
                response = http.post("/v1/files", content=chunked(), headers=form_headers(world.alice))
            assert response.status_code == 413
            assert response.json()["error"]["param"] == "file"

    await anyio.to_thread.run_sync(run)
    assert len(await world.stored()) == 1


async def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    world = await memory_world(Settings(max_file_size=100_000))
    status, body = await asgi_post(
        world.api,
        [
            *[(k.encode(), v.encode()) for k, v in form_headers(world.alice).items()],
            (b"content-length", b"10000000"),
        ],
        [],  # receive would block: nothing is read
    )
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"


async def test_a_full_memory_store_answers_413() -> None:
    world = await memory_world(store=MemoryFileStore(max_total_bytes=1000))
    first = await upload(world.api, world.alice, form(("purpose", "assistants"), ("file", "a", b"a" * 600)))
    assert first.status_code == 200
    second = await upload(world.api, world.alice, form(("purpose", "assistants"), ("file", "b", b"b" * 600)))
    assert second.status_code == 413
    assert envelope(second)["code"] == "file_store_full"
    assert len(await world.stored()) == 1


async def test_a_bad_purpose_before_the_file_is_refused_before_its_bytes() -> None:
    world = await memory_world()
    body = Pulled(part_bytes(("purpose", "wrong")) + part_bytes(("file", "a", b""))[:-2], b"x" * 100_000, b"x")
    response = await upload(world.api, world.alice, body)
    assert response.status_code == 400
    error = envelope(response)
    assert error == {
        "message": "Invalid value: 'wrong'. Supported values are: 'assistants', 'batch', 'fine-tune', 'vision', "
        "'user_data', and 'evals'.",
        "type": "invalid_request_error",
        "param": "purpose",
        "code": "invalid_value",
    }
    assert body.pulled == 1


@pytest.mark.parametrize(
    ("fields", "param", "code", "message"),
    [
        (
            [("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "60")],
            "expires_after.seconds",
            "invalid_value",
            "Invalid 'expires_after.seconds': integer below minimum value. Expected a value >= 3600, but got 60 "
            "instead.",
        ),
        (
            [("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "2592001")],
            "expires_after.seconds",
            "invalid_value",
            None,
        ),
        (
            [("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "soon")],
            "expires_after.seconds",
            "invalid_type",
            None,
        ),
        (
            [("expires_after[anchor]", "last_used"), ("expires_after[seconds]", "3600")],
            "expires_after.anchor",
            "invalid_value",
            None,
        ),
        ([("expires_after[anchor]", "created_at")], "expires_after.seconds", "missing_required_parameter", None),
        ([("expires_after", "3600")], "expires_after", "invalid_type", None),
        (
            [("expires_after[anchor]", "created_at"), ("expires_after[seconds]", "3600"), ("expires_after[days]", "3")],
            "expires_after.days",
            "unknown_parameter",
            None,
        ),
    ],
)
async def test_expires_after_is_checked_as_openai_does(
    fields: list[tuple[str, str]], param: str, code: str, message: str | None
) -> None:
    world = await memory_world()
    file: Part = ("file", "a", b"a")
    for parts in ([("purpose", "batch"), *fields, file], [file, ("purpose", "batch"), *fields]):
        response = await upload(world.api, world.alice, form(*parts))
        assert response.status_code == 400, response.text
        error = envelope(response)
        assert (error["param"], error["code"]) == (param, code)
        if message is not None:
            assert error["message"] == message
    assert await world.stored() == []


async def test_bad_multipart_is_a_400_in_the_envelope() -> None:
    world = await memory_world()
    headers = form_headers(world.alice)
    cases: list[tuple[bytes, dict[str, str], int]] = [
        (b"garbage without a boundary", headers, 400),
        (b"--x\r\nno-colon-header\r\n\r\n", {**headers, "content-type": "multipart/form-data; boundary=x"}, 400),
        (form(("purpose", "batch")), {**headers, "content-type": "multipart/form-data"}, 400),
        (form(("purpose", "batch")), {**headers, "content-type": "multipart/form-data; boundary=" + "b" * 71}, 400),
        (b'{"purpose": "batch"}', {**headers, "content-type": "application/json"}, 415),
        (form(("purpose", "batch")), headers, 400),  # no file
        (f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(), headers, 400),
        (form(("purpose", "x" * 2000), ("file", "a", b"a")), headers, 400),
        (form(*[(f"f{i}", "v") for i in range(MAX_FIELDS + 1)], ("file", "a", b"a")), headers, 400),
    ]
    for body, sent_headers, status in cases:
        async with raw_client(world.api) as http:
            response = await http.post("/files", content=body, headers=sent_headers)
        assert response.status_code == status, (body[:80], response.text)
        envelope(response)
    async with raw_client(world.api) as http:
        no_file = await http.post("/files", content=form(("purpose", "batch")), headers=headers)
    assert (envelope(no_file)["param"], envelope(no_file)["code"]) == ("file", "missing_required_parameter")
    assert await world.stored() == []


async def test_a_stalled_upload_is_dropped_with_a_408() -> None:
    world = await memory_world(Settings(body_idle_timeout=0.05))
    head = part_bytes(("purpose", "assistants")) + part_bytes(("file", "a", b"x" * 1000))[:500]
    status, body = await asgi_post(
        world.api,
        [(k.encode(), v.encode()) for k, v in form_headers(world.alice).items()],
        [{"type": "http.request", "body": head, "more_body": True}],
    )
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert await world.stored() == []


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\notes.txt", "notes.txt"),
        ("dir\\sub/../x.txt", "x.txt"),
        ("a\x00b\x1fc\x7f.txt", "abc.txt"),
        ("evil\u202etxt.exe", "eviltxt.exe"),
        ("line\u2028break.txt", "linebreak.txt"),
        ("..", "upload"),
        ("   ", "upload"),
        ("", "upload"),
        ("日本語のファイル.csv", "日本語のファイル.csv"),
    ],
)
def test_filenames_are_sanitised(sent: str, stored: str) -> None:
    assert sanitize_filename(sent) == stored


def test_long_filenames_are_cut_keeping_the_extension() -> None:
    name = sanitize_filename("é" * 300 + ".jsonl")
    assert len(name.encode()) <= 255
    assert name.endswith(".jsonl") and name.startswith("é")
    assert len(sanitize_filename("x" * 1000).encode()) == 255


async def test_the_stored_filename_and_type_are_sanitised_end_to_end() -> None:
    world = await memory_world()
    image: Part = ("file", "../secret/ïmage.png", b"\x89PNG", "Image/PNG; x=y")
    response = await upload(world.api, world.alice, form(("purpose", "vision"), image))
    body = response.json()
    assert body["filename"] == "ïmage.png"
    async with raw_client(world.api) as http:
        download = await http.get(f"/files/{body['id']}/content", headers=auth(world.alice))
    assert download.headers["content-type"] == "image/png"
    assert download.headers["content-disposition"] == (
        "attachment; filename=\"_mage.png\"; filename*=UTF-8''%C3%AFmage.png"
    )
    assert download.headers["x-content-type-options"] == "nosniff"
    odd = await upload(world.api, world.alice, form(("purpose", "vision"), ("file", "a", b"a", "text/html\x0bx")))
    assert (await world.store.get("alice", odd.json()["id"])).content_type == "application/octet-stream"  # type: ignore[union-attr]


# --- listing ----------------------------------------------------------------------------------------------------


async def make_files(world: World, key: str, count: int, purpose: str = "assistants") -> list[str]:
    ids = []
    for i in range(count):
        response = await upload(world.api, key, form(("purpose", purpose), ("file", f"{i}.txt", str(i).encode())))
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


async def test_pages_follow_the_cursor_both_ways(world: World) -> None:
    await make_files(world, world.alice, 5)
    everything = [f.id for f in (await world.store.list("alice", PageQuery(limit=100, order="asc"))).data]
    async with raw_client(world.api) as http:

        async def page(query: str) -> dict[str, Any]:
            response = await http.get(f"/files?{query}", headers=auth(world.alice))
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            validate("ListFilesResponse", body) if body["data"] else None
            return body

        first = await page("limit=2")
        assert [f["id"] for f in first["data"]] == everything[::-1][:2]
        assert (first["has_more"], first["first_id"], first["last_id"]) == (True, everything[4], everything[3])
        second = await page(f"limit=2&after={first['last_id']}")
        assert [f["id"] for f in second["data"]] == everything[::-1][2:4]
        last = await page(f"limit=2&after={second['last_id']}")
        assert ([f["id"] for f in last["data"]], last["has_more"]) == ([everything[0]], False)
        back = await page(f"limit=2&before={last['first_id']}")
        assert [f["id"] for f in back["data"]] == everything[::-1][2:4]
        ascending = await page("order=asc&limit=3")
        assert ([f["id"] for f in ascending["data"]], ascending["has_more"]) == (everything[:3], True)
        assert (await page("after=file-unknown"))["data"] == []
        assert len((await page(""))["data"]) == 5
        # Files uploaded while a listing is paged (newest first) land before its cursor: later pages are unchanged.
        await make_files(world, world.alice2, 3)
        again = await page(f"limit=2&after={first['last_id']}")
        assert [f["id"] for f in again["data"]] == everything[::-1][2:4]


async def test_the_purpose_filter(world: World) -> None:
    batch = await make_files(world, world.alice, 2, "batch")
    await make_files(world, world.alice, 1, "vision")
    async with raw_client(world.api) as http:
        listed = (await http.get("/files?purpose=batch", headers=auth(world.alice))).json()
        nothing = (await http.get("/files?purpose=fine-tune", headers=auth(world.alice))).json()
    assert sorted(f["id"] for f in listed["data"]) == sorted(batch)
    assert nothing["data"] == []


@pytest.mark.parametrize(
    ("query", "param", "code"),
    [
        ("limit=0", "limit", "invalid_value"),
        ("limit=101", "limit", "invalid_value"),
        ("limit=ten", "limit", "invalid_type"),
        ("order=newest", "order", "invalid_value"),
        ("after=a&before=b", "before", "invalid_value"),
        ("after=" + "a" * 300, "after", "invalid_value"),
    ],
)
async def test_bad_list_queries(query: str, param: str, code: str) -> None:
    world = await memory_world()
    async with raw_client(world.api) as http:
        response = await http.get(f"/files?{query}", headers=auth(world.alice))
    assert response.status_code == 400
    assert (envelope(response)["param"], envelope(response)["code"]) == (param, code)


async def test_limit_defaults_to_20_and_allows_100() -> None:
    world = await memory_world()
    await make_files(world, world.alice, 25)
    async with raw_client(world.api) as http:
        default = (await http.get("/files", headers=auth(world.alice))).json()
        hundred = (await http.get("/files?limit=100&foo=bar", headers=auth(world.alice))).json()
    assert (len(default["data"]), default["has_more"]) == (20, True)
    assert (len(hundred["data"]), hundred["has_more"]) == (25, False)


# --- owner isolation ----------------------------------------------------------------------------------------------


async def test_another_owners_file_is_answered_as_an_unknown_one(world: World) -> None:
    [file_id] = await make_files(world, world.alice, 1)
    unknown = "file-" + "0" * 32
    async with raw_client(world.api) as http:
        for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            theirs = await http.request(method, f"/files/{file_id}{suffix}", headers=auth(world.bob))
            missing = await http.request(method, f"/files/{unknown}{suffix}", headers=auth(world.bob))
            assert theirs.status_code == missing.status_code == 404
            assert envelope(theirs) == {**envelope(missing), "message": f"No such File object: {file_id}"}
            assert envelope(missing) == {
                "message": f"No such File object: {unknown}",
                "type": "invalid_request_error",
                "param": "file_id",
                "code": "file_not_found",
            }
        assert (await http.get("/files", headers=auth(world.bob))).json()["data"] == []
        same_owner = await http.get(f"/files/{file_id}", headers=auth(world.alice2))
        assert same_owner.status_code == 200
    assert [f.id for f in await world.stored("alice")] == [file_id]  # bob's DELETE removed nothing


# --- content and Range ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "status", "content_range", "expected"),
    [
        ("bytes=0-9", 206, "bytes 0-9/1000", slice(0, 10)),
        ("bytes=990-", 206, "bytes 990-999/1000", slice(990, 1000)),
        ("bytes=-5", 206, "bytes 995-999/1000", slice(995, 1000)),
        ("bytes=-5000", 206, "bytes 0-999/1000", slice(0, 1000)),
        ("bytes=500-99999", 206, "bytes 500-999/1000", slice(500, 1000)),
        ("bytes=0-1,5-6", 200, None, slice(0, 1000)),
        ("bytes=9-3", 200, None, slice(0, 1000)),
        ("items=0-5", 200, None, slice(0, 1000)),
        ("bytes=x-5", 200, None, slice(0, 1000)),
    ],
)
async def test_single_ranges(
    world: World, range_header: str, status: int, content_range: str | None, expected: slice
) -> None:
    content = hashlib.sha256(b"seed").digest() * 31 + b"12345678"  # 1000 bytes
    created = await upload(world.api, world.alice, form(("purpose", "assistants"), ("file", "r.bin", content)))
    file_id = created.json()["id"]
    async with raw_client(world.api) as http:
        response = await http.get(f"/files/{file_id}/content", headers={**auth(world.alice), "range": range_header})
    assert response.status_code == status
    assert response.headers.get("content-range") == content_range
    assert response.content == content[expected]
    assert response.headers["content-length"] == str(len(content[expected]))
    assert response.headers["accept-ranges"] == "bytes"


async def test_an_unsatisfiable_range_is_a_416_in_the_envelope(world: World) -> None:
    created = await upload(world.api, world.alice, form(("purpose", "assistants"), ("file", "r.bin", b"x" * 10)))
    empty = await upload(world.api, world.alice, form(("purpose", "assistants"), ("file", "e.bin", b"")))
    async with raw_client(world.api) as http:
        past = await http.get(
            f"/files/{created.json()['id']}/content", headers={**auth(world.alice), "range": "bytes=10-"}
        )
        on_empty = await http.get(
            f"/files/{empty.json()['id']}/content", headers={**auth(world.alice), "range": "bytes=-1"}
        )
        whole_empty = await http.get(f"/files/{empty.json()['id']}/content", headers=auth(world.alice))
    assert (past.status_code, past.headers["content-range"]) == (416, "bytes */10")
    assert envelope(past)["code"] == "range_not_satisfiable"
    assert (on_empty.status_code, on_empty.headers["content-range"]) == (416, "bytes */0")
    assert (whole_empty.status_code, whole_empty.content) == (200, b"")


async def test_if_range_and_head(world: World) -> None:
    created = await upload(world.api, world.alice, form(("purpose", "assistants"), ("file", "r.txt", b"abcdef")))
    url = f"/files/{created.json()['id']}/content"
    async with raw_client(world.api) as http:
        conditional = await http.get(url, headers={**auth(world.alice), "range": "bytes=0-1", "if-range": '"x"'})
        head = await http.head(url, headers={**auth(world.alice), "range": "bytes=2-"})
    assert (conditional.status_code, conditional.content) == (200, b"abcdef")
    assert (head.status_code, head.content, head.headers["content-length"]) == (206, b"", "4")


async def test_a_download_stops_reading_the_store_when_the_client_goes_away() -> None:
    read: list[int] = []

    class Endless(MemoryFileStore):
        async def open(
            self, owner: str, file_id: str, start: int = 0, end: int | None = None
        ) -> AsyncIterator[bytes] | None:
            async def chunks() -> AsyncIterator[bytes]:
                while True:
                    read.append(1)
                    yield b"x" * 65536

            return chunks() if await self.get(owner, file_id) is not None else None

    world = await memory_world(store=Endless())
    created = await upload(world.api, world.alice, form(("purpose", "assistants"), ("file", "a", b"a")))
    sent: list[Message] = []
    disconnect = anyio.Event()

    async def receive() -> Message:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if len(sent) == 10:
            disconnect.set()

    path = f"/v1/files/{created.json()['id']}/content"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "/v1", "query_string": b"",
        "headers": [(b"authorization", f"Bearer {world.alice}".encode())],
        "client": ("127.0.0.1", 1), "server": ("testserver", 80),
    }  # fmt: skip
    with anyio.fail_after(5):
        await world.api(scope, receive, send)
    assert 9 <= len(read) < 20


# --- expiry -----------------------------------------------------------------------------------------------------


async def test_an_expired_file_is_gone(world: World) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"old"

    now = int(time.time())
    for file_id, expires_at in (("file-old", now - 1), ("file-new", now + 3600)):
        await world.store.create(
            StoredFile(file_id, "alice", "a.txt", "batch", created_at=now - 7200, expires_at=expires_at), chunks()
        )
    async with raw_client(world.api) as http:
        listed = (await http.get("/files", headers=auth(world.alice))).json()
        assert [f["id"] for f in listed["data"]] == ["file-new"]
        assert await world.store.get("alice", "file-old") is None  # deleted when the list met it
        await world.store.create(
            StoredFile("file-old2", "alice", "a.txt", "batch", created_at=now - 7200, expires_at=now - 1), chunks()
        )
        for suffix in ("", "/content"):
            gone = await http.get(f"/files/file-old2{suffix}", headers=auth(world.alice))
            assert (gone.status_code, envelope(gone)["code"]) == (404, "file_not_found")
    assert await world.store.get("alice", "file-old2") is None


# --- metering and auth ------------------------------------------------------------------------------------------


async def test_every_route_is_one_request_and_no_tokens() -> None:
    world = await memory_world()
    _, key = await world.api.keys.create(name="metered", owner="carol", plan="pro")  # 100 requests/min
    async with raw_client(world.api) as http:
        created = await http.post(
            "/files", content=form(("purpose", "batch"), ("file", "a", b"abc")), headers=form_headers(key)
        )
        file_id = created.json()["id"]
        answers = [
            created,
            await http.get("/files", headers=auth(key)),
            await http.get(f"/files/{file_id}", headers=auth(key)),
            await http.get(f"/files/{file_id}/content", headers=auth(key)),
            await http.delete(f"/files/{file_id}", headers={**auth(key), "content-type": "application/json"}),
        ]
    assert [a.status_code for a in answers] == [200] * 5
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["99", "98", "97", "96", "95"]
    assert {a.headers["x-ratelimit-remaining-tokens"] for a in answers} == {"100000"}


async def test_a_spent_or_missing_key_is_refused_before_the_body_is_read() -> None:
    world = await memory_world()
    _, key = await world.api.keys.create(name="one", owner="dave", rpm=1)
    async with raw_client(world.api) as http:
        assert (await http.get("/files", headers=auth(key))).status_code == 200
    anonymous = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    for headers, status in ((form_headers(key), 429), (anonymous, 401)):
        body = Pulled(form(("purpose", "batch"), ("file", "a", b"abc")))
        async with raw_client(world.api) as http:
            response = await http.post("/files", content=body, headers=headers)
        assert response.status_code == status
        assert body.pulled == 0


# --- the route table --------------------------------------------------------------------------------------------


async def test_a_wrong_method_gets_405_with_every_allowed_one() -> None:
    world = await memory_world()
    async with raw_client(world.api) as http:
        collection = await http.put("/files", headers=auth(world.alice))
        item = await http.post("/files/file-x", headers=auth(world.alice))
        content = await http.delete("/files/file-x/content", headers=auth(world.alice))
        keys = await http.patch("/api-keys", headers=auth(world.alice))
    assert (collection.status_code, collection.headers["allow"]) == (405, "GET, POST, HEAD")
    assert (item.status_code, item.headers["allow"]) == (405, "GET, DELETE, HEAD")
    assert (content.status_code, content.headers["allow"]) == (405, "GET, HEAD")
    assert (keys.status_code, keys.headers["allow"]) == (405, "GET, POST, HEAD")
    envelope(collection)


def test_a_second_row_for_a_path_and_method_is_refused() -> None:
    async def handler(services: Any, request: Any) -> None:
        return None

    endpoint = _Endpoint(handler, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two routes for GET /files"):
        _RouteTable([(RouteRow("/files", "GET", handler), endpoint), (RouteRow("/files", "GET", handler), endpoint)])
    with pytest.raises(ValueError, match="match the same paths"):
        _RouteTable(
            [(RouteRow("/files/{a}", "GET", handler), endpoint), (RouteRow("/files/{b}", "DELETE", handler), endpoint)]
        )
    table = _RouteTable(
        [(RouteRow("/f/{a}", "GET", handler), endpoint), (RouteRow("/f/{a:path}", "DELETE", handler), endpoint)]
    )  # different convertors match different paths: both kept
    assert len(table.patterns) == 2
    assert len({(row.path, row.method) for row in ROUTES}) == len(ROUTES)
