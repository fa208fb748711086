"""/files: upload (multipart, streamed to the store), list, retrieve, delete and download. Every route
authenticates (scope ``api``), is charged one request and no tokens before anything else is read, and sees only
the caller's owner's files: another owner's id is answered exactly as an unknown one (404).

An upload is all or nothing. Its fields may come before or after the file part (the Python SDK sends ``purpose``
first, the Node SDK and ``curl`` examples send fields after the file), so the file's bytes go to
:meth:`FileStore.create` as they arrive while the rest of the body is still to come: the content iterator given to
the store reads the body to its end and checks the whole form before it ends, completing the file's metadata then,
which the store keeps as it stands at that point (the protocol's guarantee; a store that does not is caught: the
upload is removed, 500). A bad or missing field after the file, a file over the size cap, bad multipart or a client
gone mid-body makes that iterator raise, and the store keeps nothing.

A file past its ``expires_at`` is gone: it is deleted when a request meets it, and answered as unknown.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import NoReturn

import anyio
import anyio.lowlevel
from starlette.requests import Request

from ..bodies import header
from ..context import Services
from ..errors import InternalServerError, InvalidRequestError, NotFoundError, OzwellError
from ..multipart import MultipartReader
from ..pages import list_body
from ..protocols import FileStore
from ..responses import JSONResponse
from ..types import SCOPE_API, Principal, Receive, Scope, Send, StoredFile
from ..wire._errors import CODE_MISSING
from ..wire.files import (
    content_disposition,
    deleted_file,
    file_object,
    media_type,
    parse_create_form,
    parse_list_query,
    sanitize_filename,
)

__all__ = ["create_file", "delete_file", "download_file", "list_files", "retrieve_file"]

log = logging.getLogger("ozwell_asgi")

MAX_FILE_ID_LENGTH = 256  # longer ids are unknown without asking the store
MAX_EXPIRED_SWEEPS = 4  # pages re-read per list request after deleting expired files found on them

Header = tuple[bytes, bytes]
Headers = list[Header]


async def _caller(services: Services, request: Request) -> tuple[Principal, FileStore, Headers]:
    principal = await services.authenticate(request, SCOPE_API)
    headers = await services.charge_request(principal)
    store = services.files
    if store is None:  # pragma: no cover - the routes exist only with a file store
        raise InternalServerError("No file store is configured.")
    return principal, store, headers


def _new_file_id() -> str:
    """Unique, not secret, and in creation order: microseconds since the epoch, then 72 random bits. Files of the
    same second (``created_at``) then list in the order they were made."""
    return f"file-{time.time_ns() // 1000:014x}{random.getrandbits(72):018x}"


def _not_found(file_id: str) -> NotFoundError:
    shown = file_id if len(file_id) <= 100 else file_id[:100] + "..."
    return NotFoundError(f"No such File object: {shown}", param="file_id", code="file_not_found")


def _expired(file: StoredFile, now: float) -> bool:
    return file.expires_at is not None and file.expires_at <= now


async def _visible_file(store: FileStore, principal: Principal, file_id: str) -> StoredFile:
    """The caller's owner's file ``file_id``; 404 if unknown, another owner's or expired (then it is deleted)."""
    file = None if len(file_id) > MAX_FILE_ID_LENGTH else await store.get(principal.owner, file_id)
    if file is None:
        raise _not_found(file_id)
    if _expired(file, time.time()):
        await store.delete(principal.owner, file_id)
        raise _not_found(file_id)
    return file


def _complete(file: StoredFile, purpose: str, expires_at: int | None) -> None:
    # The file's fields that may follow its bytes in the body are filled in once the body has ended, as the last step
    # of its content (FileStore.create keeps ``file`` as it stands once its content is exhausted). The object was made
    # for this one call and nothing else holds it.
    object.__setattr__(file, "purpose", purpose)
    object.__setattr__(file, "expires_at", expires_at)


async def create_file(services: Services, request: Request) -> JSONResponse:
    """POST /files: multipart ``file`` and ``purpose`` (and ``expires_after[anchor]``/``[seconds]``), in any
    order; the file object. 400 with ``param`` for a bad field or bad multipart, 408, 413 (``Settings.max_file_size``,
    or a full store), 415 for a body that is not ``multipart/form-data``."""
    principal, store, headers = await _caller(services, request)
    settings = services.settings
    reader = MultipartReader(
        request, file_field="file", max_file_size=settings.max_file_size, idle_timeout=settings.body_idle_timeout
    )
    part = await reader.next_file()
    early = parse_create_form(reader.fields, final=part is None)  # a bad field before the file: 400 before its bytes
    if part is None:
        raise InvalidRequestError("Missing required parameter: 'file'.", param="file", code=CODE_MISSING)
    created_at = int(time.time())
    given = (early.purpose or "", early.expires_at(created_at))  # what is known when the store is called
    pending = StoredFile(
        id=_new_file_id(),
        owner=principal.owner,
        filename=sanitize_filename(part.filename),
        purpose=given[0],
        created_at=created_at,
        expires_at=given[1],
        content_type=media_type(part.content_type),
    )
    finished = False

    async def content() -> AsyncIterator[bytes]:
        nonlocal finished
        async with aclosing(reader.file_content()) as chunks:
            async for chunk in chunks:
                yield chunk
        form = parse_create_form(reader.fields, final=True)  # raising here leaves nothing in the store
        _complete(pending, str(form.purpose), form.expires_at(created_at))
        finished = True

    stored = await store.create(pending, content())
    if not finished:  # a store that returned before reading the whole content: keep no partial file
        await _discard(store, stored, "the file store returned before reading the whole upload")
    if (pending.purpose, pending.expires_at) != given:  # fields came after the file: check they were stored
        kept = await store.get(principal.owner, stored.id)
        if kept is None or (kept.purpose, kept.expires_at) != (pending.purpose, pending.expires_at):
            await _discard(store, stored, "the file store kept the upload's fields as they were before its content")
    return JSONResponse(file_object(stored), headers=headers)


