"""SQL stores on SQLAlchemy 2 (async Core): SQLite through aiosqlite, PostgreSQL through asyncpg.

One :class:`SQLDatabase` (engine + the shared :data:`metadata` + a lazy, idempotent ``create_all``) can back every
SQL store of a host, so they share one pool. Tables are created on first use, so the stores work when nobody runs
a lifespan; on SQLite, WAL and a busy timeout let a CLI and a running server write the same file.

No key hash reaches a log or an exception message: engines made here hide statement parameters
(``hide_parameters=True``), a failed statement is re-raised without SQLAlchemy's text (which lists the
parameters) whatever the engine, and aiosqlite's DEBUG lines name each operation without its arguments.

Text holding a NUL character, which PostgreSQL cannot store, is never sent: no key has it, so a lookup by it
finds nothing and a key carrying it is refused with ``ValueError``.

Files (:class:`SQLFileStore`) keep their metadata in ``ozwell_files`` and their content in ``ozwell_file_chunks``
(rows of ``chunk_size`` bytes, 256 KiB by default), or in a :class:`~ozwell_asgi.protocols.ContentStore`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import anyio
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, ProgrammingError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from ..errors import ServiceUnavailableError
from ..protocols import ContentStore
from ..types import APIKey, Page, PageQuery, StoredFile, StoredResponse
from .outage import unavailable_on
from .response_codec import dump_parts, load_parts

if TYPE_CHECKING:
    from .passages import SQLPassageIndex

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FileStoreStatementError",
    "KeyStoreStatementError",
    "ResponseStoreStatementError",
    "SQLDatabase",
    "SQLFileStore",
    "SQLKeyStore",
    "SQLResponseStore",
    "api_keys_table",
    "file_chunks_table",
    "files_table",
    "metadata",
    "normalize_sql_url",
    "responses_table",
]

log = logging.getLogger("ozwell_asgi.stores.sql")

#: Every table of every SQL store; ``SQLDatabase`` creates them all at once.
metadata = sa.MetaData()

api_keys_table = sa.Table(
    "ozwell_api_keys",
    metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("key_hash", sa.String(255), nullable=False, unique=True, index=True),
    sa.Column("owner", sa.String(255), nullable=False, index=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("plan", sa.String(255), nullable=False),
    sa.Column("rpm", sa.BigInteger, nullable=True),
    sa.Column("tpm", sa.BigInteger, nullable=True),
    sa.Column("models", sa.Text, nullable=True),  # JSON list, or NULL for "every model"
    sa.Column("scopes", sa.Text, nullable=False),  # JSON list
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    sa.Column("hint", sa.String(255), nullable=False),
    sa.Column("origins", sa.Text, nullable=True),  # JSON list (a scoped key's browser origins), or NULL: any
    sa.Column("endpoints", sa.Text, nullable=True),  # JSON list (a scoped key's endpoint groups), or NULL: all
)
# Columns of ``ozwell_api_keys`` added since its first release: a table made before gets them on first use.
_ADDED_KEY_COLUMNS = ("origins", "endpoints")

# Ids compare byte by byte (PostgreSQL's "C" collation; SQLite's BINARY is that already), so the order of
# (created_at, id) is the same in every database and in Python, whatever the database's own collation.
_ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")

files_table = sa.Table(
    "ozwell_files",
    metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("content_type", sa.Text, nullable=False),
    sa.Column("chunk_size", sa.Integer, nullable=False),  # 0: the content is in a content store
    sa.Column("state", sa.String(16), nullable=False),  # "ready", or "pending"/"deleting": seen by no read
    sa.Column("touched_at", sa.BigInteger, nullable=False),  # epoch seconds of the last progress while not ready
    sa.Index("ix_ozwell_files_owner_order", "owner", "created_at", "id"),
    sa.Index("ix_ozwell_files_owner_purpose_order", "owner", "purpose", "created_at", "id"),
    sa.Index("ix_ozwell_files_state", "state", "touched_at"),
)

#: Stored responses (:class:`SQLResponseStore`): the scalar fields as columns, the rendered response, input items
#: and conversation as one JSON text (``response_codec``; PostgreSQL's ``text`` holds up to 1 GB, SQLite's up to its
#: ``SQLITE_MAX_LENGTH``, 1 GB by default). The index serves ``last_in_conversation`` with one indexed row.
responses_table = sa.Table(
    "ozwell_responses",
    metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("conversation_id", sa.Text, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("key_id", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_ozwell_responses_conversation", "owner", "conversation_id", "created_at", "id"),
)

file_chunks_table = sa.Table(
    "ozwell_file_chunks",
    metadata,
    sa.Column("file_id", _ID, primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

SQLITE_BUSY_TIMEOUT_MS = 10_000

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}
_ACCEPTED = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:///:memory:, sqlite+aiosqlite:///..., "
    "postgresql://user:password@host:port/db, postgres://..., postgresql+asyncpg://..."
)


def normalize_sql_url(url: str | URL) -> URL:
    """``url`` with a plain ``sqlite``/``postgres``/``postgresql`` scheme rewritten to its async driver.

    ``ValueError`` for a scheme that is neither SQLite nor PostgreSQL.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    driver = parsed.drivername.lower()
    if driver in _ASYNC_DRIVERS:
        return parsed.set(drivername=_ASYNC_DRIVERS[driver])
    if driver.startswith(("sqlite+", "postgresql+")):
        return parsed
    raise ValueError(f"unsupported SQL URL scheme {parsed.drivername!r}; use one of: {_ACCEPTED}")


