"""The key store as the commands use it: opened from a URL (never echoed: it may hold a password), used on an event
loop of its own with a time bound, and closed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from ..errors import InvalidRequestError, OzwellError
from ..protocols import KeyStore
from ..stores.urls import create_private_sqlite_file, key_store_from_url
from .errors import CLIError, first_line, usage_error

__all__ = ["STORE_TIMEOUT_SECONDS", "aclose_quietly", "check_store", "open_store", "run_with_store"]

STORE_TIMEOUT_SECONDS = 15.0

T = TypeVar("T")


def open_store(url: str) -> KeyStore:
    """The key store ``url`` names (nothing connects yet); exit status 2 when it names none."""
    try:
        return key_store_from_url(url)
    except ValueError as exc:
        raise usage_error(str(exc)) from exc
    except ImportError as exc:  # a driver that is not installed: the message names the extra to install
        raise CLIError(f"--store: {first_line(str(exc), 500)}") from exc
    except Exception as exc:  # e.g. SQLAlchemy's ArgumentError for a malformed URL; never echo the URL itself
        raise usage_error(f"invalid key store URL ({type(exc).__name__})") from exc


async def aclose_quietly(resource: object, within: float = 5.0) -> None:
    """Await ``resource.aclose()`` if it has one, for at most ``within`` seconds, shielded from cancellation."""
    close = getattr(resource, "aclose", None)
    if close is not None:
        with anyio.move_on_after(within, shield=True):
            await close()


def _store_failure(exc: BaseException) -> CLIError:
    cause = exc.__cause__ if isinstance(exc, OzwellError) and exc.__cause__ is not None else exc
    detail = first_line(str(cause)) or type(cause).__name__
    return CLIError(f"the key store failed: {type(cause).__name__}: {detail}")


def run_with_store(url: str, work: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Run ``work(store)`` on a new event loop, bounded in time; the store is closed afterwards.

    A SQLite file that does not exist yet is created first, with mode 0600 (see create_private_sqlite_file).
    """
    store = open_store(url)
    create_private_sqlite_file(url)

    async def run() -> T:
        try:
            with anyio.fail_after(STORE_TIMEOUT_SECONDS):
                return await work(store)
        except Exception:
            # aiosqlite finishes a failed connection on its thread and then calls back into this loop: let it, so
            # it does not call into a closed loop (a stray thread traceback) after anyio.run returns.
            await anyio.sleep(0.1)
            raise
        finally:
            await aclose_quietly(store)

    try:
        return anyio.run(run)
    except (CLIError, KeyboardInterrupt):
        raise
    except InvalidRequestError as exc:
        raise usage_error(str(exc)) from exc
    except TimeoutError as exc:
        raise CLIError(f"the key store did not answer within {STORE_TIMEOUT_SECONDS:g} s") from exc
    except Exception as exc:
        raise _store_failure(exc) from exc


def check_store(url: str) -> None:
    """Fail fast, before any worker starts, when the key store is unreachable (this also creates its tables)."""

    async def work(store: KeyStore) -> None:
        await store.get("key_preflight")

    run_with_store(url, work)
