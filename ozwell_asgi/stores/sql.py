"""SQL stores on SQLAlchemy 2 (async Core): SQLite through aiosqlite, PostgreSQL through asyncpg.

One :class:`SQLDatabase` (engine + the shared :data:`metadata` + a lazy, idempotent ``create_all``) can back every
SQL store of a host, so they share one pool. Tables are created on first use, so the stores work when nobody runs
a lifespan; on SQLite, WAL and a busy timeout let a CLI and a running server write the same file.

No key hash reaches a log or an exception message: engines made here hide statement parameters
(``hide_parameters=True``), a failed statement is re-raised without SQLAlchemy's text (which lists the
parameters) whatever the engine, and aiosqlite's DEBUG lines name each operation without its arguments.

Text holding a NUL character, which PostgreSQL cannot store, is never sent: no key has it, so a lookup by it
finds nothing and a key carrying it is refused with ``ValueError``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, ProgrammingError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from ..types import APIKey
from .outage import unavailable_on

__all__ = ["SQLDatabase", "SQLKeyStore", "api_keys_table", "metadata", "normalize_sql_url"]

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


_unavailable_on_outage = functools.partial(unavailable_on, OperationalError, InterfaceError, OSError)


class KeyStoreStatementError(RuntimeError):
    """A statement of the SQL key store failed; the message names the database's error, never the parameters."""


@contextmanager
def _unavailable() -> Iterator[None]:
    """Outages become the 503 (:func:`unavailable_on`); any other failed statement a
    :class:`KeyStoreStatementError` without SQLAlchemy's text, whose ``[parameters: ...]`` holds key hashes."""
    try:
        with _unavailable_on_outage():
            yield
    except StatementError as exc:
        orig = exc.orig
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        detail = type(orig).__name__ + (f", SQLSTATE {code}" if code else "")
        raise KeyStoreStatementError(f"the SQL key store's statement failed ({detail})") from None


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
                    break
                except (IntegrityError, ProgrammingError, OperationalError):
                    # Another process created the same table (or type) between our check and our CREATE; the
                    # next pass sees it. Anything else fails again and is raised on the last attempt.
                    if attempt == 4:
                        raise
                    await anyio.sleep(0.05 * (attempt + 1))
            self._ready = True

    async def aclose(self) -> None:
        """Dispose of the engine's pool if this instance created the engine; otherwise do nothing."""
        if self.owns_engine:
            await self.engine.dispose()


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
    }


def _key_from_row(row: Mapping[Any, Any]) -> APIKey:
    models = row["models"]
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