def _is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")  # a no-op ("memory") for in-memory databases
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


class _OperationNamesOnly(logging.Filter):
    """aiosqlite logs every operation at DEBUG as the call it runs, statement parameters included: keep the
    record, with each callable argument shown by its name only (``execute``, ``fetchall``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_call_name(arg) if callable(arg) else arg for arg in record.args)
        return True


def _call_name(call: Any) -> str:
    while isinstance(call, functools.partial):
        call = call.func
    return str(getattr(call, "__name__", type(call).__name__))


_AIOSQLITE_FILTER = _OperationNamesOnly()


_OUTAGES = (OperationalError, InterfaceError, PoolTimeoutError, OSError)


class KeyStoreStatementError(RuntimeError):
    """A statement of the SQL key store failed; the message names the database's error, never the parameters."""


class FileStoreStatementError(RuntimeError):
    """A statement of the SQL file store failed; the message names the database's error, never the parameters."""


class ResponseStoreStatementError(RuntimeError):
    """A statement of the SQL response store failed; the message names the database's error, never the
    parameters."""


@contextmanager
def _statement_errors(what: str, store: str, error: type[RuntimeError]) -> Iterator[None]:
    """Outages (a lost connection, a locked database, an exhausted pool) become the 503 naming ``what``; any other
    failed statement an ``error`` without SQLAlchemy's text, whose ``[parameters: ...]`` holds key hashes or file
    bytes."""
    try:
        with unavailable_on(*_OUTAGES, what=what):
            yield
    except StatementError as exc:
        orig = exc.orig
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        detail = type(orig).__name__ + (f", SQLSTATE {code}" if code else "")
        raise error(f"the SQL {store}'s statement failed ({detail})") from None


_unavailable = functools.partial(_statement_errors, "API key store", "key store", KeyStoreStatementError)
_file_errors = functools.partial(_statement_errors, "file store", "file store", FileStoreStatementError)
_response_errors = functools.partial(_statement_errors, "response store", "response store", ResponseStoreStatementError)


def _has_nul(*values: str | None) -> bool:
    return any(value is not None and "\x00" in value for value in values)


class SQLDatabase:
    """An async engine plus the shared :data:`metadata`, whose tables are created lazily, once per instance.

    ``ensure_tables`` is idempotent and safe when several processes start at once (a lost creation race is
    retried). Stores built on the same instance share its connection pool.
    """

    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = False) -> None:
        self.engine = engine
        self.owns_engine = owns_engine
        self._ready = False
        self._lock = anyio.Lock()
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
            logging.getLogger("aiosqlite").addFilter(_AIOSQLITE_FILTER)  # idempotent: one filter object

    @classmethod
    def from_url(cls, url: str | URL, **engine_kwargs: Any) -> SQLDatabase:
        """A database owning a new engine for ``url`` (plain schemes get the async driver; see
        :func:`normalize_sql_url`).

        ``sqlite:///:memory:`` is one database on one connection, kept for the engine's life and lent to one task
        at a time (a pool of exactly one, rather than a StaticPool, whose shared connection would interleave the
        transactions of concurrent tasks).
        """
        parsed = normalize_sql_url(url)
        if _is_memory_sqlite(parsed):
            engine_kwargs.setdefault("poolclass", AsyncAdaptedQueuePool)
            engine_kwargs.setdefault("pool_size", 1)
            engine_kwargs.setdefault("max_overflow", 0)
            engine_kwargs.setdefault("pool_timeout", 60)
            engine_kwargs.setdefault("connect_args", {"check_same_thread": False})
        elif parsed.get_backend_name() == "postgresql":
            engine_kwargs.setdefault("pool_pre_ping", True)
        engine_kwargs.setdefault("hide_parameters", True)  # statement parameters hold key hashes
        return cls(create_async_engine(parsed, **engine_kwargs), owns_engine=True)

    async def ensure_tables(self) -> None:
        """Create every table of :data:`metadata` that is missing; after the first success, a flag check."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            for attempt in range(5):
                try:
                    async with self.engine.begin() as conn:
                        await conn.run_sync(metadata.create_all, checkfirst=True)
                        await conn.run_sync(_add_missing_key_columns)
                    break
                except (IntegrityError, ProgrammingError, OperationalError):
                    # Another process created the same table (or type) between our check and our CREATE; the
                    # next pass sees it. Anything else fails again and is raised on the last attempt.
                    if attempt == 4:
                        raise
                    await anyio.sleep(0.05 * (attempt + 1))
            self._ready = True

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def key_store(self) -> SQLKeyStore:
        """A key store on this database (sharing its pool; closing it leaves the database open)."""
        return SQLKeyStore(self)

    def file_store(self, content: ContentStore | None = None, **options: Any) -> SQLFileStore:
        """A file store on this database (sharing its pool), its content in chunk rows or in ``content``;
        ``options`` are :class:`SQLFileStore`'s."""
        return SQLFileStore(self, content=content, **options)

    def response_store(self) -> SQLResponseStore:
        """A response store on this database (sharing its pool; closing it leaves the database open)."""
        return SQLResponseStore(self)

    async def aclose(self) -> None:
        """Dispose of the engine's pool if this instance created the engine; otherwise do nothing."""
        if self.owns_engine:
            await self.engine.dispose()

    async def ping(self) -> None:
        """Raise unless the database answers (its tables made if missing, then ``SELECT 1``): for ``/health``."""
        await self.ensure_tables()
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    def passage_index(self, **options: Any) -> SQLPassageIndex:
        """The passage index of ``include_sources`` on this database (sharing its pool; its own tables);
        ``options`` are :class:`~ozwell_asgi.stores.passages.SQLPassageIndex`'s."""
        from .passages import SQLPassageIndex

        return SQLPassageIndex(self, **options)


