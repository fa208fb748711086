"""Pick a bundled store from a URL (configuration, the CLI)."""

from __future__ import annotations

from ..protocols import KeyStore

__all__ = ["KEY_STORE_URL_FORMS", "key_store_from_url"]

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
