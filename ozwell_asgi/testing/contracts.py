"""Contract suites for the store protocols: what every adapter, ours or a host's, must pass.

Subclass a suite in a test module and give it the fixture it runs on; every test of the suite then runs on it::

    import pytest
    from ozwell_asgi.testing.contracts import FileStoreContract

    class TestMyFileStore(FileStoreContract):
        @pytest.fixture
        async def file_store(self):
            store = MyFileStore(...)        # empty storage, private to the test
            yield store
            await store.aclose()

Fixtures are ordinary pytest fixtures, so they may be parametrized (one subclass over several storages) and their
params may carry marks (``pytest.param("redis", marks=pytest.mark.redis)``, so ``-m "not redis"`` works). The
suites' tests are async (``pytest.mark.anyio``, already set) and run by the ``anyio`` pytest plugin on the backends
its ``anyio_backend`` fixture names (return ``"asyncio"`` from it for asyncio-only stores). Optional hooks,
overridden the same way:

- :class:`KeyStoreContract`: ``key_store_reopen`` (a fixture: a callable opening another store on the same storage,
  to check that a second process sees every write; ``None`` skips that test).
- :class:`FileStoreContract`: :meth:`~FileStoreContract.leftovers` (what your storage still holds of a file id:
  rows, keys, objects; the all-or-nothing and delete tests then check it is nothing) and
  ``content_held_in_process`` (``True`` for a store that keeps content in this process's memory by design, which
  the bounded-memory test then does not hold against it).
- :class:`ResponseStoreContract`: ``response_store_reopen`` (as ``key_store_reopen``) and
  :meth:`~ResponseStoreContract.forget` (make the storage forget one record as its bound would: expire it, evict
  it; the test that a forgotten record is simply unknown then runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import anyio
import anyio.lowlevel
import pytest

from ..errors import PayloadTooLargeError
from ..pages import paginate
from ..protocols import FileStore, KeyStore, ResponseStore
from ..types import APIKey, Page, PageQuery, StoredFile, StoredResponse

__all__ = ["FileStoreContract", "KeyStoreContract", "ResponseStoreContract", "make_response"]

ORDERS: tuple[Literal["asc", "desc"], ...] = ("asc", "desc")


def _queries(ids: Sequence[str], limits: Iterable[int], unknown: Sequence[str]) -> list[PageQuery]:
    """Every page query over ``ids``: no cursor, after and before each id and each ``unknown`` id, both orders."""
    cursors = [*ids, *unknown]
    queries = []
    for limit in limits:
        for order in ORDERS:
            queries.append(PageQuery(limit=limit, order=order))
            for cursor in cursors:
                queries.append(PageQuery(limit=limit, after=cursor, order=order))
                queries.append(PageQuery(limit=limit, before=cursor, order=order))
    return queries


def _ids(page: Page[Any]) -> tuple[list[str], bool]:
    return [item.id for item in page.data], page.has_more


# --------------------------------------------------------------------------------------------------- key stores


def make_key(n: int | str, **changes: Any) -> APIKey:
    """A key of ``alice`` numbered ``n`` (id ``key_{n}``, hash ``hash_{n}``), with ``changes`` applied."""
    key = APIKey(id=f"key_{n}", key_hash=f"hash_{n}", owner="alice", name=f"key {n}", hint=f"ozw_{n}")
    return dataclasses.replace(key, **changes)


FULL_KEY = make_key(
    "full",
    owner="org-1",
    name="Production — ünïcode",
    plan="enterprise",
    rpm=1000,
    tpm=2_000_000,
    models=("gpt-4o", "llama-*"),
    scopes=("api", "admin"),
    created_at=1_700_000_000,
    expires_at=4_102_444_800,  # past 2038: needs 64-bit storage
    hint="ozw_AbCd",
    origins=("https://app.example.com", "http://localhost:5173"),
    endpoints=("responses", "files"),
)
MINIMAL_KEY = make_key("min", name="", hint="")  # defaults: models None, rpm/tpm None, no expiry


def _by_creation(keys: Iterable[APIKey]) -> list[APIKey]:
    return sorted(keys, key=lambda k: (k.created_at, k.id))


class KeyStoreContract:
    """The :class:`~ozwell_asgi.protocols.KeyStore` contract. Needs a ``key_store`` fixture: an empty store."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    @pytest.fixture
    def key_store(self) -> KeyStore:
        pytest.fail("define a `key_store` fixture (an empty store) in your KeyStoreContract subclass")

    @pytest.fixture
    def key_store_reopen(self) -> Callable[[], KeyStore] | None:
        """Opens another store on the same storage (closed by you after the test), or ``None`` if the storage
        is process-local."""
        return None

    async def test_create_get_roundtrip_every_field(self, key_store: KeyStore) -> None:
        variants = [
            FULL_KEY,
            MINIMAL_KEY,
            make_key("empty-models", models=(), scopes=()),
            make_key("born-revoked", revoked_at=1_700_000_100, created_at=1_700_000_000),
            make_key(
                "scoped",
                origins=("https://app.example.com", "https://*.example.org:8443"),
                endpoints=("chat.completions", "models"),
            ),
        ]
        for key in variants:
            await key_store.create(key)
        for key in variants:
            assert await key_store.get(key.id) == key
            assert await key_store.get_by_hash(key.key_hash) == key
        got = await key_store.get(MINIMAL_KEY.id)
        assert got is not None
        assert (got.models, got.rpm, got.tpm, got.expires_at, got.origins, got.endpoints) == (None,) * 6
        empty = await key_store.get("key_empty-models")
        assert empty is not None
        assert (empty.models, empty.scopes) == ((), ())

    async def test_unknown_id_and_hash(self, key_store: KeyStore) -> None:
        assert await key_store.get("nope") is None
        assert await key_store.get_by_hash("nope") is None
        assert await key_store.list() == []
        assert await key_store.list("nobody") == []
        assert await key_store.list_page(PageQuery()) == Page((), False)

    async def test_lookups_by_text_no_key_can_hold_find_nothing(self, key_store: KeyStore) -> None:
        """A NUL character (PostgreSQL cannot store one) in an id, hash, owner or cursor: not found, never an
        error."""
        await key_store.create(make_key(1))
        for bad in ("\x00", "key_1\x00", "k\x00ey"):
            assert await key_store.get(bad) is None
            assert await key_store.get_by_hash(bad) is None
            assert await key_store.list(bad) == []
            assert await key_store.list_page(PageQuery(), bad) == Page((), False)
            assert await key_store.list_page(PageQuery(after=bad)) == Page((), False)
            assert await key_store.list_page(PageQuery(before=bad)) == Page((), False)
            assert await key_store.revoke(bad, 100) is None
            assert await key_store.rotate(bad, "hash_nul", "ozw_nul") is None
        assert await key_store.list() == [make_key(1)]

    async def test_duplicate_id_or_hash_is_rejected_and_writes_nothing(self, key_store: KeyStore) -> None:
        original = make_key(1)
        await key_store.create(original)
        with pytest.raises(ValueError, match="already exists"):
            await key_store.create(make_key(2, id=original.id))
        with pytest.raises(ValueError, match="already exists"):
            await key_store.create(make_key(3, key_hash=original.key_hash))
        assert await key_store.get_by_hash("hash_2") is None
        assert await key_store.get("key_3") is None
        assert await key_store.get(original.id) == original
        assert await key_store.get_by_hash(original.key_hash) == original
        assert await key_store.list() == [original]

    async def test_list_all_and_by_owner_ordered_by_created_at_then_id(self, key_store: KeyStore) -> None:
        keys = [
            make_key("b", created_at=20, owner="alice"),
            make_key("a", created_at=20, owner="bob"),
            make_key("c", created_at=10, owner="alice"),
            make_key("d", created_at=30, owner="bob"),
            make_key("e", created_at=20, owner="alice", revoked_at=25),
            make_key("f", created_at=5, owner="alice", expires_at=6),
        ]
        for key in random.sample(keys, len(keys)):
            await key_store.create(key)
        expected = _by_creation(keys)
        assert [k.id for k in expected] == ["key_f", "key_c", "key_a", "key_b", "key_e", "key_d"]
        assert await key_store.list() == expected
        assert await key_store.list(None) == expected
        assert await key_store.list("alice") == [k for k in expected if k.owner == "alice"]
        assert await key_store.list("bob") == [k for k in expected if k.owner == "bob"]
        assert await key_store.list("carol") == []

    async def test_list_page_cuts_exactly_as_paginate(self, key_store: KeyStore) -> None:
        """Every page (no cursor, after and before every key, unknown and other owners' cursors, both orders,
        several limits) equals :func:`~ozwell_asgi.pages.paginate` over the same keys; ids that sort differently
        by case, punctuation or collation included."""
        ids = ["key_B", "key_a", "key_A", "key_b", "key__", "key_-", "key_1", "key_10", "key_2", "key_é", "key_Z"]
        keys = [
            make_key(n, id=key_id, owner="alice" if n % 3 else "bob", created_at=100 + n % 4)
            for n, key_id in enumerate(ids)
        ]
        for key in random.sample(keys, len(keys)):
            await key_store.create(key)
        for owner in (None, "alice", "bob", "nobody"):
            scope = _by_creation(k for k in keys if owner is None or k.owner == owner)
            for query in _queries([k.id for k in keys], (1, 2, 3, 20), unknown=["key_unknown"]):
                expected = paginate(scope, query, lambda k: k.id)
                got = await key_store.list_page(query, owner)
                assert _ids(got) == _ids(expected), (owner, query)
                assert got == expected

    async def test_list_page_walks_every_key_once(self, key_store: KeyStore) -> None:
        keys = [make_key(n, created_at=n // 3) for n in range(23)]
        for key in keys:
            await key_store.create(key)
        for order in ORDERS:
            seen: list[str] = []
            query = PageQuery(limit=5, order=order)
            while True:
                page = await key_store.list_page(query)
                seen += [k.id for k in page.data]
                if not page.has_more:
                    break
                query = PageQuery(limit=5, after=page.data[-1].id, order=order)
            expected = [k.id for k in _by_creation(keys)]
            assert seen == (expected if order == "asc" else expected[::-1])

    async def test_revoke_is_idempotent_and_keeps_the_first_time(self, key_store: KeyStore) -> None:
        key = make_key(1, created_at=1)
        await key_store.create(key)
        first = await key_store.revoke(key.id, 100)
        assert first == dataclasses.replace(key, revoked_at=100)
        again = await key_store.revoke(key.id, 200)
        assert again is not None
        assert again.revoked_at == 100
        assert (await key_store.get(key.id)) == first
        by_hash = await key_store.get_by_hash(key.key_hash)  # still resolves: callers check is_active
        assert by_hash is not None
        assert by_hash.revoked_at == 100
        assert not by_hash.is_active(now=50)
        assert await key_store.revoke("unknown", 100) is None
        assert await key_store.get("unknown") is None

    async def test_rotate_replaces_the_hash_and_keeps_the_rest(self, key_store: KeyStore) -> None:
        key = FULL_KEY
        await key_store.create(key)
        rotated = await key_store.rotate(key.id, "hash_new", "ozw_New1")
        assert rotated == dataclasses.replace(key, key_hash="hash_new", hint="ozw_New1")
        assert await key_store.get_by_hash(key.key_hash) is None
        assert await key_store.get_by_hash("hash_new") == rotated
        assert await key_store.get(key.id) == rotated
        assert await key_store.list() == [rotated]
        assert await key_store.list_page(PageQuery()) == Page((rotated,), False)
        # Rotating again works, and the intermediate hash dies too.
        twice = await key_store.rotate(key.id, "hash_newer", "ozw_New2")
        assert twice is not None
        assert twice.key_hash == "hash_newer"
        assert await key_store.get_by_hash("hash_new") is None

    async def test_rotate_fails_on_unknown_or_revoked_keys(self, key_store: KeyStore) -> None:
        assert await key_store.rotate("unknown", "hash_x", "ozw_x") is None
        assert await key_store.get_by_hash("hash_x") is None
        key = make_key(1)
        await key_store.create(key)
        await key_store.revoke(key.id, 10)
        assert await key_store.rotate(key.id, "hash_x", "ozw_x") is None
        assert await key_store.get_by_hash("hash_x") is None
        after = await key_store.get_by_hash(key.key_hash)
        assert after is not None
        assert after.key_hash == key.key_hash
        assert after.revoked_at == 10

    async def test_rotate_to_a_hash_of_another_key_is_rejected(self, key_store: KeyStore) -> None:
        one, two = make_key(1), make_key(2)
        await key_store.create(one)
        await key_store.create(two)
        with pytest.raises(ValueError, match="already exists"):
            await key_store.rotate(one.id, two.key_hash, "ozw_x")
        assert await key_store.get_by_hash(one.key_hash) == one
        assert await key_store.get_by_hash(two.key_hash) == two

    async def test_concurrent_creates_are_all_stored(self, key_store: KeyStore) -> None:
        keys = [make_key(i, created_at=i % 7, owner=f"owner-{i % 3}") for i in range(50)]
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(key_store.create, key)
        assert await key_store.list() == _by_creation(keys)
        for key in keys:
            assert await key_store.get_by_hash(key.key_hash) == key
        assert len(await key_store.list("owner-1")) == len([k for k in keys if k.owner == "owner-1"])

    async def test_concurrent_creates_of_one_id_store_exactly_one(self, key_store: KeyStore) -> None:
        outcomes: list[bool] = []

        async def attempt(n: int) -> None:
            try:
                await key_store.create(make_key(n, id="key_same"))
                outcomes.append(True)
            except ValueError:
                outcomes.append(False)

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(attempt, n)
        assert sorted(outcomes) == [False] * 19 + [True]
        [winner] = await key_store.list()
        resolvable = [n for n in range(20) if await key_store.get_by_hash(f"hash_{n}") is not None]
        assert [f"hash_{n}" for n in resolvable] == [winner.key_hash]

    async def test_concurrent_revokes_agree_on_one_time(self, key_store: KeyStore) -> None:
        await key_store.create(make_key(1))
        results: list[APIKey | None] = []

        async def revoke(at: int) -> None:
            results.append(await key_store.revoke("key_1", at))

        async with anyio.create_task_group() as tg:
            for at in range(100, 120):
                tg.start_soon(revoke, at)
        times = {r.revoked_at for r in results if r is not None}
        assert len(results) == 20
        assert len(times) == 1
        stored = await key_store.get("key_1")
        assert stored is not None
        assert {stored.revoked_at} == times

    async def test_concurrent_rotations_leave_exactly_one_live_hash(self, key_store: KeyStore) -> None:
        await key_store.create(make_key(1))
        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(key_store.rotate, "key_1", f"rot_{n}", f"ozw_{n}")
        final = await key_store.get("key_1")
        assert final is not None
        live = [n for n in range(10) if await key_store.get_by_hash(f"rot_{n}") is not None]
        assert [f"rot_{n}" for n in live] == [final.key_hash]
        assert await key_store.get_by_hash("hash_1") is None

    async def test_a_second_instance_sees_every_write(
        self, key_store: KeyStore, key_store_reopen: Callable[[], KeyStore] | None
    ) -> None:
        if key_store_reopen is None:
            pytest.skip("the storage is process-local")
        await key_store.create(FULL_KEY)
        await key_store.create(MINIMAL_KEY)
        other = key_store_reopen()
        assert await other.get_by_hash(FULL_KEY.key_hash) == FULL_KEY
        assert await other.list() == _by_creation([FULL_KEY, MINIMAL_KEY])
        assert await other.list_page(PageQuery(limit=1, order="asc")) == Page((MINIMAL_KEY,), True)
        revoked = await other.revoke(MINIMAL_KEY.id, 42)
        rotated = await other.rotate(FULL_KEY.id, "hash_rotated", "ozw_R")
        third = key_store_reopen()
        assert await third.get(MINIMAL_KEY.id) == revoked
        assert await third.get_by_hash("hash_rotated") == rotated
        assert await key_store.get_by_hash(FULL_KEY.key_hash) is None
        assert await key_store.get(MINIMAL_KEY.id) == revoked


# -------------------------------------------------------------------------------------------------- file stores

KiB = 1024
MiB = 1024 * KiB


class ContentFailed(Exception):
    """What the suite's failing content raises (a client gone mid-upload, say)."""


def make_file(n: int | str, **changes: Any) -> StoredFile:
    """A file of ``alice`` numbered ``n`` (id ``file-{n}``), with ``changes`` applied."""
    file = StoredFile(id=f"file-{n}", owner="alice", filename=f"f{n}.jsonl", purpose="assistants", created_at=1000)
    return dataclasses.replace(file, **changes)


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` reproducible bytes that no compression shrinks much."""
    return random.Random(seed).randbytes(size)


async def pieces(data: bytes, sizes: Sequence[int] = (64 * KiB,)) -> AsyncIterator[bytes]:
    """``data`` in pieces of the given sizes, in turn (a piece may be empty)."""
    position, turn = 0, 0
    while position < len(data):
        size = sizes[turn % len(sizes)]
        yield data[position : position + size]
        position += size
        turn += 1


async def failing(data: bytes, error: BaseException) -> AsyncIterator[bytes]:
    """``data`` in 64 KiB pieces, then ``error``."""
    async for piece in pieces(data):
        yield piece
    raise error


async def read(content: AsyncIterator[bytes] | None) -> bytes:
    assert content is not None
    return b"".join([bytes(piece) async for piece in content])


class FileStoreContract:
    """The :class:`~ozwell_asgi.protocols.FileStore` contract. Needs a ``file_store`` fixture: an empty store."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    #: True for a store that keeps content in this process's memory by design (no bound on what create holds).
    content_held_in_process: ClassVar[bool] = False
    #: Most Python memory (tracemalloc) that storing or reading 20 MiB may take at its peak.
    streaming_peak_bytes: ClassVar[int] = 8 * MiB

    @pytest.fixture
    def file_store(self) -> FileStore:
        pytest.fail("define a `file_store` fixture (an empty store) in your FileStoreContract subclass")

    async def leftovers(self, store: Any, file_id: str) -> list[str]:
        """What ``store``'s storage still holds of ``file_id`` (names of rows, keys, objects), for the
        all-or-nothing and delete tests. Override it to look into your storage; the default sees nothing."""
        return []

    async def assert_absent(self, store: FileStore, file: StoredFile) -> None:
        """``file`` is nowhere: not by id, not listed, no content, nothing left in the storage."""
        assert await store.get(file.owner, file.id) is None
        assert await store.open(file.owner, file.id) is None
        listed = await store.list(file.owner, PageQuery(limit=100))
        assert file.id not in [f.id for f in listed.data]
        assert await self.leftovers(store, file.id) == []

    # -- create, get, open ------------------------------------------------------------------------------------------

    async def test_create_get_open_roundtrip(self, file_store: FileStore) -> None:
        data = pattern(300 * KiB + 17)
        file = make_file(
            1, filename="report ü.pdf", purpose="user_data", expires_at=4_102_444_800, content_type="application/pdf"
        )
        stored = await file_store.create(dataclasses.replace(file, bytes=5), pieces(data, [1, 64 * KiB, 7, 0]))
        assert stored == dataclasses.replace(file, bytes=len(data))  # the size is the content's, not the one given
        assert await file_store.get("alice", file.id) == stored
        assert await read(await file_store.open("alice", file.id)) == data
        assert await file_store.list("alice", PageQuery()) == Page((stored,), False)

    async def test_fields_set_while_the_content_streams_are_kept(self, file_store: FileStore) -> None:
        """A multipart upload may carry ``purpose`` after the file: the store keeps the file as it stands when its
        content ends (the caller completes it from the content's last step)."""
        file = make_file(1, purpose="assistants", expires_at=None)

        async def content() -> AsyncIterator[bytes]:
            yield b"late "
            yield b"fields"
            object.__setattr__(file, "purpose", "batch")
            object.__setattr__(file, "expires_at", 4_102_444_800)

        stored = await file_store.create(file, content())
        assert (stored.purpose, stored.expires_at) == ("batch", 4_102_444_800)
        kept = await file_store.get("alice", file.id)
        assert kept is not None and (kept.purpose, kept.expires_at) == ("batch", 4_102_444_800)
        assert [f.id for f in (await file_store.list("alice", PageQuery(), purpose="batch")).data] == [file.id]
        assert (await file_store.list("alice", PageQuery(), purpose="assistants")).data == ()

    async def test_empty_content(self, file_store: FileStore) -> None:
        stored = await file_store.create(make_file(1), pieces(b""))
        assert stored.bytes == 0
        assert await read(await file_store.open("alice", stored.id)) == b""
        assert await read(await file_store.open("alice", stored.id, 0, 10)) == b""
        assert await file_store.get("alice", stored.id) == stored

    async def test_unknown_ids_and_text_no_file_can_hold(self, file_store: FileStore) -> None:
        await file_store.create(make_file(1), pieces(b"x"))
        for bad in ("file-2", "", "\x00", "file-1\x00"):
            assert await file_store.get("alice", bad) is None
            assert await file_store.open("alice", bad) is None
            assert await file_store.delete("alice", bad) is False
        for owner in ("\x00", "alice\x00"):
            assert await file_store.get(owner, "file-1") is None
            assert await file_store.list(owner, PageQuery()) == Page((), False)
        assert await file_store.list("alice", PageQuery(), purpose="x\x00") == Page((), False)
        assert await file_store.list("alice", PageQuery(after="\x00")) == Page((), False)
        assert await read(await file_store.open("alice", "file-1")) == b"x"

    async def test_owner_isolation(self, file_store: FileStore) -> None:
        """Another owner's id behaves exactly like an unknown one, on every method."""
        mine = await file_store.create(make_file("a", owner="alice"), pieces(b"alice's"))
        theirs = await file_store.create(make_file("b", owner="bob", created_at=999), pieces(b"bob's"))
        assert await file_store.get("bob", mine.id) is None
        assert await file_store.open("bob", mine.id) is None
        assert await file_store.open("bob", mine.id, 1, 3) is None
        assert await file_store.delete("bob", mine.id) is False
        assert await file_store.list("bob", PageQuery()) == Page((theirs,), False)
        for cursor in (mine.id, "file-unknown"):  # a cursor of another owner gives what an unknown one gives
            for order in ORDERS:
                assert await file_store.list("bob", PageQuery(after=cursor, order=order)) == Page((), False)
                assert await file_store.list("bob", PageQuery(before=cursor, order=order)) == Page((), False)
        assert await file_store.list("carol", PageQuery()) == Page((), False)
        assert await file_store.get("alice", mine.id) == mine  # untouched by bob's attempts
        assert await read(await file_store.open("alice", mine.id)) == b"alice's"
        assert await file_store.list("alice", PageQuery(after=theirs.id)) == Page((), False)

    async def test_duplicate_id_is_rejected_and_the_original_kept(self, file_store: FileStore) -> None:
        original = await file_store.create(make_file(1), pieces(b"original"))
        for owner in ("alice", "bob"):
            with pytest.raises(ValueError, match="already exists"):
                await file_store.create(make_file(1, owner=owner, filename="other"), pieces(pattern(100 * KiB)))
        assert await file_store.get("alice", original.id) == original
        assert await file_store.get("bob", original.id) is None
        assert await read(await file_store.open("alice", original.id)) == b"original"
        assert await file_store.list("alice", PageQuery()) == Page((original,), False)

    async def test_concurrent_creates_of_one_id_store_exactly_one(self, file_store: FileStore) -> None:
        outcomes: dict[int, bool] = {}

        async def attempt(n: int) -> None:
            try:
                await file_store.create(make_file("same", filename=f"n{n}"), pieces(pattern(70 * KiB, n)))
                outcomes[n] = True
            except ValueError:
                outcomes[n] = False

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(attempt, n)
        [winner] = [n for n, won in outcomes.items() if won]
        assert len(outcomes) == 8
        stored = await file_store.get("alice", "file-same")
        assert stored is not None
        assert stored.filename == f"n{winner}"
        assert await read(await file_store.open("alice", "file-same")) == pattern(70 * KiB, winner)

    # -- all or nothing -------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("before_failing", [0, 1, 300 * KiB + 5])
    async def test_content_failing_midway_leaves_nothing(self, file_store: FileStore, before_failing: int) -> None:
        file = make_file(1)
        with pytest.raises(ContentFailed):
            await file_store.create(file, failing(pattern(before_failing), ContentFailed("client gone")))
        await self.assert_absent(file_store, file)
        again = await file_store.create(file, pieces(b"second try"))  # the id is free again
        assert await read(await file_store.open("alice", again.id)) == b"second try"

    async def test_content_over_the_cap_leaves_nothing(self, file_store: FileStore) -> None:
        """The HTTP layer's size cap raises from inside the content: the store passes it on and keeps nothing."""
        file = make_file(1)
        error = PayloadTooLargeError("The file is too large.")
        with pytest.raises(PayloadTooLargeError) as info:
            await file_store.create(file, failing(pattern(200 * KiB), error))
        assert info.value is error
        await self.assert_absent(file_store, file)

    async def test_a_cancelled_upload_leaves_nothing(self, file_store: FileStore) -> None:
        """A client gone mid-upload cancels the request's task: nothing of the file remains."""
        file = make_file(1)
        received = anyio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            async for piece in pieces(pattern(600 * KiB)):
                yield piece
            received.set()
            await anyio.sleep_forever()
            yield b"never"  # pragma: no cover

        async with anyio.create_task_group() as tg:
            tg.start_soon(file_store.create, file, stalled())
            await received.wait()
            assert await file_store.get("alice", file.id) is None  # invisible while it is being written
            assert await file_store.list("alice", PageQuery()) == Page((), False)
            tg.cancel_scope.cancel()
        await self.assert_absent(file_store, file)

    async def test_an_upload_in_progress_is_invisible_and_others_proceed(self, file_store: FileStore) -> None:
        file = make_file("slow")
        halfway, resume = anyio.Event(), anyio.Event()
        data = pattern(700 * KiB)

        async def paused() -> AsyncIterator[bytes]:
            async for piece in pieces(data[: 300 * KiB]):
                yield piece
            halfway.set()
            await resume.wait()
            async for piece in pieces(data[300 * KiB :]):
                yield piece

        async with anyio.create_task_group() as tg:
            tg.start_soon(file_store.create, file, paused())
            await halfway.wait()
            assert await file_store.get("alice", file.id) is None
            assert await file_store.open("alice", file.id) is None
            other = await file_store.create(make_file("quick"), pieces(b"quick"))  # not blocked by the slow one
            assert await file_store.list("alice", PageQuery()) == Page((other,), False)
            resume.set()
        assert await read(await file_store.open("alice", file.id)) == data

    # -- ranges -----------------------------------------------------------------------------------------------------

    async def test_ranges(self, file_store: FileStore) -> None:
        size = 700 * KiB + 3
        data = pattern(size, 7)
        await file_store.create(make_file(1), pieces(data, [1000, 64 * KiB, 3, 256 * KiB + 1]))
        cuts = [
            (0, None),
            (1, None),
            (0, 1),
            (5, 6),
            (size - 1, None),
            (size, None),
            (size + 10, None),
            (0, size),
            (0, size + 100),
            (256 * KiB - 1, 256 * KiB + 1),
            (256 * KiB, 512 * KiB),
            (100, 100),
            (300, 200),
            (64 * KiB * 3 - 7, 64 * KiB * 9 + 11),
        ]
        for start, end in cuts:
            got = await read(await file_store.open("alice", "file-1", start, end))
            assert got == data[start:end], (start, end)
        assert await file_store.open("bob", "file-1", 0, 10) is None

    # -- list -------------------------------------------------------------------------------------------------------

    async def test_list_cuts_exactly_as_paginate(self, file_store: FileStore) -> None:
        """Every page (no cursor, after and before each file, unknown and other owners' cursors, both orders,
        several limits, each purpose) equals :func:`~ozwell_asgi.pages.paginate` over the same files; ids that
        sort differently by case, punctuation or collation included."""
        ids = ["file-B", "file-a", "file-A", "file-b", "file-_", "file--", "file-1", "file-10", "file-2", "file-é"]
        files = [
            make_file(
                n,
                id=file_id,
                owner="bob" if n % 4 == 3 else "alice",
                purpose="batch" if n % 3 == 0 else "assistants",
                created_at=100 + n % 3,
            )
            for n, file_id in enumerate(ids)
        ]
        for file in random.sample(files, len(files)):
            await file_store.create(file, pieces(file.id.encode()))
        stored = {f.id: dataclasses.replace(f, bytes=len(f.id.encode())) for f in files}
        for owner in ("alice", "bob"):
            for purpose in (None, "batch", "vision"):
                scope = sorted(
                    (f for f in stored.values() if f.owner == owner and purpose in (None, f.purpose)),
                    key=lambda f: (f.created_at, f.id),
                )
                for query in _queries(ids, (1, 3, 20), unknown=["file-unknown"]):
                    expected = paginate(scope, query, lambda f: f.id)
                    got = await file_store.list(owner, query, purpose)
                    assert _ids(got) == _ids(expected), (owner, purpose, query)
                    assert got == expected

    async def test_pages_walk_every_file_once_both_ways(self, file_store: FileStore) -> None:
        files = [make_file(n, created_at=n // 4) for n in range(23)]
        for file in files:
            await file_store.create(file, pieces(b"x"))
        expected = [f.id for f in sorted(files, key=lambda f: (f.created_at, f.id))]
        for order in ORDERS:
            listing = expected if order == "asc" else expected[::-1]
            forwards: list[str] = []
            query = PageQuery(limit=4, order=order)
            while True:
                page = await file_store.list("alice", query)
                forwards += [f.id for f in page.data]
                if not page.has_more:
                    break
                query = PageQuery(limit=4, after=page.data[-1].id, order=order)
            assert forwards == listing
            backwards: list[str] = []
            query = PageQuery(limit=4, before=listing[-1], order=order)
            while True:
                page = await file_store.list("alice", query)
                backwards = [f.id for f in page.data] + backwards
                if not page.has_more:
                    break
                query = PageQuery(limit=4, before=page.data[0].id, order=order)
            assert backwards == listing[:-1]

    async def test_pages_are_stable_under_concurrent_creates(self, file_store: FileStore) -> None:
        """Files created while a client pages through (older, newer, and tied with what it has seen) never make
        it see a file twice or miss one that existed before it started."""
        before = [make_file(f"old-{n:02d}", created_at=10 * (n // 2)) for n in range(30)]
        for file in before:
            await file_store.create(file, pieces(b"o"))

        async def create_more(tag: str) -> None:
            for n in range(30):
                file = make_file(f"new-{tag}-{n:02d}", created_at=random.randrange(0, 300))
                await file_store.create(file, pieces(b"n"))
                await anyio.lowlevel.checkpoint()

        for order in ORDERS:
            seen: list[StoredFile] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(create_more, order)
                query = PageQuery(limit=4, order=order)
                while True:
                    page = await file_store.list("alice", query)
                    seen += page.data
                    if not page.has_more:
                        break
                    query = PageQuery(limit=4, after=page.data[-1].id, order=order)
                    await anyio.lowlevel.checkpoint()
            ids = [f.id for f in seen]
            assert len(ids) == len(set(ids)), "a file was listed twice"
            assert {f.id for f in before} <= set(ids), "a file that existed all along was skipped"
            positions = [(f.created_at, f.id) for f in seen]
            assert positions == sorted(positions, reverse=order == "desc")

    # -- delete -----------------------------------------------------------------------------------------------------

    async def test_delete_removes_metadata_and_content(self, file_store: FileStore) -> None:
        doomed = await file_store.create(make_file(1), pieces(pattern(600 * KiB)))
        kept = await file_store.create(make_file(2), pieces(b"kept"))
        assert await file_store.delete("alice", doomed.id) is True
        await self.assert_absent(file_store, doomed)
        assert await file_store.delete("alice", doomed.id) is False
        assert await file_store.list("alice", PageQuery()) == Page((kept,), False)
        assert await read(await file_store.open("alice", kept.id)) == b"kept"
        recreated = await file_store.create(make_file(1), pieces(b"new"))  # the id is free again
        assert await read(await file_store.open("alice", recreated.id)) == b"new"

    async def test_concurrent_deletes_succeed_exactly_once(self, file_store: FileStore) -> None:
        await file_store.create(make_file(1), pieces(pattern(10 * KiB)))
        results: list[bool] = []

        async def delete() -> None:
            results.append(await file_store.delete("alice", "file-1"))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(delete)
        assert sorted(results) == [False] * 9 + [True]
        assert await self.leftovers(file_store, "file-1") == []

    async def test_a_file_deleted_while_read_is_never_cut_short_silently(self, file_store: FileStore) -> None:
        data = pattern(1536 * KiB, 3)
        await file_store.create(make_file(1), pieces(data))
        content = await file_store.open("alice", "file-1")
        assert content is not None
        received = bytearray()
        try:
            async for piece in content:
                if not received:
                    assert await file_store.delete("alice", "file-1") is True
                received += piece
        except FileNotFoundError:
            assert len(received) < len(data)
        else:
            assert received == data  # the store read it all before the delete took effect

    # -- bounded memory ---------------------------------------------------------------------------------------------

    async def test_large_content_is_streamed_in_bounded_memory(self, file_store: FileStore) -> None:
        """20 MiB in 64 KiB pieces, made as they are sent: storing it and reading it back never holds more than
        ``streaming_peak_bytes`` of Python memory (tracemalloc) at once."""
        size, piece = 20 * MiB, 64 * KiB
        digest = hashlib.sha256()

        async def generated() -> AsyncIterator[bytes]:
            for n in range(size // piece):
                block = n.to_bytes(8, "big") * (piece // 8)
                digest.update(block)
                yield block

        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            stored = await file_store.create(make_file("big"), generated())
            create_peak = tracemalloc.get_traced_memory()[1] - base
            content = await file_store.open("alice", stored.id)
            assert content is not None
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            readback = hashlib.sha256()
            total = 0
            async for chunk in content:
                readback.update(chunk)
                total += len(chunk)
            read_peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert stored.bytes == total == size
        assert readback.hexdigest() == digest.hexdigest()
        if not self.content_held_in_process:
            assert create_peak < self.streaming_peak_bytes, f"storing 20 MiB peaked at {create_peak} bytes"
        assert read_peak < self.streaming_peak_bytes, f"reading 20 MiB peaked at {read_peak} bytes"


# ---------------------------------------------------------------------------------------------- response stores


def make_response(n: int | str, **changes: Any) -> StoredResponse:
    """A stored response of ``alice`` numbered ``n`` (id ``resp_{n}``): one input item, a two-message conversation,
    no conversation id; ``changes`` applied (``status`` is mirrored into ``response``)."""
    status = changes.get("status", "completed")
    response_id = changes.get("id", f"resp_{n}")
    record = StoredResponse(
        id=response_id,
        owner="alice",
        created_at=1000,
        status=status,
        response={
            "id": response_id,
            "object": "response",
            "created_at": changes.get("created_at", 1000),
            "status": status,
            "model": "echo",
            "output": [
                {
                    "id": f"msg_out_{n}",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": f"answer {n}", "annotations": []}],
                }
            ],
            "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        },
        input_items=(
            {
                "id": f"msg_in_{n}",
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": f"question {n}"}],
            },
        ),
        conversation=({"role": "user", "content": f"question {n}"}, {"role": "assistant", "content": f"answer {n}"}),
        key_id="key_1",
    )
    return dataclasses.replace(record, **changes)


def _newest(records: Iterable[StoredResponse]) -> StoredResponse | None:
    return max(records, key=lambda r: (r.created_at, r.id), default=None)


class ResponseStoreContract:
    """The :class:`~ozwell_asgi.protocols.ResponseStore` contract. Needs a ``response_store`` fixture: an empty
    store.

    Optional hooks: ``response_store_reopen`` (a fixture: a callable opening another store on the same storage, to
    check that a second process sees every write; ``None`` skips that test), and :meth:`forget` (make the storage
    forget one record as its bound would: an expiry, an eviction; the test that a forgotten record is simply
    unknown is skipped when it returns ``False``).
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    @pytest.fixture
    def response_store(self) -> ResponseStore:
        pytest.fail("define a `response_store` fixture (an empty store) in your ResponseStoreContract subclass")

    @pytest.fixture
    def response_store_reopen(self) -> Callable[[], ResponseStore] | None:
        """Opens another store on the same storage (closed by you after the test), or ``None`` if the storage
        is process-local."""
        return None

    async def forget(self, store: Any, record: StoredResponse) -> bool:
        """Make ``store`` forget ``record`` as its bound would (expire it, evict it); ``False`` if it never
        forgets a record (the default)."""
        return False

    # -- roundtrip --------------------------------------------------------------------------------------------------

    async def test_put_get_roundtrip_every_field(self, response_store: ResponseStore) -> None:
        """Every field comes back equal: nested JSON of every type, unicode (a NUL, an emoji, a lone surrogate),
        integers past 2**53, exact floats, empty parts, and a conversation of about 1 MB."""
        odd = "ünïcode — 日本語 😀 \x00 nul \ud800 lone \\ \" '"
        full = make_response(
            "full",
            owner="org-1 ü",
            created_at=4_102_444_800,  # past 2038: needs 64-bit storage
            status="incomplete",
            conversation_id="conv-full",
            key_id="key_full",
            response={
                "id": "resp_full",
                "status": "incomplete",
                "text": odd,
                "numbers": [0, -1, 2**63 - 1, 2**70, 1.5, -0.25, 1e-300, 123456.789],
                "flags": {"yes": True, "no": False, "none": None},
                "nested": {"a": [{"b": [{"c": [[], {}, "", [None]]}]}]},
                "metadata": {odd: odd},
            },
            input_items=tuple({"id": f"item_{i}", "type": "message", "content": odd * i} for i in range(5)),
        )
        minimal = StoredResponse(id="resp_min", owner="alice", created_at=0, status="queued", response={})
        big_text = "Ω" * 2500 + "x" * 2500  # 7.5 KB of UTF-8 per message, about 1 MB in all
        large = make_response(
            "large",
            conversation_id="conv-large",
            conversation=tuple(
                {"role": "user" if i % 2 else "assistant", "content": f"{i}: {big_text}"} for i in range(140)
            ),
        )
        for record in (full, minimal, large):
            await response_store.put(record)
        for record in (full, minimal, large):
            got = await response_store.get(record.owner, record.id)
            assert got == record
            assert got is not None
            assert isinstance(got.input_items, tuple)
            assert isinstance(got.conversation, tuple)
        assert await response_store.last_in_conversation("org-1 ü", "conv-full") == full
        assert await response_store.last_in_conversation("alice", "conv-large") == large

    async def test_unknown_ids_and_conversations(self, response_store: ResponseStore) -> None:
        assert await response_store.get("alice", "resp_nope") is None
        assert await response_store.delete("alice", "resp_nope") is False
        assert await response_store.last_in_conversation("alice", "conv-nope") is None
        await response_store.put(make_response(1))  # no conversation: in none
        assert await response_store.last_in_conversation("alice", "") is None

    async def test_lookups_by_text_no_record_can_hold_find_nothing(self, response_store: ResponseStore) -> None:
        """A NUL character (PostgreSQL cannot store one) in an owner, id or conversation id: not found, never an
        error."""
        record = make_response(1, conversation_id="conv")
        await response_store.put(record)
        for bad in ("\x00", "resp_1\x00", "al\x00ice"):
            assert await response_store.get("alice", bad) is None
            assert await response_store.get(bad, "resp_1") is None
            assert await response_store.delete(bad, "resp_1") is False
            assert await response_store.delete("alice", bad) is False
            assert await response_store.last_in_conversation(bad, "conv") is None
            assert await response_store.last_in_conversation("alice", bad) is None
        assert await response_store.get("alice", "resp_1") == record

    # -- owners -----------------------------------------------------------------------------------------------------

    async def test_another_owners_record_is_an_unknown_one(self, response_store: ResponseStore) -> None:
        mine = make_response(1, conversation_id="conv")
        theirs = make_response(2, owner="bob", conversation_id="conv", created_at=500)
        await response_store.put(mine)
        await response_store.put(theirs)
        assert await response_store.get("bob", mine.id) is None
        assert await response_store.delete("bob", mine.id) is False
        assert await response_store.get("alice", mine.id) == mine  # still there
        assert await response_store.get("alice", theirs.id) is None
        assert await response_store.delete("alice", theirs.id) is False
        # The same conversation id is a different conversation for each owner.
        assert await response_store.last_in_conversation("alice", "conv") == mine
        assert await response_store.last_in_conversation("bob", "conv") == theirs
        assert await response_store.last_in_conversation("carol", "conv") is None
        assert await response_store.delete("alice", mine.id) is True
        assert await response_store.last_in_conversation("alice", "conv") is None
        assert await response_store.last_in_conversation("bob", "conv") == theirs

    async def test_a_put_of_another_owners_id_is_refused_and_changes_nothing(
        self, response_store: ResponseStore
    ) -> None:
        original = make_response(1, conversation_id="conv")
        await response_store.put(original)
        for conversation_id in ("conv", "other", None):
            intruder = make_response(1, owner="bob", status="failed", conversation_id=conversation_id)
            with pytest.raises(ValueError, match="another owner"):
                await response_store.put(intruder)
            assert await response_store.get("bob", original.id) is None
            assert await response_store.last_in_conversation("bob", conversation_id or "conv") is None
        assert await response_store.get("alice", original.id) == original
        assert await response_store.last_in_conversation("alice", "conv") == original

    # -- replace and delete -----------------------------------------------------------------------------------------

    async def test_put_replaces_the_record_of_the_same_id_and_owner(self, response_store: ResponseStore) -> None:
        """A background run is put when queued and again as it ends: the second put replaces every field."""
        queued = make_response(1, status="queued", conversation_id="conv", conversation=())
        await response_store.put(queued)
        assert await response_store.get("alice", queued.id) == queued
        done = make_response(1, status="completed", conversation_id="conv")
        await response_store.put(done)
        assert await response_store.get("alice", done.id) == done
        assert await response_store.last_in_conversation("alice", "conv") == done
        # A replacement may move the record to another conversation, or out of any.
        moved = make_response(1, conversation_id="elsewhere", created_at=7)
        await response_store.put(moved)
        assert await response_store.last_in_conversation("alice", "conv") is None
        assert await response_store.last_in_conversation("alice", "elsewhere") == moved
        alone = make_response(1, conversation_id=None)
        await response_store.put(alone)
        assert await response_store.last_in_conversation("alice", "elsewhere") is None
        assert await response_store.get("alice", alone.id) == alone

    async def test_delete_is_idempotent_and_frees_the_id(self, response_store: ResponseStore) -> None:
        doomed, kept = make_response(1, conversation_id="conv"), make_response(2, conversation_id="conv")
        await response_store.put(doomed)
        await response_store.put(kept)
        assert await response_store.delete("alice", doomed.id) is True
        assert await response_store.delete("alice", doomed.id) is False
        assert await response_store.get("alice", doomed.id) is None
        assert await response_store.get("alice", kept.id) == kept
        assert await response_store.last_in_conversation("alice", "conv") == kept
        again = make_response(1, owner="bob")  # a deleted id is free, for any owner
        await response_store.put(again)
        assert await response_store.get("bob", again.id) == again

    # -- conversations ----------------------------------------------------------------------------------------------

    async def test_last_in_conversation_is_the_newest_by_created_at_then_id(
        self, response_store: ResponseStore
    ) -> None:
        """Ties on ``created_at`` go to the greater id, compared byte by byte (``resp_B < resp_a < resp_é``); a
        record put later but created earlier does not take over; deleting the newest makes the next one newest."""
        ids = ["resp_B", "resp_a", "resp_A", "resp_b", "resp__", "resp_-", "resp_1", "resp_10", "resp_2", "resp_é"]
        records = [make_response(n, id=i, conversation_id="conv", created_at=100 + n % 3) for n, i in enumerate(ids)]
        noise = [
            make_response("other-conv", conversation_id="conv-2", created_at=999),
            make_response("no-conv", created_at=999),
            make_response("bobs", owner="bob", conversation_id="conv", created_at=999),
        ]
        for record in random.sample(records + noise, len(records) + len(noise)):
            await response_store.put(record)
        remaining = list(records)
        while remaining:
            newest = _newest(remaining)
            assert newest is not None
            assert await response_store.last_in_conversation("alice", "conv") == newest
            assert await response_store.delete("alice", newest.id) is True
            remaining.remove(newest)
        assert await response_store.last_in_conversation("alice", "conv") is None
        assert await response_store.last_in_conversation("alice", "conv-2") == noise[0]
        assert await response_store.last_in_conversation("bob", "conv") == noise[2]

    async def test_deleting_an_older_record_keeps_the_newest(self, response_store: ResponseStore) -> None:
        records = [make_response(n, conversation_id="conv", created_at=n) for n in range(4)]
        for record in records:
            await response_store.put(record)
        assert await response_store.delete("alice", records[1].id) is True
        assert await response_store.last_in_conversation("alice", "conv") == records[3]
        late = make_response("late", conversation_id="conv", created_at=2)  # put last, created before resp_3
        await response_store.put(late)
        assert await response_store.last_in_conversation("alice", "conv") == records[3]

    # -- concurrency ------------------------------------------------------------------------------------------------

    async def test_concurrent_puts_are_all_stored(self, response_store: ResponseStore) -> None:
        records = [
            make_response(n, owner=f"owner-{n % 3}", conversation_id=f"conv-{n % 4}", created_at=n % 7)
            for n in range(48)
        ]
        async with anyio.create_task_group() as tg:
            for record in records:
                tg.start_soon(response_store.put, record)
        for record in records:
            assert await response_store.get(record.owner, record.id) == record
        for owner in range(3):
            for conv in range(4):
                scope = [r for r in records if r.owner == f"owner-{owner}" and r.conversation_id == f"conv-{conv}"]
                got = await response_store.last_in_conversation(f"owner-{owner}", f"conv-{conv}")
                assert got == _newest(scope)

    async def test_concurrent_replacements_of_one_id_leave_one_whole_record(
        self, response_store: ResponseStore
    ) -> None:
        """Puts of one id racing (each naming another conversation): one of them is stored whole, and it is in
        its own conversation and no other."""
        versions = [make_response(1, status=f"s{n}", conversation_id=f"conv-{n}", created_at=n) for n in range(12)]
        await response_store.put(versions[0])
        async with anyio.create_task_group() as tg:
            for version in versions[1:]:
                tg.start_soon(response_store.put, version)
        final = await response_store.get("alice", "resp_1")
        assert final in versions[1:]
        for version in versions:
            expected = final if version == final else None
            assert await response_store.last_in_conversation("alice", version.conversation_id or "") == expected

    async def test_concurrent_deletes_succeed_exactly_once(self, response_store: ResponseStore) -> None:
        await response_store.put(make_response(1, conversation_id="conv"))
        results: list[bool] = []

        async def delete() -> None:
            results.append(await response_store.delete("alice", "resp_1"))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(delete)
        assert sorted(results) == [False] * 9 + [True]
        assert await response_store.last_in_conversation("alice", "conv") is None

    # -- persistence and bounds -------------------------------------------------------------------------------------

    async def test_a_second_instance_sees_every_write(
        self, response_store: ResponseStore, response_store_reopen: Callable[[], ResponseStore] | None
    ) -> None:
        if response_store_reopen is None:
            pytest.skip("the storage is process-local")
        first, second = make_response(1, conversation_id="conv"), make_response(2, conversation_id="conv")
        await response_store.put(first)
        other = response_store_reopen()
        assert await other.get("alice", first.id) == first
        await other.put(second)
        done = make_response(1, status="failed", conversation_id="conv", created_at=5000)
        await other.put(done)
        assert await response_store.get("alice", second.id) == second
        assert await response_store.get("alice", first.id) == done
        assert await response_store.last_in_conversation("alice", "conv") == done
        assert await other.delete("alice", first.id) is True
        third = response_store_reopen()
        assert await third.get("alice", first.id) is None
        assert await third.last_in_conversation("alice", "conv") == second

    async def test_a_forgotten_record_is_simply_unknown(self, response_store: ResponseStore) -> None:
        """What a bounded store forgets (past its cap, its TTL) is unknown everywhere, and its id can be put
        again; the conversation's newest remaining record takes its place."""
        records = [make_response(n, conversation_id="conv", created_at=n) for n in range(3)]
        for record in records:
            await response_store.put(record)
        if not await self.forget(response_store, records[2]):
            pytest.skip("this store never forgets a record")
        assert await response_store.get("alice", records[2].id) is None
        assert await response_store.delete("alice", records[2].id) is False
        assert await response_store.last_in_conversation("alice", "conv") == records[1]
        assert await self.forget(response_store, records[1])
        assert await self.forget(response_store, records[0])
        assert await response_store.last_in_conversation("alice", "conv") is None
        await response_store.put(records[1])
        assert await response_store.get("alice", records[1].id) == records[1]
        assert await response_store.last_in_conversation("alice", "conv") == records[1]