def _add_missing_key_columns(conn: sa.Connection) -> None:
    """``ALTER TABLE ozwell_api_keys ADD COLUMN`` each nullable column of :data:`_ADDED_KEY_COLUMNS` it lacks (a
    table from an older release); a race with another process adding it is retried by ``ensure_tables``."""
    table = api_keys_table
    present = {column["name"] for column in sa.inspect(conn).get_columns(table.name)}
    for name in _ADDED_KEY_COLUMNS:
        if name not in present:
            kind = table.c[name].type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))


def _id_order(column: sa.ColumnElement[Any], db: SQLDatabase) -> sa.ColumnElement[Any]:
    """``column`` compared byte by byte, as Python compares strings (PostgreSQL's "C" collation)."""
    return column.collate("C") if db.is_postgresql else column


async def _keyset_page(
    conn: AsyncConnection,
    db: SQLDatabase,
    table: sa.Table,
    filters: Sequence[sa.ColumnElement[bool]],
    query: PageQuery,
) -> tuple[list[sa.RowMapping], bool]:
    """The rows of one page of ``table`` (those matching ``filters``, ordered by ``(created_at, id)``) and whether
    more follow: :func:`~ozwell_asgi.pages.paginate`'s answer, read with at most two indexed queries of at most
    ``query.limit + 1`` rows (a keyset on the cursor's ``(created_at, id)``, so concurrent inserts shift nothing)."""
    t = table
    ident = _id_order(t.c.id, db)
    cursor = query.after if query.after is not None else query.before
    position: sa.ColumnElement[bool] | None = None
    if cursor is None:
        ascending = query.order == "asc"
    else:
        if _has_nul(cursor):
            return [], False
        found = await conn.execute(sa.select(t.c.created_at).where(t.c.id == cursor, *filters))
        created_at = found.scalar_one_or_none()
        if created_at is None:
            return [], False
        # Read away from the cursor: towards newer items when the page follows it in ascending terms.
        ascending = (query.after is not None) == (query.order == "asc")
        here = sa.tuple_(t.c.created_at, ident)
        mark = sa.tuple_(sa.literal(created_at, sa.BigInteger), sa.literal(cursor, sa.Text))
        position = here > mark if ascending else here < mark
    order = (t.c.created_at.asc(), ident.asc()) if ascending else (t.c.created_at.desc(), ident.desc())
    stmt = sa.select(t).where(*filters).order_by(*order).limit(query.limit + 1)
    if position is not None:
        stmt = stmt.where(position)
    rows = list((await conn.execute(stmt)).mappings().all())
    more = len(rows) > query.limit
    del rows[query.limit :]
    if ascending != (query.order == "asc"):
        rows.reverse()
    return rows, more


def _key_row(key: APIKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "key_hash": key.key_hash,
        "owner": key.owner,
        "name": key.name,
        "plan": key.plan,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "models": None if key.models is None else json.dumps(list(key.models)),
        "scopes": json.dumps(list(key.scopes)),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "hint": key.hint,
        "origins": None if key.origins is None else json.dumps(list(key.origins)),
        "endpoints": None if key.endpoints is None else json.dumps(list(key.endpoints)),
    }


def _key_from_row(row: Mapping[Any, Any]) -> APIKey:
    models, origins, endpoints = row["models"], row["origins"], row["endpoints"]
    return APIKey(
        id=row["id"],
        key_hash=row["key_hash"],
        owner=row["owner"],
        name=row["name"],
        plan=row["plan"],
        rpm=row["rpm"],
        tpm=row["tpm"],
        models=None if models is None else tuple(json.loads(models)),
        scopes=tuple(json.loads(row["scopes"])),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        hint=row["hint"],
        origins=None if origins is None else tuple(json.loads(origins)),
        endpoints=None if endpoints is None else tuple(json.loads(endpoints)),
    )


