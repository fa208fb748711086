"""Storage by URL: one connection (engine, pool, client) per storage URL, shared by every store kind on it.

:func:`open_storage` picks the storage for a URL's scheme from a registry (as ``limits``' ``storage_from_string``
does); the object it returns makes the stores: ``.key_store()``, ``.file_store(content=None)``,
``.response_store()``. So
``sqlite:///ozwell.db`` for keys and files is one engine, and ``postgresql://…`` one pool per process.
:class:`Storages` keeps one storage per URL for an app (``OzwellAPI`` and ``serve`` use it) and closes each once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..protocols import ContentStore, FileStore, KeyStore, ResponseStore

__all__ = [
    "KEY_STORE_URL_FORMS",
    "STORAGE_URL_FORMS",
    "Storage",
    "StorageOptions",
    "Storages",
    "create_private_sqlite_file",
    "sqlite_path",
    "key_store_from_url",
    "missing_driver",
    "open_storage",
    "register_storage",
]

STORAGE_URL_FORMS = (
    "memory://",
    "sqlite:///relative/path.db",
    "sqlite:////absolute/path.db",
    "sqlite:///:memory:",
    "sqlite+aiosqlite:///...",
    "postgresql://user:password@host:port/db",
    "postgres://...",
    "postgresql+asyncpg://...",
    "redis://host:port/db",
    "rediss://host:port/db",
)
KEY_STORE_URL_FORMS = STORAGE_URL_FORMS

_SQL_SCHEMES = frozenset({"sqlite", "sqlite+aiosqlite", "postgres", "postgresql", "postgresql+asyncpg"})
_REDIS_SCHEMES = frozenset({"redis", "rediss"})
_SQLITE_SCHEMES = frozenset({"sqlite", "sqlite+aiosqlite"})


def sqlite_path(url: str) -> Path | None:
    """The database file a SQLite URL names, or ``None`` (another kind of store, ``:memory:``, a ``file:`` URI, or
    a malformed URL: opening the store reports that, without echoing the URL)."""
    scheme, sep, _ = url.strip().partition("://")
    if not sep or scheme.lower() not in _SQLITE_SCHEMES:
        return None
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url.strip())
    except Exception:
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or parsed.query.get("mode"):
        return None
    return Path(database)


def create_private_sqlite_file(url: str) -> Path | None:
    """Create the SQLite database file ``url`` names, empty and with mode 0600, if it does not exist yet.

    Returns the path when this call created it, else ``None`` (another kind of store, ``:memory:``, a ``file:``
    URI, an existing file, or a directory that does not exist: the store reports that when it connects). SQLite
    gives the ``-wal`` and ``-shm`` files it makes beside a database the database file's own mode, so the key
    hashes in all three stay readable by their owner alone, whatever the umask.
    """
    path = sqlite_path(url)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # it exists (kept as it is), or its directory does not
        return None
    os.close(fd)
    return path


@runtime_checkable
class Storage(Protocol):
    """One storage (a database, a Redis server, this process's memory) and the stores on it, which share its
    connections. Stores it makes do not own it: :meth:`aclose` closes the storage, once, for all of them."""

    def key_store(self) -> KeyStore: ...

    def file_store(self, content: ContentStore | None = None) -> FileStore:
        """File metadata here, content here too (``None``) or in ``content``."""
        ...

    def response_store(self) -> ResponseStore:
        """Stored responses of /responses, with the storage's bounds (memory: a size cap; Redis: a TTL)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StorageOptions:
    """Settings of the bundled storages that a URL does not carry.

    ``redis_prefix``: the prefix of every Redis key the stores write (keys and files alike).
    ``redis_max_file_bytes``: the largest file whose content a Redis file store keeps (413 past it).
    ``redis_response_ttl``: seconds a Redis response store keeps a response after its last write (30 days).
    """

    redis_prefix: str = "ozwell:"
    redis_max_file_bytes: int = 64 * 1024 * 1024
    redis_response_ttl: float = 30 * 24 * 3600.0


StorageFactory = Callable[[str, StorageOptions], Storage]

_REGISTRY: dict[str, StorageFactory] = {}


def register_storage(scheme: str, factory: StorageFactory) -> None:
    """Make :func:`open_storage` open URLs of ``scheme`` (case-insensitive) with ``factory(url, options)``; a host's
    own scheme, or a replacement for a bundled one."""
    _REGISTRY[scheme.lower()] = factory


def _memory(url: str, options: StorageOptions) -> Storage:
    from .memory import MemoryStorage

    return MemoryStorage()


def _sql(url: str, options: StorageOptions) -> Storage:
    from .sql import SQLDatabase

    return SQLDatabase.from_url(url)


def _redis(url: str, options: StorageOptions) -> Storage:
    from .redis import RedisStorage

    return RedisStorage.from_url(
        url,
        prefix=options.redis_prefix,
        max_file_bytes=options.redis_max_file_bytes,
        response_ttl=options.redis_response_ttl,
    )


register_storage("memory", _memory)
for _scheme in _SQL_SCHEMES:
    register_storage(_scheme, _sql)
for _scheme in _REDIS_SCHEMES:
    register_storage(_scheme, _redis)


# The optional drivers, by top-level module: the extra of ozwell-asgi that installs each.
DRIVER_EXTRAS = {"asyncpg": "postgres", "redis": "redis", "obstore": "s3"}


def missing_driver(exc: ImportError, what: str) -> ImportError:
    """``exc`` (an optional driver that is not installed) as an ``ImportError`` whose message says which extra to
    install; ``exc`` itself when the missing module is not one of :data:`DRIVER_EXTRAS`. ``what`` names what needed
    it ("the postgresql storage")."""
    cause: BaseException | None = exc
    while cause is not None:
        name = getattr(cause, "name", None) or ""
        module = name.split(".")[0]
        extra = DRIVER_EXTRAS.get(module)
        if extra is not None:
            return ImportError(
                f"{what} needs {module}, which is not installed: install ozwell-asgi[{extra}] "
                f'(pip install -e ".[{extra}]" in a checkout, or pip install {module})',
                name=name,
            )
        cause = cause.__cause__
    return exc


def _scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else ""


def _unsupported(scheme: str, what: str) -> ValueError:
    shown = f"scheme {scheme!r}" if scheme else "a URL without a scheme"  # never echo the URL: it may hold a password
    forms = ", ".join(STORAGE_URL_FORMS)
    return ValueError(f"unsupported {what} URL ({shown}); accepted forms: {forms}")


def open_storage(url: str, options: StorageOptions | None = None) -> Storage:
    """A new storage for ``url`` (``ValueError`` for an unknown scheme). Nothing connects yet: connections and
    tables are made on first use. Call ``aclose`` when done."""
    url = url.strip()
    scheme = _scheme_of(url)
    factory = _REGISTRY.get(scheme)
    if factory is None:
        raise _unsupported(scheme, "storage")
    try:
        return factory(url, options or StorageOptions())
    except ImportError as exc:
        error = missing_driver(exc, f"the {scheme} storage")
        if error is exc:
            raise
        raise error from exc


class Storages:
    """One storage per URL, opened on first use: what an app holds, so keys and files on one URL share one engine
    or client. URLs are compared as given (surrounding spaces aside). :meth:`aclose` closes each storage once."""

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self._open: dict[str, Storage] = {}

    def open(self, url: str) -> Storage:
        """The storage for ``url``: the one already open, or a new one (``ValueError`` for an unknown scheme)."""
        url = url.strip()
        storage = self._open.get(url)
        if storage is None:
            storage = self._open[url] = open_storage(url, self.options)
        return storage

    def key_store(self, url: str) -> KeyStore:
        return self.open(url).key_store()

    def file_store(self, url: str, content: ContentStore | None = None) -> FileStore:
        """The file store on ``url``, its content there too or in ``content``."""
        return self.open(url).file_store(content)

    def response_store(self, url: str) -> ResponseStore:
        """The response store on ``url`` (``ValueError`` if that storage keeps no responses: a host's storage
        registered before :class:`Storage` had ``response_store``)."""
        storage = self.open(url)
        make = getattr(storage, "response_store", None)
        if make is None:
            raise ValueError(f"the {_scheme_of(url.strip()) or 'given'} storage keeps no responses")
        store: ResponseStore = make()
        return store

    def __len__(self) -> int:
        return len(self._open)

    async def aclose(self) -> None:
        """Close every storage opened here, once; later calls do nothing."""
        opened, self._open = list(self._open.values()), {}
        for storage in reversed(opened):
            await storage.aclose()


def key_store_from_url(url: str, *, redis_prefix: str = "ozwell:") -> KeyStore:
    """A new key store for ``url`` that owns its engine or client (call ``aclose`` when done): for one-off use,
    such as a CLI command. An app sharing one storage between stores uses :class:`Storages` instead.

    ``memory://`` is process-local; ``sqlite``/``postgres`` URLs give a :class:`SQLKeyStore`; ``redis``/``rediss``
    a :class:`RedisKeyStore` under ``redis_prefix``. ``ValueError`` for any other form. Nothing connects yet:
    tables and connections are made on first use.
    """
    url = url.strip()
    scheme = _scheme_of(url)
    try:
        if scheme == "memory":
            from .memory import MemoryKeyStore

            return MemoryKeyStore()
        if scheme in _SQL_SCHEMES:
            from .sql import SQLKeyStore

            return SQLKeyStore.from_url(url)
        if scheme in _REDIS_SCHEMES:
            from .redis import RedisKeyStore

            return RedisKeyStore.from_url(url, prefix=redis_prefix)
    except ImportError as exc:
        error = missing_driver(exc, f"the {scheme} key store")
        if error is exc:
            raise
        raise error from exc
    raise _unsupported(scheme, "key store")
