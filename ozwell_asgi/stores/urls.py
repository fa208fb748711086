"""Pick a bundled store from a URL (configuration, the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

from ..protocols import KeyStore

__all__ = ["KEY_STORE_URL_FORMS", "create_private_sqlite_file", "key_store_from_url"]

KEY_STORE_URL_FORMS = (
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

_SQL_SCHEMES = frozenset({"sqlite", "sqlite+aiosqlite", "postgres", "postgresql", "postgresql+asyncpg"})
_REDIS_SCHEMES = frozenset({"redis", "rediss"})
_SQLITE_SCHEMES = frozenset({"sqlite", "sqlite+aiosqlite"})


def create_private_sqlite_file(url: str) -> Path | None:
    """Create the SQLite database file ``url`` names, empty and with mode 0600, if it does not exist yet.

    Returns the path when this call created it, else ``None`` (another kind of store, ``:memory:``, a ``file:``
    URI, an existing file, or a directory that does not exist: the store reports that when it connects). SQLite
    gives the ``-wal`` and ``-shm`` files it makes beside a database the database file's own mode, so the key
    hashes in all three stay readable by their owner alone, whatever the umask.
    """
    scheme, sep, _ = url.strip().partition("://")
    if not sep or scheme.lower() not in _SQLITE_SCHEMES:
        return None
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url.strip())
    except Exception:  # a malformed URL: opening the store reports it, without echoing the URL
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or parsed.query.get("mode"):
        return None
    path = Path(database)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # it exists (kept as it is), or its directory does not
        return None
    os.close(fd)
    return path


def key_store_from_url(url: str, *, redis_prefix: str = "ozwell:") -> KeyStore:
    """A new key store for ``url`` (it owns its engine or client: call ``aclose`` when done).

    ``memory://`` is process-local; ``sqlite``/``postgres`` URLs give a :class:`SQLKeyStore`; ``redis``/``rediss``
    a :class:`RedisKeyStore` under ``redis_prefix``. ``ValueError`` for any other form. Nothing connects yet:
    tables and connections are made on first use.
    """
    scheme, sep, _ = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep:
        scheme = ""
    if scheme == "memory":
        from .memory import MemoryKeyStore

        return MemoryKeyStore()
    if scheme in _SQL_SCHEMES:
        from .sql import SQLKeyStore

        return SQLKeyStore.from_url(url.strip())
    if scheme in _REDIS_SCHEMES:
        from .redis import RedisKeyStore

        return RedisKeyStore.from_url(url.strip(), prefix=redis_prefix)
    shown = f"scheme {scheme!r}" if scheme else "a URL without a scheme"  # never echo the URL: it may hold a password
    raise ValueError(f"unsupported key store URL ({shown}); accepted forms: {', '.join(KEY_STORE_URL_FORMS)}")