class SQLKeyStore:
    """A :class:`~ozwell_asgi.protocols.KeyStore` in the table ``ozwell_api_keys``; every method is one transaction.

    ``id`` and ``key_hash`` are unique (database constraints); ``list`` is ordered by ``created_at`` then ``id``;
    ``revoke`` and ``rotate`` are single conditional UPDATEs, so concurrent callers in any process agree.
    """

    def __init__(self, db: SQLDatabase | AsyncEngine, *, owns_db: bool = False) -> None:
        self.db = db if isinstance(db, SQLDatabase) else SQLDatabase(db)
        self._owns_db = owns_db
        self._t = api_keys_table

    @classmethod
    def from_url(cls, url: str | URL, **engine_kwargs: Any) -> SQLKeyStore:
        """A store owning a new engine for ``url`` (see :func:`normalize_sql_url`); ``aclose`` disposes of it."""
        return cls(SQLDatabase.from_url(url, **engine_kwargs), owns_db=True)

    async def _select_one(self, conn: AsyncConnection, where: sa.ColumnElement[bool]) -> APIKey | None:
        row = (await conn.execute(sa.select(self._t).where(where))).mappings().first()
        return None if row is None else _key_from_row(row)

    async def create(self, key: APIKey) -> None:
        """Insert ``key``; ``ValueError`` if its id or hash is taken, or if a text field holds a NUL character
        (nothing is written then)."""
        row = _key_row(key)
        if _has_nul(*(v for v in row.values() if isinstance(v, str))):
            raise ValueError("an API key's text fields cannot hold NUL characters in a SQL store")
        with _unavailable():
            await self.db.ensure_tables()
            try:
                async with self.db.engine.begin() as conn:
                    await conn.execute(sa.insert(self._t).values(**row))
            except IntegrityError:
                raise ValueError(f"an API key with id {key.id!r} or with this hash already exists") from None

    async def get_by_hash(self, key_hash: str) -> APIKey | None:
        """The key whose current hash is ``key_hash``, or ``None`` (one indexed SELECT)."""
        if _has_nul(key_hash):
            return None
        with _unavailable():
            await self.db.ensure_tables()
            async with self.db.engine.connect() as conn:
                return await self._select_one(conn, self._t.c.key_hash == key_hash)

    async def get(self, key_id: str) -> APIKey | None:
        """The key with id ``key_id``, or ``None``."""
        if _has_nul(key_id):
            return None
        with _unavailable():
            await self.db.ensure_tables()
            async with self.db.engine.connect() as conn:
                return await self._select_one(conn, self._t.c.id == key_id)

    async def list(self, owner: str | None = None) -> list[APIKey]:
        """Every key (of ``owner``, if given), revoked and expired ones included, by ``created_at`` then ``id``."""
        if _has_nul(owner):
            return []
        query = sa.select(self._t).order_by(self._t.c.created_at, self._t.c.id)
        if owner is not None:
            query = query.where(self._t.c.owner == owner)
        with _unavailable():
            await self.db.ensure_tables()
            async with self.db.engine.connect() as conn:
                rows = (await conn.execute(query)).mappings().all()
        return [_key_from_row(row) for row in rows]

    async def list_page(self, query: PageQuery, owner: str | None = None) -> Page[APIKey]:
        """One page of :meth:`list` (:func:`~ozwell_asgi.pages.paginate`'s answer) in at most two indexed queries."""
        if _has_nul(owner):
            return Page((), False)
        filters = [] if owner is None else [self._t.c.owner == owner]
        with _unavailable():
            await self.db.ensure_tables()
            async with self.db.engine.connect() as conn:
                rows, more = await _keyset_page(conn, self.db, self._t, filters, query)
        return Page(tuple(_key_from_row(row) for row in rows), more)

    async def revoke(self, key_id: str, at: int) -> APIKey | None:
        """Set ``revoked_at`` to ``at`` unless already set (atomic COALESCE; the first time is kept).

        The key as stored afterwards, or ``None`` if there is no such key.
        """
        if _has_nul(key_id):
            return None
        t = self._t
        stmt = sa.update(t).where(t.c.id == key_id).values(revoked_at=sa.func.coalesce(t.c.revoked_at, at))
        with _unavailable():
            await self.db.ensure_tables()
            async with self.db.engine.begin() as conn:
                await conn.execute(stmt)
                return await self._select_one(conn, t.c.id == key_id)

    async def rotate(self, key_id: str, key_hash: str, hint: str) -> APIKey | None:
        """Replace the hash and hint of the key if it is not revoked (one conditional UPDATE).

        The updated key, ``None`` if the key is unknown or revoked; ``ValueError`` if ``key_hash`` is taken or
        ``key_hash``/``hint`` hold a NUL character.
        """
        if _has_nul(key_id):
            return None
        if _has_nul(key_hash, hint):
            raise ValueError("an API key's hash and hint cannot hold NUL characters in a SQL store")
        t = self._t
        stmt = sa.update(t).where(t.c.id == key_id, t.c.revoked_at.is_(None)).values(key_hash=key_hash, hint=hint)
        with _unavailable():
            await self.db.ensure_tables()
            try:
                async with self.db.engine.begin() as conn:
                    result = await conn.execute(stmt)
                    if result.rowcount == 0:
                        return None
                    return await self._select_one(conn, t.c.id == key_id)
            except IntegrityError:
                raise ValueError("an API key with this hash already exists") from None

    async def aclose(self) -> None:
        """Dispose of the engine if this store created it (``from_url``); a shared database is left open."""
        if self._owns_db:
            await self.db.aclose()

    async def ping(self) -> None:
        """Raise unless the database answers (``SQLDatabase.ping``)."""
        await self.db.ping()


# --- files ------------------------------------------------------------------------------------------------------

DEFAULT_CHUNK_SIZE = 256 * 1024
_READ_BATCH_BYTES = 1024 * 1024  # content read per query: a read holds at most this much at once
_CLEANUP_TIMEOUT = 10.0  # seconds a rollback or the removal of a failed upload may take once the caller is gone
_SWEEP_EVERY = 60.0  # seconds between two sweeps started by ``create``
_SWEEP_BATCH = 100  # rows one sweep removes at most

_READY, _PENDING, _DELETING = "ready", "pending", "deleting"


async def _quietly(close: Callable[[], Any], what: str) -> None:
    """Await ``close()`` even in a cancelled task (shielded, at most ``_CLEANUP_TIMEOUT`` s); a failure is logged,
    so it never hides the error being handled."""
    with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
        try:
            await close()
        except Exception as exc:
            log.warning("%s failed: %s", what, type(exc).__name__)


