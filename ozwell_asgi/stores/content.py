"""Content stores: file bytes by key, kept apart from the metadata (:class:`~ozwell_asgi.protocols.ContentStore`).

:class:`LocalContentStore` keeps each file in a local directory; :class:`S3ContentStore` in a bucket of
S3-compatible object storage, through obstore (the ``s3`` extra). Both stream: memory per upload or download is
bounded by their buffer settings, never by the size of a file. Keys are file ids: 1 to 128 characters of
``A-Z a-z 0-9 _ -`` (anything else is a ``ValueError``, so no key can name a path outside the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import anyio.to_thread

from ..errors import PayloadTooLargeError, ServiceUnavailableError
from ..protocols import ContentStore

if TYPE_CHECKING:
    from obstore import GetOptions
    from obstore.store import ClientConfig, RetryConfig, S3Config, S3Store

__all__ = [
    "CONTENT_STORE_URL_FORMS",
    "LocalContentStore",
    "S3ContentStore",
    "check_content_key",
    "content_store_from_url",
]

CONTENT_STORE_URL_FORMS = (
    "file:///absolute/directory",
    "file:relative/directory",
    "s3://bucket",
    "s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1",
)

KiB = 1024
MiB = 1024 * KiB
_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_UNAVAILABLE = "The file store is unavailable. Please retry shortly."
_INCOMING = ".incoming"  # where uploads are written before they are renamed into place (no key starts with ".")


def check_content_key(key: str) -> str:
    """``key`` if it is a valid content key (1 to 128 of ``A-Z a-z 0-9 _ -``), else ``ValueError``."""
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        raise ValueError("a content key is 1 to 128 characters of A-Z, a-z, 0-9, '_' and '-'")
    return key


def _check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < 0):
        raise ValueError("a byte range starts and ends at 0 or later")


def _store_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _full() -> PayloadTooLargeError:
    return PayloadTooLargeError("The file store is full.", code="file_store_full")


# -- a local directory ---------------------------------------------------------------------------------------------


class _TempFile:
    """An upload being written under ``.incoming`` (0600); every method blocks, so it runs in a worker thread."""

    def __init__(self, incoming: Path, key: str) -> None:
        self.path = incoming / f"{key}.{secrets.token_hex(8)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd: int | None = os.open(self.path, flags, 0o600)

    def write(self, chunks: list[bytes]) -> None:
        assert self.fd is not None
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.fd, view) :]

    def commit(self, final: Path) -> None:
        """Make the content durable, then atomically visible at ``final`` (no reader ever sees part of it)."""
        assert self.fd is not None
        os.fsync(self.fd)
        self._close()
        final.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(self.path, final)
        try:
            _fsync_directory(final.parent)
        except OSError:
            final.unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_for_reading(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)


class LocalContentStore:
    """File contents as files under ``directory`` (created 0700 on first upload), one file (0600) per key, in 256
    subdirectories named by a hash of the key.

    ``put`` streams into a temporary file under ``directory/.incoming`` (batched writes of up to ``write_buffer``
    bytes in a worker thread), fsyncs it and renames it into place: all or nothing, and a failure or cancellation
    removes the temporary file. A crashed process's temporary files are swept on this store's first upload once
    nothing has written to them for ``stale_after`` seconds. ``get`` reads ``[start, end)`` in chunks of at most
    ``chunk_size`` bytes. No filesystem call runs on the event loop but closing a file.

    A full disk (``ENOSPC``/``EDQUOT``) is a :class:`~ozwell_asgi.errors.PayloadTooLargeError`
    (``file_store_full``), as for :class:`~ozwell_asgi.stores.memory.MemoryFileStore`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        chunk_size: int = 256 * KiB,
        write_buffer: int = 1 * MiB,
        stale_after: float = 3600.0,
    ) -> None:
        if chunk_size < 1 or write_buffer < 1:
            raise ValueError("chunk_size and write_buffer are at least 1 byte")
        self.directory = Path(directory).absolute()
        self.chunk_size = chunk_size
        self.write_buffer = write_buffer
        self.stale_after = stale_after
        self._incoming = self.directory / _INCOMING
        self._prepared = False

    def path_of(self, key: str) -> Path:
        """Where the content under ``key`` lives (whether or not it exists)."""
        check_content_key(key)
        return self.directory / hashlib.sha256(key.encode()).hexdigest()[:2] / key

    async def put(self, key: str, content: AsyncIterable[bytes]) -> int:
        """Store ``content`` under ``key`` (replacing what was there); the number of bytes stored."""
        final = self.path_of(key)
        try:
            if not self._prepared:
                await anyio.to_thread.run_sync(self._prepare)
            try:
                temp = await anyio.to_thread.run_sync(_TempFile, self._incoming, key)
            except FileNotFoundError:  # the directory was removed under us: make it again
                await anyio.to_thread.run_sync(self._prepare)
                temp = await anyio.to_thread.run_sync(_TempFile, self._incoming, key)
        except OSError as exc:
            if _store_full(exc):
                raise _full() from exc
            raise
        size = 0
        try:
            pending: list[bytes] = []
            buffered = 0
            async for chunk in content:
                if not chunk:
                    continue
                pending.append(chunk)
                buffered += len(chunk)
                size += len(chunk)
                if buffered >= self.write_buffer or len(pending) >= 1024:
                    await anyio.to_thread.run_sync(temp.write, pending)
                    pending, buffered = [], 0
            if pending:
                await anyio.to_thread.run_sync(temp.write, pending)
            await anyio.to_thread.run_sync(temp.commit, final)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(temp.discard)
            if isinstance(exc, OSError) and _store_full(exc):
                raise _full() from exc
            raise
        return size

    def get(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` under ``key``, in chunks of at most ``chunk_size`` (none past the end);
        ``FileNotFoundError`` when iterated if there is no such key. ``ValueError`` at once for a bad key or range.
        """
        path = self.path_of(key)
        _check_range(start, end)
        return self._read(path, start, end)

    async def _read(self, path: Path, start: int, end: int | None) -> AsyncIterator[bytes]:
        fd = await anyio.to_thread.run_sync(_open_for_reading, path)
        try:
            offset = start
            while end is None or offset < end:
                size = self.chunk_size if end is None else min(self.chunk_size, end - offset)
                data = await anyio.to_thread.run_sync(os.pread, fd, size, offset)
                if not data:
                    return
                offset += len(data)
                yield data
        finally:
            os.close(fd)

    async def delete(self, key: str) -> None:
        """Remove the content under ``key``; nothing there is not an error."""
        path = self.path_of(key)
        await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))

    def _prepare(self) -> None:
        """Make the directory (0700) and sweep stale temporary files; once per store, in a worker thread."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._incoming.mkdir(mode=0o700, exist_ok=True)
        stale = time.time() - self.stale_after
        with os.scandir(self._incoming) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < stale:
                        os.unlink(entry.path)
                except FileNotFoundError:  # another process swept it first
                    pass
        self._prepared = True


# -- S3-compatible object storage ----------------------------------------------------------------------------------


class _Abandoned(Exception):
    """Raised into obstore's upload so that it aborts the multipart upload (the caller was cancelled)."""


class _Feed:
    """``content`` as obstore pulls it: the chunks already read, then the rest. :meth:`abandon` makes the next pull
    fail (and cancels a pull under way), so obstore aborts the multipart upload instead of leaving it pending."""

    def __init__(self, head: list[bytes], rest: AsyncIterator[bytes]) -> None:
        self._head = deque(head)
        self._rest = rest
        self._pulling: asyncio.Task[Any] | None = None
        self._abandoned = False
        self.size = 0

    def __aiter__(self) -> _Feed:
        return self

    async def __anext__(self) -> bytes:
        chunk = b""
        while not chunk:
            if self._abandoned:
                raise _Abandoned
            if self._head:
                chunk = self._head.popleft()
                continue
            self._pulling = asyncio.current_task()  # obstore runs each pull as a task of its own
            try:
                chunk = await anext(self._rest)
            finally:
                self._pulling = None
        self.size += len(chunk)
        return chunk

    def abandon(self) -> None:
        self._abandoned = True
        if self._pulling is not None:
            self._pulling.cancel()


class S3ContentStore:
    """File contents as objects ``{prefix}/{key}`` in an S3-compatible bucket, through obstore (asyncio only).

    Credentials, and anything not given here, come from the environment as obstore reads it (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, web identity, instance metadata...).

    ``put`` sends content of up to ``part_size`` bytes as one PUT; larger content as a multipart upload of
    ``part_size`` parts, at most ``max_concurrency`` in flight, so an upload holds about
    ``part_size * (max_concurrency + 1)`` bytes whatever its size. If ``content`` raises, or the caller is
    cancelled, the multipart upload is aborted and nothing remains under the key (a cancelled caller waits at most
    ``cleanup_timeout`` seconds for that; set a lifecycle rule that removes incomplete multipart uploads for what
    a crash or a longer outage leaves). ``get`` is one (ranged) GET,
    streamed in chunks of ``chunk_size`` or a little more (obstore gathers network reads, each at most 408 KiB,
    until it has ``chunk_size``). Storage errors are
    :class:`~ozwell_asgi.errors.ServiceUnavailableError` (503); the original is the ``__cause__``.

    ``client_options`` and ``retry_config`` go to obstore as they are; the timeout of one request defaults to an hour
    (obstore's own 30 s would cut a long download short), the connect timeout to 10 s.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint: str | None = None,
        region: str | None = None,
        part_size: int = 8 * MiB,
        max_concurrency: int = 2,
        chunk_size: int = 256 * KiB,
        client_options: ClientConfig | None = None,
        retry_config: RetryConfig | None = None,
        cleanup_timeout: float = 30.0,
    ) -> None:
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("S3ContentStore needs obstore; install it with: pip install ozwell-asgi[s3]") from exc
        if not 5 * MiB <= part_size <= 5 * 1024 * MiB:
            raise ValueError("part_size is between 5 MiB and 5 GiB (S3's limits for a part)")
        if max_concurrency < 1 or chunk_size < 1:
            raise ValueError("max_concurrency and chunk_size are at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.chunk_size = chunk_size
        self.cleanup_timeout = cleanup_timeout
        # obstore's default timeout (30 s) bounds a whole request, a streamed download included.
        options: ClientConfig = {"connect_timeout": "10s", "timeout": "1h"}
        if endpoint is not None and endpoint.lower().startswith("http://"):
            options["allow_http"] = True
        options.update(client_options or {})
        config: S3Config = {}
        if endpoint is not None:
            config["endpoint"] = endpoint
        if region is not None:
            config["region"] = region
        self._obstore = obstore
        self._errors: type[Exception] = obstore.exceptions.BaseError
        self._store: S3Store = S3Store(
            bucket, prefix=self.prefix or None, config=config, client_options=options, retry_config=retry_config
        )

    async def put(self, key: str, content: AsyncIterable[bytes]) -> int:
        """Store ``content`` under ``key`` (replacing what was there); the number of bytes stored."""
        check_content_key(key)
        rest = aiter(content)
        head: list[bytes] = []
        size = 0
        async for chunk in rest:
            if chunk:
                head.append(chunk)
                size += len(chunk)
                if size > self.part_size:
                    break
        else:  # all of it fits in one part: one PUT
            await self._settle(key, self._obstore.put_async(self._store, key, head, use_multipart=False))
            return size
        feed = _Feed(head, rest)
        del head
        upload = self._obstore.put_async(
            self._store, key, feed, use_multipart=True, chunk_size=self.part_size, max_concurrency=self.max_concurrency
        )
        await self._settle(key, upload, feed)
        return feed.size

    async def _settle(self, key: str, upload: Awaitable[Any], feed: _Feed | None = None) -> None:
        """Await ``upload``. If the caller is cancelled meanwhile, make it leave nothing: abandon the feed (obstore
        then aborts the multipart upload), wait for the upload to end (at most ``cleanup_timeout`` seconds), and
        delete what it stored if it completed all the same."""
        task = asyncio.ensure_future(upload)
        try:
            with _unavailable(self._errors):
                await asyncio.shield(task)
        except asyncio.CancelledError:
            if feed is not None:
                feed.abandon()
            task.add_done_callback(_retrieve)
            with anyio.move_on_after(self.cleanup_timeout, shield=True):
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is None:
                    with contextlib.suppress(ServiceUnavailableError):
                        await self.delete(key)
            raise

    def get(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` under ``key``, streamed (none past the end); ``FileNotFoundError`` when
        iterated if there is no such key. ``ValueError`` at once for a bad key or range."""
        check_content_key(key)
        _check_range(start, end)
        return self._read(key, start, end)

    async def _read(self, key: str, start: int, end: int | None) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            await self._size(key)  # FileNotFoundError if there is nothing under key
            return
        options: GetOptions = {}
        if end is not None:
            options["range"] = (start, end)
        elif start:
            options["range"] = {"offset": start}
        try:
            result = await self._obstore.get_async(self._store, key, options=options)
        except self._errors as exc:
            # S3 answers 416 to a range that starts at or past the end: that is no bytes, not an error.
            if options and start >= await self._size(key):
                return
            raise ServiceUnavailableError(_UNAVAILABLE) from exc
        with _unavailable(self._errors):
            async for chunk in result.stream(min_chunk_size=self.chunk_size):
                yield chunk

    async def delete(self, key: str) -> None:
        """Remove the object under ``key``; nothing there is not an error."""
        check_content_key(key)
        try:
            with _unavailable(self._errors):
                await self._obstore.delete_async(self._store, key)
        except FileNotFoundError:  # S3 itself answers 204; some compatible servers 404
            pass

    async def _size(self, key: str) -> int:
        with _unavailable(self._errors):
            meta = await self._obstore.head_async(self._store, key)
        return meta["size"]


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark the outcome of an upload given up on as seen (asyncio would log it as never retrieved)."""
    if not task.cancelled():
        task.exception()


@contextlib.contextmanager
def _unavailable(errors: type[Exception]) -> Iterator[None]:
    """Turn obstore's errors into a 503 (not ``FileNotFoundError``: obstore raises the builtin, not one of these)."""
    try:
        yield
    except errors as exc:
        raise ServiceUnavailableError(_UNAVAILABLE) from exc


# -- by URL ----------------------------------------------------------------------------------------------------------

_S3_PARAMETERS = frozenset({"endpoint", "region"})
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def content_store_from_url(url: str, **options: Any) -> ContentStore:
    """A content store for ``url``; ``options`` go to its constructor. ``ValueError`` for any other form.

    ``file:///absolute/directory`` (or ``file:relative/directory``) gives a :class:`LocalContentStore`;
    ``s3://bucket/prefix`` an :class:`S3ContentStore`, with optional ``endpoint`` and ``region`` query parameters
    (credentials come from the environment, never from the URL). Nothing connects or touches the disk yet.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment or not parts.path:
            raise ValueError("a file content URL is file:///absolute/directory or file:relative/directory")
        return LocalContentStore(unquote(parts.path), **options)
    if scheme == "s3":
        return _s3_from_url(parts.netloc, parts.path, parts.query, parts.fragment, options)
    shown = f"scheme {scheme!r}" if scheme else "a URL without a scheme"  # never echo the URL
    raise ValueError(f"unsupported file content URL ({shown}); accepted forms: {', '.join(CONTENT_STORE_URL_FORMS)}")


def _s3_from_url(bucket: str, path: str, query: str, fragment: str, options: Mapping[str, Any]) -> S3ContentStore:
    if "@" in bucket:
        raise ValueError("an s3:// URL holds no credentials: they come from the environment (AWS_ACCESS_KEY_ID...)")
    if _BUCKET.fullmatch(bucket) is None:
        raise ValueError("an s3:// URL names its bucket: s3://bucket/prefix")
    if fragment:
        raise ValueError("an s3:// URL has no #fragment")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError("the query of an s3:// URL is endpoint=...&region=...") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in _S3_PARAMETERS:
            raise ValueError(f"unknown s3:// URL parameter {name!r}; accepted: endpoint, region")
        if name in params:
            raise ValueError(f"the s3:// URL parameter {name!r} is given twice")
        if not value:
            raise ValueError(f"the s3:// URL parameter {name!r} is empty")
        params[name] = value
    endpoint = params.get("endpoint")
    if endpoint is not None:
        scheme, _, rest = endpoint.partition("://")
        if scheme.lower() not in ("http", "https") or not rest or "@" in rest:
            raise ValueError("an s3:// URL's endpoint is http(s)://host[:port] (with no credentials)")
    return S3ContentStore(
        bucket, prefix=unquote(path).strip("/"), endpoint=endpoint, region=params.get("region"), **options
    )
