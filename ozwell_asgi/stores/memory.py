"""Process-local stores: everything lives in this process's memory and is gone when it exits.

For tests, demos and single-process hosts. Every method runs without an ``await`` in between its reads and
writes, so each is atomic with respect to the other tasks of the event loop.
"""

from __future__ import annotations

import dataclasses
import logging
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING

import anyio

from ..errors import PayloadTooLargeError
from ..pages import paginate
from ..protocols import ContentStore
from ..types import APIKey, Page, PageQuery, StoredFile, StoredResponse
from .response_codec import dump_parts, load_parts

if TYPE_CHECKING:
    from .passages import MemoryPassageIndex

__all__ = ["MemoryContentStore", "MemoryFileStore", "MemoryKeyStore", "MemoryResponseStore", "MemoryStorage"]

log = logging.getLogger("ozwell_asgi.stores.memory")


class MemoryKeyStore:
    """A :class:`~ozwell_asgi.protocols.KeyStore` in two dicts (by id, by hash); nothing persists.

    Every method is atomic (no suspension point inside), ``id`` and ``key_hash`` are unique, ``list`` is ordered
    by ``created_at`` then ``id``.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, APIKey] = {}
        self._id_by_hash: dict[str, str] = {}

    async def create(self, key: APIKey) -> None:
        """Store ``key``; ``ValueError`` if its id or hash is taken (and nothing is stored)."""
        if key.id in self._by_id:
            raise ValueError(f"an API key with id {key.id!r} already exists")
        if key.key_hash in self._id_by_hash:
            raise ValueError("an API key with this hash already exists")
        self._by_id[key.id] = key
        self._id_by_hash[key.key_hash] = key.id

    async def get_by_hash(self, key_hash: str) -> APIKey | None:
        """The key whose current hash is ``key_hash``, or ``None``."""
        key_id = self._id_by_hash.get(key_hash)
        return None if key_id is None else self._by_id.get(key_id)

    async def get(self, key_id: str) -> APIKey | None:
        """The key with id ``key_id``, or ``None``."""
        return self._by_id.get(key_id)

    async def list(self, owner: str | None = None) -> list[APIKey]:
        """Every key (of ``owner``, if given), revoked and expired ones included, by ``created_at`` then ``id``."""
        keys = self._by_id.values() if owner is None else (k for k in self._by_id.values() if k.owner == owner)
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def list_page(self, query: PageQuery, owner: str | None = None) -> Page[APIKey]:
        """One page of :meth:`list` (:func:`~ozwell_asgi.pages.paginate`; it sorts every key of the scope)."""
        return paginate(await self.list(owner), query, lambda k: k.id)

    async def revoke(self, key_id: str, at: int) -> APIKey | None:
        """Mark the key revoked at ``at`` unless it already is (the first time is kept); ``None`` if unknown."""
        key = self._by_id.get(key_id)
        if key is None or key.revoked_at is not None:
            return key
        key = dataclasses.replace(key, revoked_at=at)
        self._by_id[key_id] = key
        return key

    async def rotate(self, key_id: str, key_hash: str, hint: str) -> APIKey | None:
        """Replace the hash and hint of an active key (the old hash stops resolving at once).

        ``None`` if the key is unknown or revoked; ``ValueError`` if ``key_hash`` belongs to another key.
        """
        key = self._by_id.get(key_id)
        if key is None or key.revoked_at is not None:
            return None
        holder = self._id_by_hash.get(key_hash)
        if holder is not None and holder != key_id:
            raise ValueError("an API key with this hash already exists")
        del self._id_by_hash[key.key_hash]
        key = dataclasses.replace(key, key_hash=key_hash, hint=hint)
        self._by_id[key_id] = key
        self._id_by_hash[key_hash] = key_id
        return key

    async def ping(self) -> None:
        """Always answers: the data is in this process (for ``/health``)."""


class MemoryFileStore:
    """A :class:`~ozwell_asgi.protocols.FileStore` in this process's memory: metadata in a dict, content as the
    list of chunks it arrived in (never joined into one bytes object), or in ``content`` when one is given.

    ``create`` stores nothing until the whole content has arrived, so a failed upload leaves nothing; other
    methods are atomic (no suspension point). ``max_total_bytes`` (default 1 GiB) bounds what the store holds: an
    upload that would pass it fails with :class:`~ozwell_asgi.errors.PayloadTooLargeError` and stores nothing.
    With a ``content`` store, bytes go there under the file id before the metadata appears, and a failed upload
    removes them; ``max_total_bytes`` then bounds nothing (the content store has its own bounds).
    """

    def __init__(self, *, max_total_bytes: int = 1 << 30, content: ContentStore | None = None) -> None:
        self.max_total_bytes = max_total_bytes
        self.content = content
        self._files: dict[str, StoredFile] = {}
        self._content: dict[str, tuple[bytes, ...]] = {}
        self._claimed: set[str] = set()  # ids whose content is being written to ``content``
        self._total = 0

    async def create(self, file: StoredFile, content: AsyncIterable[bytes]) -> StoredFile:
        if file.id in self._files or file.id in self._claimed:
            raise ValueError(f"a file with id {file.id!r} already exists")
        if self.content is not None:
            return await self._create_elsewhere(self.content, file, content)
        chunks: list[bytes] = []
        size = 0
        async for chunk in content:
            if chunk:
                size += len(chunk)
                if self._total + size > self.max_total_bytes:
                    raise PayloadTooLargeError("The file store is full.", code="file_store_full")
                chunks.append(bytes(chunk))
        if file.id in self._files or file.id in self._claimed:  # created concurrently while this content arrived
            raise ValueError(f"a file with id {file.id!r} already exists")
        stored = dataclasses.replace(file, bytes=size)
        self._files[file.id] = stored
        self._content[file.id] = tuple(chunks)
        self._total += size
        return stored

    async def _create_elsewhere(
        self, store: ContentStore, file: StoredFile, content: AsyncIterable[bytes]
    ) -> StoredFile:
        self._claimed.add(file.id)
        try:
            try:
                size = await store.put(file.id, content)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await store.delete(file.id)
                raise
            stored = dataclasses.replace(file, bytes=size)
            self._files[file.id] = stored
            return stored
        finally:
            self._claimed.discard(file.id)

    async def get(self, owner: str, file_id: str) -> StoredFile | None:
        file = self._files.get(file_id)
        return file if file is not None and file.owner == owner else None

    async def list(self, owner: str, query: PageQuery, purpose: str | None = None) -> Page[StoredFile]:
        mine = sorted(
            (f for f in self._files.values() if f.owner == owner and (purpose is None or f.purpose == purpose)),
            key=lambda f: (f.created_at, f.id),
        )
        return paginate(mine, query, lambda f: f.id)

    async def open(
        self, owner: str, file_id: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes] | None:
        file = await self.get(owner, file_id)
        if file is None:
            return None
        if self.content is not None:
            start, end = max(start, 0), file.bytes if end is None else max(0, min(end, file.bytes))
            return self.content.get(file_id, start, max(start, end))
        return _slice(self._content[file_id], start, end)

    async def delete(self, owner: str, file_id: str) -> bool:
        if await self.get(owner, file_id) is None:
            return False
        removed = self._files.pop(file_id)
        if self.content is None:
            self._total -= removed.bytes
            del self._content[file_id]
        else:
            await self.content.delete(file_id)
        return True

    async def ping(self) -> None:
        """Answers unless the content store, if it has ``ping``, does not (for ``/health``)."""
        ping = getattr(self.content, "ping", None)
        if ping is not None:
            await ping()


class MemoryContentStore:
    """A :class:`~ozwell_asgi.protocols.ContentStore` in this process's memory: each key's content as the chunks it
    arrived in. ``put`` stores nothing until the whole content has arrived; ``max_total_bytes`` (default 1 GiB)
    bounds what it holds (:class:`~ozwell_asgi.errors.PayloadTooLargeError` past it, and nothing stored)."""

    def __init__(self, *, max_total_bytes: int = 1 << 30) -> None:
        self.max_total_bytes = max_total_bytes
        self._content: dict[str, tuple[bytes, ...]] = {}
        self._total = 0

    def __contains__(self, key: object) -> bool:
        return key in self._content

    def __len__(self) -> int:
        return len(self._content)

    async def put(self, key: str, content: AsyncIterable[bytes]) -> int:
        chunks: list[bytes] = []
        size = 0
        async for chunk in content:
            if chunk:
                size += len(chunk)
                if self._total + size > self.max_total_bytes:
                    raise PayloadTooLargeError("The file store is full.", code="file_store_full")
                chunks.append(bytes(chunk))
        self._total += size - sum(len(c) for c in self._content.get(key, ()))
        self._content[key] = tuple(chunks)
        return size

    def get(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        chunks = self._content.get(key)
        if chunks is None:
            return _missing(key)
        return _slice(chunks, start, end)

    async def delete(self, key: str) -> None:
        chunks = self._content.pop(key, None)
        if chunks is not None:
            self._total -= sum(len(c) for c in chunks)


@dataclasses.dataclass(slots=True)
class _ResponseEntry:
    head: StoredResponse  # the record's scalar fields (its parts left empty)
    parts: bytes  # the JSON of its response, input items and conversation (response_codec), UTF-8
    size: int  # what the entry counts towards max_bytes


_EMPTY: dict[str, object] = {}


class MemoryResponseStore:
    """A :class:`~ozwell_asgi.protocols.ResponseStore` in this process's memory, bounded by two caps so a
    long-running process cannot grow without limit: ``max_records`` records (default 10,000) and ``max_bytes``
    (default 256 MiB) in all, a record counting as the UTF-8 size of its JSON parts plus its ids. Past either cap
    the least recently used records are forgotten (``put``, ``get`` and ``last_in_conversation`` count as use);
    a single record larger than ``max_bytes`` is not kept at all (and an earlier version of it is forgotten), as
    if evicted at once. A forgotten record is simply unknown.

    Records are kept as their JSON text (:mod:`~ozwell_asgi.stores.response_codec`, as SQL and Redis keep them):
    what ``get`` returns is a fresh copy that nothing else shares, and a record that is not JSON-ready is refused
    with ``ValueError`` here as everywhere. Ids are unique across owners: a ``put`` of an id another owner holds
    is a ``ValueError`` and changes nothing.

    Every method is atomic (no suspension point inside) and costs a dict lookup, a binary search in its
    conversation's records and the encoding of its own record: the newest record of each conversation is the last
    of a list kept sorted by ``(created_at, id)``, so no method scans the store.
    """

    def __init__(self, *, max_records: int = 10_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._records: OrderedDict[str, _ResponseEntry] = OrderedDict()  # by id, least recently used first
        self._conversations: dict[tuple[str, str], list[tuple[int, str]]] = {}  # sorted (created_at, id)
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def total_bytes(self) -> int:
        """What the records held count towards ``max_bytes``."""
        return self._bytes

    async def put(self, record: StoredResponse) -> None:
        """Store ``record``, replacing the record of the same id and owner; ``ValueError`` (nothing changed) if
        another owner holds the id or the record is not JSON-ready. Then forget the least recently used records
        while a cap is exceeded."""
        current = self._records.get(record.id)
        if current is not None and current.head.owner != record.owner:
            raise ValueError(f"a response with id {record.id!r} belongs to another owner")
        parts = dump_parts(record).encode()
        head = dataclasses.replace(record, response=_EMPTY, input_items=(), conversation=())
        size = len(parts) + sum(
            len(text) for text in (record.id, record.owner, record.status, record.key_id, record.conversation_id or "")
        )
        if current is not None:
            self._remove(current)
        if size > self.max_bytes:
            log.warning("a stored response of %d bytes exceeds the memory store's max_bytes; not kept", size)
            return
        self._records[record.id] = _ResponseEntry(head, parts, size)
        self._bytes += size
        if record.conversation_id is not None:
            insort(self._conversations.setdefault((record.owner, record.conversation_id), []), _position(head))
        while len(self._records) > self.max_records or self._bytes > self.max_bytes:
            self._remove(next(iter(self._records.values())))

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        entry = self._records.get(response_id)
        if entry is None or entry.head.owner != owner:
            return None
        self._records.move_to_end(response_id)
        return load_parts(entry.head, entry.parts)

    async def delete(self, owner: str, response_id: str) -> bool:
        entry = self._records.get(response_id)
        if entry is None or entry.head.owner != owner:
            return False
        self._remove(entry)
        return True

    async def last_in_conversation(self, owner: str, conversation_id: str) -> StoredResponse | None:
        ordered = self._conversations.get((owner, conversation_id))
        if not ordered:
            return None
        return await self.get(owner, ordered[-1][1])

    def _remove(self, entry: _ResponseEntry) -> None:
        head = entry.head
        del self._records[head.id]
        self._bytes -= entry.size
        if head.conversation_id is None:
            return
        ckey = (head.owner, head.conversation_id)
        ordered = self._conversations[ckey]
        position = _position(head)
        del ordered[bisect_left(ordered, position)]
        if not ordered:
            del self._conversations[ckey]


def _position(record: StoredResponse) -> tuple[int, str]:
    return (record.created_at, record.id)

    async def ping(self) -> None:
        """Always answers: the data is in this process (for ``/health``)."""


class MemoryStorage:
    """The ``memory://`` storage: one :class:`MemoryKeyStore`, :class:`MemoryFileStore` and
    :class:`MemoryResponseStore` (default caps) per instance, gone when the process exits. ``file_store(content)``
    gives one store per content store."""

    def __init__(self) -> None:
        self._keys = MemoryKeyStore()
        self._files: dict[int, MemoryFileStore] = {}
        self._responses = MemoryResponseStore()
        self._passages: MemoryPassageIndex | None = None

    def key_store(self) -> MemoryKeyStore:
        return self._keys

    def response_store(self) -> MemoryResponseStore:
        return self._responses

    def file_store(self, content: ContentStore | None = None) -> MemoryFileStore:
        found = self._files.get(id(content))
        if found is None or found.content is not content:
            found = self._files[id(content)] = MemoryFileStore(content=content)
        return found

    def passage_index(self) -> MemoryPassageIndex:
        """The passage index of ``include_sources`` in this storage (one per storage, made when first asked)."""
        if self._passages is None:
            from .passages import MemoryPassageIndex

            self._passages = MemoryPassageIndex()
        return self._passages

    async def aclose(self) -> None:
        """Nothing to close: the data lives as long as this object."""


async def _missing(key: str) -> AsyncIterator[bytes]:
    raise FileNotFoundError(f"no content under {key!r}")
    yield b""  # pragma: no cover - makes this an async generator


async def _slice(chunks: tuple[bytes, ...], start: int, end: int | None) -> AsyncIterator[bytes]:
    """The bytes ``[start, end)`` of content held as ``chunks``, chunk by chunk (views, no copy of the whole)."""
    position = 0
    for chunk in chunks:
        size = len(chunk)
        lo, hi = max(start - position, 0), size if end is None else min(end - position, size)
        if lo < hi:
            yield chunk if lo == 0 and hi == size else chunk[lo:hi]
        position += size
        if end is not None and position >= end:
            return