async def _discard(store: FileStore, file: StoredFile, why: str) -> NoReturn:
    """Remove an upload a store did not keep as the FileStore protocol asks, and fail loudly (500)."""
    await store.delete(file.owner, file.id)
    log.error("upload %s discarded: %s (see FileStore.create)", file.id, why)
    raise InternalServerError("The file store failed to keep the upload.")


async def list_files(services: Services, request: Request) -> JSONResponse:
    """GET /files[?purpose=&limit=&after=&before=&order=]: a page of the caller's owner's files (newest first by
    default; ``limit`` 1-100, 20 by default); ``has_more``, ``first_id``, ``last_id``."""
    principal, store, headers = await _caller(services, request)
    query, purpose = parse_list_query(request.query_params)
    for _ in range(MAX_EXPIRED_SWEEPS):
        page = await store.list(principal.owner, query, purpose)
        now = time.time()
        expired = [f for f in page.data if _expired(f, now)]
        if not expired:
            break
        for file in expired:
            await store.delete(principal.owner, file.id)
    else:  # still meeting expired files: answer without them
        page = await store.list(principal.owner, query, purpose)
    now = time.time()
    data = [file_object(f) for f in page.data if not _expired(f, now)]
    return JSONResponse(list_body(data, page.has_more), headers=headers)


async def retrieve_file(services: Services, request: Request) -> JSONResponse:
    """GET /files/{file_id}: the file object; 404 ``file_not_found``."""
    principal, store, headers = await _caller(services, request)
    file = await _visible_file(store, principal, request.path_params["file_id"])
    return JSONResponse(file_object(file), headers=headers)


async def delete_file(services: Services, request: Request) -> JSONResponse:
    """DELETE /files/{file_id}: the file and its content are removed; ``{"id", "object": "file", "deleted": true}``.
    404 ``file_not_found``. Any request body (and its ``Content-Type``) is ignored."""
    principal, store, headers = await _caller(services, request)
    file = await _visible_file(store, principal, request.path_params["file_id"])
    if not await store.delete(principal.owner, file.id):  # deleted meanwhile
        raise _not_found(file.id)
    return JSONResponse(deleted_file(file.id), headers=headers)


async def download_file(services: Services, request: Request) -> ContentResponse:
    """GET /files/{file_id}/content: the bytes, streamed, with the stored ``Content-Type``, ``Content-Disposition:
    attachment`` and ``Content-Length``. A single ``Range`` (``bytes=a-b``, ``a-``, ``-n``) is answered 206 with
    ``Content-Range``; an unsatisfiable one 416; several ranges, a malformed one or an ``If-Range`` get the whole
    file (RFC 9110 lets a server ignore them). HEAD sends the headers only."""
    principal, store, headers = await _caller(services, request)
    file = await _visible_file(store, principal, request.path_params["file_id"])
    size = file.bytes
    wanted = None if header(request, b"if-range") is not None else header(request, b"range")
    span = _byte_range(wanted, size) if wanted is not None else None
    start, end = span if span is not None else (0, size)
    headers = [
        (b"content-type", media_type(file.content_type).encode()),  # whatever a host's store returns
        (b"content-length", str(end - start).encode()),
        (b"content-disposition", content_disposition(file.filename)),
        (b"accept-ranges", b"bytes"),
        (b"x-content-type-options", b"nosniff"),
        *headers,
    ]
    if span is not None:
        headers.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
    chunks = None
    if request.method != "HEAD":
        chunks = await store.open(principal.owner, file.id, start, end)
        if chunks is None:  # deleted meanwhile
            raise _not_found(file.id)
    return ContentResponse(chunks, 206 if span is not None else 200, headers)


def _byte_range(value: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of one ``bytes=`` range within ``size`` bytes; ``None`` to send the whole file (no single
    well-formed range); 416 if it is well-formed but starts past the end."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or len(first) > 19 or len(last) > 19 or not (first.isdigit() or (not first and last.isdigit())):
        return None
    if not first:  # the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(size - suffix, 0), size
    if last and not last.isdigit():
        return None
    start = int(first)
    if last and int(last) < start:
        return None  # last before first: not a valid range, so ignored
    if start >= size:
        raise _unsatisfiable(size)
    return start, (min(int(last) + 1, size) if last else size)


def _unsatisfiable(size: int) -> OzwellError:
    return OzwellError(
        f"The requested range is not satisfiable: the file has {size} bytes.",
        status=416,
        type="invalid_request_error",
        code="range_not_satisfiable",
        headers=[("Content-Range", f"bytes */{size}")],
    )


class ContentResponse:
    """Streams a file's content. If the client goes away the store's iterator is closed at once (``aclose``), so a
    large download stops reading the store; the stream yields to the event loop between chunks."""

    __slots__ = ("chunks", "headers", "status")

    def __init__(self, chunks: AsyncIterator[bytes] | None, status: int, headers: Sequence[Header]) -> None:
        self.chunks = chunks
        self.status = status
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": list(self.headers)})
        chunks = self.chunks
        if chunks is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        async with _closing(chunks), anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await anyio.lowlevel.checkpoint()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away (ASGI 2.4 servers raise on send)
                pass
            finally:
                tg.cancel_scope.cancel()


class _closing:
    """Closes an async iterator that has ``aclose`` (an async generator), shielded from cancellation."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_: object) -> None:
        close = getattr(self.chunks, "aclose", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await close()
