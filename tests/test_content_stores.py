"""Content stores on the real local filesystem and on an S3-compatible server on loopback (moto's server mode).

The shared tests run over both adapters: round trips, ranges, missing keys, refused keys, all or nothing when the
content fails or the caller is cancelled (no temporary file, object or pending multipart upload left), a 64 MiB
object in bounded memory, and many uploads at once. Then what is particular to each, and the URL forms.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import re
import stat
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from ozwell_asgi.errors import PayloadTooLargeError, ServiceUnavailableError
from ozwell_asgi.protocols import ContentStore
from ozwell_asgi.stores.content import (
    LocalContentStore,
    S3ContentStore,
    check_content_key,
    content_store_from_url,
)
from tests.redis_server import free_port
from tests.s3_server import CREDENTIALS, REGION, MotoServer, running_moto_server

pytestmark = pytest.mark.anyio

KiB = 1024
MiB = 1024 * KiB
PART = 5 * MiB  # the smallest part S3 takes: multipart tests stay small


class Boom(Exception):
    pass


@dataclass
class Harness:
    """A store under test and a look behind its back."""

    store: LocalContentStore | S3ContentStore
    big: int  # a size that takes several parts (S3) or write batches (local)
    stored: Callable[[], list[str]]  # the keys that hold content
    leftovers: Callable[[], list[str]]  # temporary files (local) or pending multipart uploads (S3)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with running_moto_server() as server:
        yield server


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the environment, where obstore reads them; nothing else of the machine's AWS settings."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def local_harness(directory: Path, **options: Any) -> Harness:
    store = LocalContentStore(directory, **options)

    def stored() -> list[str]:
        return sorted(p.name for p in directory.glob("[0-9a-f][0-9a-f]/*"))

    def leftovers() -> list[str]:
        incoming = directory / ".incoming"
        return sorted(os.listdir(incoming)) if incoming.exists() else []

    return Harness(store, 3 * MiB + 5, stored, leftovers)


def s3_harness(moto: MotoServer, prefix: str = "t", **options: Any) -> Harness:
    bucket = moto.new_bucket()
    store = S3ContentStore(bucket, prefix=prefix, endpoint=moto.endpoint, region=REGION, part_size=PART, **options)

    def stored() -> list[str]:
        return [key.removeprefix(f"{prefix}/") for key in moto.keys(bucket)]

    def leftovers() -> list[str]:
        return moto.pending_uploads(bucket)

    return Harness(store, 2 * PART + 3 * MiB + 17, stored, leftovers)


@pytest.fixture(params=["local", "s3"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    if request.param == "local":
        return local_harness(tmp_path / "files" / "content")
    request.getfixturevalue("s3_env")
    return s3_harness(request.getfixturevalue("moto"))


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def pieces(data: bytes, sizes: tuple[int, ...] = (1, 7, 4096, 65536, MiB + 3)) -> AsyncIterator[bytes]:
    """``data`` in chunks of uneven sizes (and an empty one now and then)."""
    offset = 0
    for n in itertools.cycle(sizes):
        if offset >= len(data):
            return
        yield data[offset : offset + n]
        if n == 7:
            yield b""
        offset += n


def tree(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*"))


async def read(store: ContentStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.get(key, start, end)])


# -- every adapter ---------------------------------------------------------------------------------------------------


async def test_stores_are_content_stores(harness: Harness) -> None:
    assert isinstance(harness.store, ContentStore)


@pytest.mark.parametrize("size", [0, 1, 4096, 300 * KiB + 1, -1])
async def test_round_trip(harness: Harness, size: int) -> None:
    size = harness.big if size < 0 else size
    data = payload(size, seed=size)
    assert await harness.store.put("file-abc_123", pieces(data)) == size
    assert await read(harness.store, "file-abc_123") == data
    assert harness.stored() == ["file-abc_123"]
    assert harness.leftovers() == []


async def test_ranges(harness: Harness) -> None:
    data = payload(harness.big, seed=1)
    size = len(data)
    await harness.store.put("ranged", pieces(data))
    ranges = [
        (0, None),
        (0, 1),
        (5, 100),
        (300 * KiB + 3, None),
        (PART - 10, PART + 10),  # across a part boundary (S3) / a write batch (local)
        (MiB, 3 * MiB + 1),
        (size - 1, None),
        (100, size + 1000),  # ends past the end
        (size, None),  # starts at the end
        (size + 10, None),
        (size + 10, size + 20),
        (7, 7),
        (9, 3),
    ]
    for start, end in ranges:
        assert await read(harness.store, "ranged", start, end) == data[start:end], (start, end)


async def test_reads_come_in_bounded_chunks(harness: Harness) -> None:
    data = payload(3 * MiB, seed=2)
    await harness.store.put("chunked", pieces(data))
    sizes = [len(chunk) async for chunk in harness.store.get("chunked")]
    assert sum(sizes) == len(data)
    assert len(sizes) > 4
    if isinstance(harness.store, LocalContentStore):
        assert max(sizes) <= harness.store.chunk_size
    else:  # obstore gathers network reads (each at most 408 KiB, hyper's cap) until it has chunk_size
        assert max(sizes) < harness.store.chunk_size + 512 * KiB


async def test_an_empty_object_reads_empty_at_any_range(harness: Harness) -> None:
    await harness.store.put("empty", pieces(b""))
    for start, end in [(0, None), (0, 10), (3, None), (0, 0)]:
        assert await read(harness.store, "empty", start, end) == b""


async def test_missing_keys(harness: Harness) -> None:
    for start, end in [(0, None), (10, None), (0, 5), (4, 4)]:
        with pytest.raises(FileNotFoundError):
            await read(harness.store, "nothing-here", start, end)
    await harness.store.delete("nothing-here")  # idempotent
    await harness.store.put("gone", pieces(b"abc"))
    await harness.store.delete("gone")
    await harness.store.delete("gone")
    with pytest.raises(FileNotFoundError):
        await read(harness.store, "gone")
    assert harness.stored() == []


BAD_KEYS = ["", ".", "..", "../x", "a/b", "/etc/passwd", "..\\x", ".incoming", "a b", "é", "a\x00b", "k" * 129, "x\n"]


async def test_bad_keys_are_refused(harness: Harness, tmp_path: Path) -> None:
    pulled = False

    async def content() -> AsyncIterator[bytes]:
        nonlocal pulled
        pulled = True
        yield b"x"

    before = tree(tmp_path)
    for key in BAD_KEYS:
        with pytest.raises(ValueError, match="content key"):
            await harness.store.put(key, content())
        with pytest.raises(ValueError, match="content key"):
            harness.store.get(key)
        with pytest.raises(ValueError, match="content key"):
            await harness.store.delete(key)
    assert not pulled
    assert tree(tmp_path) == before
    assert harness.stored() == []
    with pytest.raises(ValueError, match="range"):
        harness.store.get("fine", -1)
    longest = check_content_key("K" * 128)
    await harness.store.put(longest, pieces(b"ok"))
    assert await read(harness.store, longest) == b"ok"


@pytest.mark.parametrize("after", [0, 1 * KiB, -1])
async def test_failing_content_leaves_nothing(harness: Harness, after: int) -> None:
    after = harness.big if after < 0 else after
    error = Boom("the client went away")

    async def content() -> AsyncIterator[bytes]:
        async for chunk in pieces(payload(after)):
            yield chunk
        raise error

    await harness.store.put("kept", pieces(b"an earlier file"))
    with pytest.raises(Boom) as raised:
        await harness.store.put("failed", content())
    assert raised.value is error
    with pytest.raises(FileNotFoundError):
        await read(harness.store, "failed")
    assert harness.stored() == ["kept"]
    assert harness.leftovers() == []


@pytest.mark.parametrize("after", [1 * KiB, -1])
async def test_a_cancelled_upload_leaves_nothing(harness: Harness, after: int) -> None:
    after = harness.big if after < 0 else after
    blocked = anyio.Event()
    seen: list[str] = []

    async def content() -> AsyncIterator[bytes]:
        async for chunk in pieces(payload(after)):
            yield chunk
        blocked.set()
        await anyio.sleep_forever()  # a client that stops sending
        yield b"never"

    async with anyio.create_task_group() as tg:
        tg.start_soon(harness.store.put, "cancelled", content())
        await blocked.wait()
        await anyio.wait_all_tasks_blocked()
        seen = harness.leftovers()
        tg.cancel_scope.cancel()
    if isinstance(harness.store, LocalContentStore) or after > PART:
        assert seen, "the upload should have been under way when it was cancelled"
    with pytest.raises(FileNotFoundError):
        await read(harness.store, "cancelled")
    assert harness.stored() == []
    assert harness.leftovers() == []


async def test_many_uploads_at_once(harness: Harness) -> None:
    sizes = [random.Random(n).randrange(0, 300 * KiB) for n in range(40)] + [PART + n * MiB for n in range(1, 4)]
    files = {f"file-{n:03d}": payload(size, seed=n) for n, size in enumerate(sizes)}
    results: dict[str, int] = {}

    async def put(key: str, data: bytes) -> None:
        results[key] = await harness.store.put(key, pieces(data))

    async with anyio.create_task_group() as tg:
        for key, data in files.items():
            tg.start_soon(put, key, data)
    assert results == {key: len(data) for key, data in files.items()}

    contents: dict[str, bytes] = {}

    async def get(key: str) -> None:
        contents[key] = await read(harness.store, key)

    async with anyio.create_task_group() as tg:
        for key in files:
            tg.start_soon(get, key)
    assert contents == files
    assert harness.stored() == sorted(files)
    assert harness.leftovers() == []


# -- a 64 MiB object in bounded memory ----------------------------------------------------------------------------


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set, to the current one
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * KiB  # type: ignore[union-attr]


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * KiB  # type: ignore[union-attr]


async def test_a_64_mib_object_streams_in_bounded_memory(harness: Harness) -> None:
    size, chunk = 64 * MiB, 1 * MiB
    sent = hashlib.sha256()

    async def content() -> AsyncIterator[bytes]:
        for n in range(size // chunk):
            block = n.to_bytes(8, "big") * (chunk // 8)  # a new allocation for every chunk
            sent.update(block)
            yield block

    measure_rss = _peak_rss_reset()
    rss_before = _rss()
    tracemalloc.start()
    try:
        assert await harness.store.put("big", content()) == size
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        received = hashlib.sha256()
        async for block in harness.store.get("big"):
            received.update(block)
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = _peak_rss() - rss_before if measure_rss else 0
    assert received.digest() == sent.digest()
    print(f"put peak {put_peak / MiB:.1f} MiB, get peak {get_peak / MiB:.1f} MiB, RSS +{rss_growth / MiB:.1f} MiB")
    # Python's side: a write batch and a chunk (local); the parts obstore holds, which stay Python bytes, and the
    # first part read before choosing between one PUT and a multipart upload (S3). Never the object.
    if isinstance(harness.store, S3ContentStore):
        limit = PART * (harness.store.max_concurrency + 2) + 2 * MiB
    else:
        limit = 4 * MiB
    assert put_peak < limit, f"upload peak {put_peak / MiB:.1f} MiB"
    assert get_peak < 2 * MiB, f"download peak {get_peak / MiB:.1f} MiB"
    # The whole process, obstore's buffers included (tracemalloc cannot see them).
    assert rss_growth < 32 * MiB, f"peak RSS grew {rss_growth / MiB:.1f} MiB"
    assert harness.leftovers() == []


# -- the local directory -----------------------------------------------------------------------------------------


async def test_local_modes_and_layout(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    store = LocalContentStore(directory)
    assert not directory.exists()  # nothing touches the disk before the first upload
    await store.put("file-1", pieces(b"hello"))
    path = store.path_of("file-1")
    assert path.parent.parent == directory and path.read_bytes() == b"hello"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / ".incoming").stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_local_put_replaces_and_readers_see_whole_files(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path)
    await store.put("same", pieces(b"first version"))
    reader = store.get("same")
    assert await anext(reader) == b"first version"
    await store.put("same", pieces(b"second"))
    assert await read(store, "same") == b"second"
    await reader.aclose()


async def test_local_stale_temporary_files_are_swept(tmp_path: Path) -> None:
    incoming = tmp_path / ".incoming"
    incoming.mkdir()
    stale, fresh = incoming / "dead.0123.part", incoming / "alive.4567.part"
    stale.write_bytes(b"left by a crashed process")
    fresh.write_bytes(b"an upload under way elsewhere")
    hour_ago = time.time() - 3601
    os.utime(stale, (hour_ago, hour_ago))
    await LocalContentStore(tmp_path).put("file-1", pieces(b"x"))
    assert sorted(os.listdir(incoming)) == [fresh.name]


async def test_local_directory_removed_under_the_store(tmp_path: Path) -> None:
    import shutil

    store = LocalContentStore(tmp_path / "files")
    await store.put("one", pieces(b"1"))
    shutil.rmtree(tmp_path / "files")
    await store.put("two", pieces(b"2"))
    assert await read(store, "two") == b"2"


async def test_local_full_disk_is_a_413_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ozwell_asgi.stores import content

    def full(self: object, chunks: list[bytes]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    h = local_harness(tmp_path)
    monkeypatch.setattr(content._TempFile, "write", full)
    with pytest.raises(PayloadTooLargeError) as raised:
        await h.store.put("file-1", pieces(payload(MiB)))
    assert (raised.value.status, raised.value.code) == (413, "file_store_full")
    assert h.stored() == h.leftovers() == []


async def test_local_reads_do_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path / "files")
    await store.put("victim", pieces(b"mine"))
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    path = store.path_of("victim")
    path.unlink()
    path.symlink_to(secret)
    with pytest.raises(OSError, match=re.escape(os.strerror(errno.ELOOP))):
        await read(store, "victim")


# -- S3-compatible object storage -------------------------------------------------------------------------------


@pytest.mark.usefixtures("s3_env")
async def test_s3_one_put_below_a_part_and_multipart_above(moto: MotoServer) -> None:
    h = s3_harness(moto, prefix="deep/prefix")
    store = h.store
    assert isinstance(store, S3ContentStore)
    await store.put("small", pieces(payload(PART)))
    await store.put("large", pieces(payload(2 * PART + 1)))
    assert h.stored() == ["large", "small"]
    small = moto.client.head_object(Bucket=store.bucket, Key="deep/prefix/small")
    large = moto.client.head_object(Bucket=store.bucket, Key="deep/prefix/large")
    assert "-" not in small["ETag"]  # a plain PUT
    assert large["ETag"].strip('"').endswith("-3")  # three parts
    assert large["ContentLength"] == 2 * PART + 1


@pytest.mark.usefixtures("s3_env")
async def test_s3_from_url_with_credentials_from_the_environment(moto: MotoServer) -> None:
    bucket = moto.new_bucket()
    store = content_store_from_url(f"s3://{bucket}/some/prefix/?endpoint={moto.endpoint}&region={REGION}")
    assert isinstance(store, S3ContentStore)
    assert (store.bucket, store.prefix) == (bucket, "some/prefix")
    await store.put("file-1", pieces(b"through the URL"))
    assert moto.keys(bucket) == ["some/prefix/file-1"]
    assert await read(store, "file-1", 8) == b"the URL"


@pytest.mark.usefixtures("s3_env")
async def test_s3_unreachable_is_a_503() -> None:
    store = S3ContentStore(
        "nowhere",
        endpoint=f"http://127.0.0.1:{free_port()}",
        region=REGION,
        retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=2)},
    )
    with pytest.raises(ServiceUnavailableError) as raised:
        await store.put("file-1", pieces(b"x"))
    assert raised.value.status == 503 and "127.0.0.1" not in raised.value.message
    with pytest.raises(ServiceUnavailableError):
        await read(store, "file-1")
    with pytest.raises(ServiceUnavailableError):
        await store.delete("file-1")


def test_s3_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3ContentStore("bucket", part_size=MiB)
    with pytest.raises(ValueError, match="max_concurrency"):
        S3ContentStore("bucket", max_concurrency=0)


# -- URLs ------------------------------------------------------------------------------------------------------------


def test_file_urls(tmp_path: Path) -> None:
    for url, directory in [
        (f"file://{tmp_path}/files", tmp_path / "files"),
        (f"file://localhost{tmp_path}/with%20space", tmp_path / "with space"),
        ("file:relative/files", Path.cwd() / "relative" / "files"),
    ]:
        store = content_store_from_url(url)
        assert isinstance(store, LocalContentStore)
        assert store.directory == directory
    assert not (tmp_path / "files").exists()


def test_s3_urls() -> None:
    store = content_store_from_url("s3://my-bucket")
    assert isinstance(store, S3ContentStore) and (store.bucket, store.prefix) == ("my-bucket", "")
    store = content_store_from_url("s3://my-bucket/a/b?region=eu-west-3&endpoint=https://s3.example.test:9000")
    assert isinstance(store, S3ContentStore) and store.prefix == "a/b"
    store = content_store_from_url("s3://my-bucket/p", part_size=16 * MiB)
    assert isinstance(store, S3ContentStore) and store.part_size == 16 * MiB


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://otherhost/x", "file:///absolute"),
        ("file:///x?mode=1", "file:///absolute"),
        ("file://", "file:///absolute"),
        ("s3://", "names its bucket"),
        ("s3://AKIA:hunter2@bucket/x", "no credentials"),
        ("s3://bucket/x?endpoint=ftp://h", "endpoint is http"),
        ("s3://bucket/x?endpoint=http://user:hunter2@h", "endpoint is http"),
        ("s3://bucket/x?endpoint=", "empty"),
        ("s3://bucket/x?region=a&region=b", "twice"),
        ("s3://bucket/x?secret_access_key=hunter2", "unknown"),
        ("s3://bucket/x#frag", "fragment"),
        ("gs://bucket/x", "unsupported"),
        ("/var/lib/ozwell/files", "without a scheme"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        content_store_from_url(url)
    assert "hunter2" not in str(raised.value)