@asynccontextmanager
async def _transaction(
    engine: AsyncEngine,
    errors: Callable[[], AbstractContextManager[None]] = _file_errors,
    what: str = "file store",
) -> AsyncIterator[AsyncConnection]:
    """``engine.begin()`` whose rollback and release also run when the task is cancelled (a client gone mid-upload),
    so a failed transaction never reaches the pool half done. Database errors become the store's (``errors``: the
    file store's by default; 503 for an outage); errors of the body pass through as they are."""
    with errors():
        conn = await engine.connect()
    try:
        with errors():
            transaction = await conn.begin()
        try:
            yield conn
        except BaseException:
            await _quietly(transaction.rollback, f"rolling back a {what} transaction")
            raise
        with errors():
            await transaction.commit()
    finally:
        await _quietly(conn.close, f"releasing a {what} connection")


def _abandoned() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "The upload made no progress for too long and was abandoned. Please retry.", code="upload_abandoned"
    )


def _file_row(file: StoredFile, *, state: str, chunk_size: int, touched_at: int) -> dict[str, Any]:
    return {
        "id": file.id,
        "owner": file.owner,
        "filename": file.filename,
        "purpose": file.purpose,
        "bytes": 0,
        "created_at": file.created_at,
        "expires_at": file.expires_at,
        "content_type": file.content_type,
        "chunk_size": chunk_size,
        "state": state,
        "touched_at": touched_at,
    }


def _late_fields(file: StoredFile) -> dict[str, Any]:
    """The fields a caller may still set while the content streams in (FileStore.create keeps the file as it stands
    when its content ends): written again when the upload is published."""
    if _has_nul(file.filename, file.purpose, file.content_type):
        raise ValueError("a file's filename, purpose and content type cannot hold NUL characters")
    return {
        "filename": file.filename,
        "purpose": file.purpose,
        "expires_at": file.expires_at,
        "content_type": file.content_type,
    }


def _file_from_row(row: Mapping[Any, Any]) -> StoredFile:
    return StoredFile(
        id=row["id"],
        owner=row["owner"],
        filename=row["filename"],
        purpose=row["purpose"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        content_type=row["content_type"],
    )


class SQLFileStore:
    """A :class:`~ozwell_asgi.protocols.FileStore` in ``ozwell_files`` (metadata) and ``ozwell_file_chunks``
    (content in rows of ``chunk_size`` bytes), or with its content in ``content``.

    Guarantees: owner-scoped (another owner's id is an unknown id); content is never held whole: ``create`` holds
    at most one chunk (plus the piece being received) and a read at most ~1 MiB of chunks at once; ``list`` is
    ordered by ``(created_at, id)`` and reads one keyset page (two indexed queries), so pages stay stable under
    concurrent creates; ``create`` is all or nothing:

    - PostgreSQL, content in chunks: the metadata and every chunk are written in one transaction as the content
      streams in; a failure, a cancelled task or a crash rolls it all back. Each upload in flight holds one pooled
      connection: size the pool (``pool_size`` + ``max_overflow``) above the uploads you admit at once.
    - SQLite (one writer at a time: a transaction as long as an upload would stop every other write for as long as
      the client takes), and any database with a ``content`` store: the id is claimed by a ``pending`` row that no
      read sees; the chunks (each in its own short transaction) or the content store's bytes follow; one UPDATE
      publishes the row. A failure or cancellation removes the row and the bytes at once; what a crash leaves is
      removed by :meth:`sweep` once it has made no progress for ``stale_after`` seconds (uploads in progress renew
      it as they go).

    ``delete`` hides the row first, then removes chunks (same transaction) or the content store's bytes (then the
    row); a crash in between is finished by :meth:`sweep`. A file deleted while it is being read makes the read
    raise ``FileNotFoundError`` rather than end early.
    """

    def __init__(
        self,
        db: SQLDatabase | AsyncEngine,
        *,
        content: ContentStore | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        stale_after: float = 3600.0,
        clock: Callable[[], float] = time.time,
        owns_db: bool = False,
    ) -> None:
        if not 1 <= chunk_size <= 64 * 1024 * 1024:
            raise ValueError("chunk_size must be between 1 byte and 64 MiB")
        if stale_after <= 0:
            raise ValueError("stale_after must be > 0")
        self.db = db if isinstance(db, SQLDatabase) else SQLDatabase(db)
        self.content = content
        self.chunk_size = chunk_size
        self.stale_after = stale_after
        self.clock = clock
        self._owns_db = owns_db
        self._t = files_table
        self._c = file_chunks_table
        self._next_sweep = 0.0

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        content: ContentStore | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> SQLFileStore:
        """A store owning a new engine for ``url`` (see :func:`normalize_sql_url`); ``aclose`` disposes of it."""
        return cls(SQLDatabase.from_url(url, **(engine_kwargs or {})), content=content, owns_db=True, **options)

    def _now(self) -> int:
        return int(self.clock())

    # -- create ---------------------------------------------------------------------------------------------------

    async def create(self, file: StoredFile, content: AsyncIterable[bytes]) -> StoredFile:
        """Store ``file`` and its ``content``, all or nothing; ``ValueError`` if the id is taken (or a text field
        holds a NUL character), and then nothing is written. What ``content`` raises is raised as it is."""
        if _has_nul(file.id, file.owner, file.filename, file.purpose, file.content_type):
            raise ValueError("a file's id, owner, filename, purpose and content type cannot hold NUL characters")
        with _file_errors():
            await self.db.ensure_tables()
        await self._sweep_if_due()
        if self.content is None and self.db.is_postgresql:
            size = await self._create_in_one_transaction(file, content)
        else:
            size = await self._create_staged(file, content)
        return dataclasses.replace(file, bytes=size)

    async def _claim(self, conn: AsyncConnection, row: Mapping[str, Any]) -> None:
        """Insert the file's row; ``ValueError`` if its id is taken."""
        with _file_errors():
            try:
                await conn.execute(sa.insert(self._t).values(**row))
            except IntegrityError:
                raise ValueError(f"a file with id {row['id']!r} already exists") from None

    async def _create_in_one_transaction(self, file: StoredFile, content: AsyncIterable[bytes]) -> int:
        row = _file_row(file, state=_READY, chunk_size=self.chunk_size, touched_at=self._now())
        async with _transaction(self.db.engine) as conn:
            await self._claim(conn, row)

            async def write(seq: int, data: bytes) -> None:
                with _file_errors():
                    await conn.execute(sa.insert(self._c).values(file_id=file.id, seq=seq, data=data))

            size = await self._write_chunks(content, write)
            with _file_errors():
                final = sa.update(self._t).where(self._t.c.id == file.id)
                await conn.execute(final.values(bytes=size, **_late_fields(file)))
        return size

    async def _create_staged(self, file: StoredFile, content: AsyncIterable[bytes]) -> int:
        chunk_size = 0 if self.content is not None else self.chunk_size
        row = _file_row(file, state=_PENDING, chunk_size=chunk_size, touched_at=self._now())
        async with _transaction(self.db.engine) as conn:
            await self._claim(conn, row)
        try:
            if self.content is not None:
                size = await self.content.put(file.id, self._renewing(file.id, content))
            else:
                alive = sa.update(self._t).where(self._t.c.id == file.id, self._t.c.state == _PENDING)

                async def write(seq: int, data: bytes) -> None:
                    # The claim is renewed with each chunk, in its transaction: a chunk is never written for a row
                    # the sweep has taken away.
                    async with _transaction(self.db.engine) as conn:
                        with _file_errors():
                            renewed = await conn.execute(alive.values(touched_at=self._now()))
                            if renewed.rowcount != 1:
                                raise _abandoned()
                            await conn.execute(sa.insert(self._c).values(file_id=file.id, seq=seq, data=data))

                size = await self._write_chunks(content, write)
            async with _transaction(self.db.engine) as conn:
                published = sa.update(self._t).where(self._t.c.id == file.id, self._t.c.state == _PENDING)
                with _file_errors():
                    result = await conn.execute(
                        published.values(state=_READY, bytes=size, touched_at=self._now(), **_late_fields(file))
                    )
                if result.rowcount != 1:
                    raise _abandoned()
        except BaseException:
            await _quietly(lambda: self._remove(file.id, (_PENDING,)), "removing a failed upload")
            raise
        return size

    async def _write_chunks(self, content: AsyncIterable[bytes], write: Callable[[int, bytes], Any]) -> int:
        """Cut ``content`` into rows of ``chunk_size`` bytes, each written by ``write(seq, data)`` as it fills; the
        number of bytes. Holds at most one chunk plus the piece being received."""
        size = 0
        seq = 0
        chunk_size = self.chunk_size
        pending = bytearray()
        async for piece in content:
            if not piece:
                continue
            size += len(piece)
            pending += piece
            while len(pending) >= chunk_size:
                with memoryview(pending) as view:
                    data = bytes(view[:chunk_size])
                del pending[:chunk_size]
                await write(seq, data)
                seq += 1
        if pending:
            await write(seq, bytes(pending))
        return size

    def _renewal(self, file_id: str) -> Callable[[], Any]:
        """A coroutine function that marks the pending row ``file_id`` as alive, at most every ``stale_after / 4``
        seconds; it raises if the row was swept meanwhile."""
        due = self.clock() + self.stale_after / 4

        async def renew() -> None:
            nonlocal due
            if self.clock() < due:
                return
            due = self.clock() + self.stale_after / 4
            async with _transaction(self.db.engine) as conn:
                alive = sa.update(self._t).where(self._t.c.id == file_id, self._t.c.state == _PENDING)
                with _file_errors():
                    result = await conn.execute(alive.values(touched_at=self._now()))
            if result.rowcount != 1:
                raise _abandoned()

        return renew

    async def _renewing(self, file_id: str, content: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        renew = self._renewal(file_id)
        async for piece in content:
            await renew()
            yield piece

    async def _remove(self, file_id: str, states: Sequence[str]) -> bool:
        """Remove the row ``file_id`` if its state is one of ``states``, with its chunks (one transaction) and then
        its content store bytes; whether it was there. A row in another state (an upload published after all) keeps
        everything."""
        async with _transaction(self.db.engine) as conn:
            with _file_errors():
                result = await conn.execute(
                    sa.delete(self._t).where(self._t.c.id == file_id, self._t.c.state.in_(states))
                )
                if result.rowcount:
                    await conn.execute(sa.delete(self._c).where(self._c.c.file_id == file_id))
        if result.rowcount and self.content is not None:
            await self.content.delete(file_id)
        return bool(result.rowcount)

    # -- sweeping what a crash left -----------------------------------------------------------------------------

    async def _sweep_if_due(self) -> None:
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY
        try:
            await self.sweep()
        except Exception as exc:  # the upload itself still goes ahead (or fails on its own)
            log.warning("sweeping abandoned uploads failed: %s", type(exc).__name__)

    async def sweep(self) -> int:
        """Remove what crashed uploads and deletions left: rows not ``ready`` untouched for ``stale_after``
        seconds, with their chunks and content store bytes (at most 100 per call); how many were removed.
        ``create`` calls it at most once a minute."""
        threshold = self._now() - self.stale_after
        t = self._t
        stale = sa.select(t.c.id).where(t.c.state != _READY, t.c.touched_at < threshold).limit(_SWEEP_BATCH)
        with _file_errors():
            await self.db.ensure_tables()
            async with self.db.engine.connect() as conn:
                ids = list((await conn.execute(stale)).scalars().all())
        removed = 0
        for file_id in ids:
            async with _transaction(self.db.engine) as conn:
                claim = sa.delete(t).where(t.c.id == file_id, t.c.state != _READY, t.c.touched_at < threshold)
                with _file_errors():
                    result = await conn.execute(claim)
                    if result.rowcount:
                        await conn.execute(sa.delete(self._c).where(self._c.c.file_id == file_id))
            if result.rowcount:
                removed += 1
                if self.content is not None:
                    await self.content.delete(file_id)
        return removed

    # -- reads ----------------------------------------------------------------------------------------------------

    async def _ready_row(self, owner: str, file_id: str) -> Mapping[Any, Any] | None:
        if _has_nul(owner, file_id):
            return None
        t = self._t
        with _file_errors():
            await self.db.ensure_tables()
            async with self.db.engine.connect() as conn:
                found = await conn.execute(
                    sa.select(t).where(t.c.id == file_id, t.c.owner == owner, t.c.state == _READY)
                )
                return found.mappings().first()

    async def get(self, owner: str, file_id: str) -> StoredFile | None:
        """The file ``file_id`` of ``owner``, or ``None`` (one indexed SELECT)."""
        row = await self._ready_row(owner, file_id)
        return None if row is None else _file_from_row(row)

    async def list(self, owner: str, query: PageQuery, purpose: str | None = None) -> Page[StoredFile]:
        """One page of ``owner``'s files (of ``purpose``, if given): :func:`~ozwell_asgi.pages.paginate`'s answer."""
        if _has_nul(owner, purpose):
            return Page((), False)
        t = self._t
        filters = [t.c.owner == owner, t.c.state == _READY]
        if purpose is not None:
            filters.append(t.c.purpose == purpose)
        with _file_errors():
            await self.db.ensure_tables()
            async with self.db.engine.connect() as conn:
                rows, more = await _keyset_page(conn, self.db, t, filters, query)
        return Page(tuple(_file_from_row(row) for row in rows), more)

    async def open(
        self, owner: str, file_id: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes] | None:
        """The bytes ``[start, end)`` of ``owner``'s file, read as they are sent (at most ~1 MiB per query), or
        ``None`` if there is no such file."""
        row = await self._ready_row(owner, file_id)
        if row is None:
            return None
        size = row["bytes"]
        start = min(max(start, 0), size)
        end = size if end is None else min(max(end, start), size)
        if row["chunk_size"] == 0:
            if self.content is None:
                raise RuntimeError(f"the content of file {file_id!r} is in a content store this file store lacks")
            return self.content.get(file_id, start, end)
        return self._read_chunks(file_id, row["chunk_size"], start, end)

    async def _read_chunks(self, file_id: str, chunk_size: int, start: int, end: int) -> AsyncIterator[bytes]:
        if start >= end:
            return
        c = self._c
        first, last = start // chunk_size, (end - 1) // chunk_size
        batch = max(1, _READ_BATCH_BYTES // chunk_size)
        for low in range(first, last + 1, batch):
            high = min(low + batch - 1, last)
            stmt = (
                sa.select(c.c.seq, c.c.data)
                .where(c.c.file_id == file_id, c.c.seq >= low, c.c.seq <= high)
                .order_by(c.c.seq)
            )
            with _file_errors():
                async with self.db.engine.connect() as conn:
                    rows = (await conn.execute(stmt)).all()
            if [row[0] for row in rows] != list(range(low, high + 1)):
                raise FileNotFoundError(f"the file {file_id!r} was deleted while it was read")
            for seq, data in rows:
                offset = seq * chunk_size
                lo, hi = max(start - offset, 0), min(end - offset, len(data))
                yield data if lo == 0 and hi == len(data) else data[lo:hi]
            del rows

    # -- delete ---------------------------------------------------------------------------------------------------

    async def delete(self, owner: str, file_id: str) -> bool:
        """Remove ``owner``'s file and its content; ``False`` if there was no such file. Of concurrent deletes of
        one file, exactly one returns ``True``."""
        if _has_nul(owner, file_id):
            return False
        t = self._t
        mine = sa.and_(t.c.id == file_id, t.c.owner == owner, t.c.state == _READY)
        with _file_errors():
            await self.db.ensure_tables()
        async with _transaction(self.db.engine) as conn:
            with _file_errors():
                # Writes only, no read first: a SQLite transaction that read before writing cannot wait for the
                # write lock (it would fail at once when another writer got in between).
                removed = await conn.execute(sa.delete(t).where(mine, t.c.chunk_size > 0))
                if removed.rowcount:
                    await conn.execute(sa.delete(self._c).where(self._c.c.file_id == file_id))
                    return True
                # Content elsewhere: hide the row (sweepable at once), then remove the bytes, then the row.
                hidden = await conn.execute(
                    sa.update(t).where(mine, t.c.chunk_size == 0).values(state=_DELETING, touched_at=0)
                )
        if not hidden.rowcount:
            return False
        if self.content is not None:
            await self.content.delete(file_id)
            async with _transaction(self.db.engine) as conn:
                with _file_errors():
                    await conn.execute(sa.delete(t).where(t.c.id == file_id, t.c.state == _DELETING))
        return True

    async def aclose(self) -> None:
        """Dispose of the engine if this store created it (``from_url``); a shared database is left open."""
        if self._owns_db:
            await self.db.aclose()

    async def ping(self) -> None:
        """Raise unless the database answers (``SQLDatabase.ping``), and the content store, if it has ``ping``."""
        await self.db.ping()
        ping = getattr(self.content, "ping", None)
        if ping is not None:
            await ping()


# --- responses --------------------------------------------------------------------------------------------------


def _response_head(row: Mapping[Any, Any]) -> StoredResponse:
    return StoredResponse(
        id=row["id"],
        owner=row["owner"],
        created_at=row["created_at"],
        status=row["status"],
        response={},
        conversation_id=row["conversation_id"],
        key_id=row["key_id"],
    )


def _response_from_row(row: Mapping[Any, Any]) -> StoredResponse:
    return load_parts(_response_head(row), row["data"])


class SQLResponseStore:
    """A :class:`~ozwell_asgi.protocols.ResponseStore` in the table ``ozwell_responses``; every method is one
    statement, hence atomic for every process sharing the database. Records never expire here: they stay until
    deleted.

    ``put`` is one upsert (``INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE owner = excluded.owner``): it stores
    a new record or replaces the record of the same id and owner whole; an id another owner holds is a
    ``ValueError`` and changes nothing. ``last_in_conversation`` reads one row of the index on ``(owner,
    conversation_id, created_at, id)``, ids compared byte by byte (PostgreSQL's "C" collation). Text a record's
    ids, owner or status cannot hold in PostgreSQL (a NUL character) is refused by ``put`` with ``ValueError`` and
    finds nothing in a lookup; inside the JSON parts it is escaped and kept. Outages are a 503 ("The response
    store is unavailable"); no statement parameter reaches a message or a log.
    """

    def __init__(self, db: SQLDatabase | AsyncEngine, *, owns_db: bool = False) -> None:
        self.db = db if isinstance(db, SQLDatabase) else SQLDatabase(db)
        if self.db.engine.dialect.name not in ("postgresql", "sqlite"):
            raise ValueError(f"the SQL response store needs PostgreSQL or SQLite, not {self.db.engine.dialect.name}")
        self._owns_db = owns_db
        self._t = responses_table

    @classmethod
    def from_url(cls, url: str | URL, **engine_kwargs: Any) -> SQLResponseStore:
        """A store owning a new engine for ``url`` (see :func:`normalize_sql_url`); ``aclose`` disposes of it."""
        return cls(SQLDatabase.from_url(url, **engine_kwargs), owns_db=True)

    def _upsert(self, row: Mapping[str, Any]) -> sa.Executable:
        t = self._t
        insert = pg_dialect.insert if self.db.is_postgresql else sqlite_dialect.insert
        stmt = insert(t).values(**row)
        replaced = {name: stmt.excluded[name] for name in row if name != "id"}
        return stmt.on_conflict_do_update(
            index_elements=[t.c.id], set_=replaced, where=t.c.owner == stmt.excluded.owner
        )

    async def put(self, record: StoredResponse) -> None:
        """Store ``record`` or replace the record of the same id and owner (one upsert); ``ValueError`` (nothing
        written) if another owner holds the id, a text field holds a NUL character or the parts are not
        JSON-ready."""
        if _has_nul(record.id, record.owner, record.conversation_id, record.status, record.key_id):
            raise ValueError("a stored response's ids, owner and status cannot hold NUL characters in a SQL store")
        row = {
            "id": record.id,
            "owner": record.owner,
            "conversation_id": record.conversation_id,
            "created_at": record.created_at,
            "status": record.status,
            "key_id": record.key_id,
            "data": dump_parts(record),
        }
        with _response_errors():
            await self.db.ensure_tables()
            async with self.db.engine.begin() as conn:
                result = await conn.execute(self._upsert(row))
        if result.rowcount != 1:
            raise ValueError(f"a response with id {record.id!r} belongs to another owner")

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """``owner``'s record ``response_id``, or ``None`` (one SELECT by primary key)."""
        if _has_nul(owner, response_id):
            return None
        t = self._t
        with _response_errors():
            await self.db.ensure_tables()
            async with self.db.engine.connect() as conn:
                found = await conn.execute(sa.select(t).where(t.c.id == response_id, t.c.owner == owner))
                row = found.mappings().first()
        return None if row is None else _response_from_row(row)

    async def delete(self, owner: str, response_id: str) -> bool:
        """Remove ``owner``'s record; ``False`` if there was none. Of concurrent deletes, exactly one is ``True``."""
        if _has_nul(owner, response_id):
            return False
        t = self._t
        with _response_errors():
            await self.db.ensure_tables()
            async with self.db.engine.begin() as conn:
                result = await conn.execute(sa.delete(t).where(t.c.id == response_id, t.c.owner == owner))
        return bool(result.rowcount)

    async def last_in_conversation(self, owner: str, conversation_id: str) -> StoredResponse | None:
        """The newest record (by ``created_at``, then ``id``) of ``owner``'s conversation, or ``None``."""
        if _has_nul(owner, conversation_id):
            return None
        t = self._t
        newest = (
            sa.select(t)
            .where(t.c.owner == owner, t.c.conversation_id == conversation_id)
            .order_by(t.c.created_at.desc(), _id_order(t.c.id, self.db).desc())
            .limit(1)
        )
        with _response_errors():
            await self.db.ensure_tables()
            async with self.db.engine.connect() as conn:
                row = (await conn.execute(newest)).mappings().first()
        return None if row is None else _response_from_row(row)

    async def aclose(self) -> None:
        """Dispose of the engine if this store created it (``from_url``); a shared database is left open."""
        if self._owns_db:
            await self.db.aclose()
