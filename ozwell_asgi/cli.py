"""The ``ozwell-asgi`` command line: ``serve`` the /v1 API with uvicorn, and manage API keys.

    ozwell-asgi serve [--host H] [--port P] [--store URL] [--limiter URL] [--limiter-namespace NS] [--workers N]
                      [--key-cache-ttl SECONDS] [--on-limiter-error closed|open] [--secret-file PATH] [--log-level L]
                      [--no-access-log]
    ozwell-asgi keys create --name NAME [--owner O] [--plan P] [--rpm N] [--tpm N] [--models a,b] [--scopes api,admin]
                            [--expires-in 30d] [--store URL] [--secret-file PATH]
    ozwell-asgi keys list [--owner O] [--json] [--store URL]
    ozwell-asgi keys revoke ID [--store URL]
    ozwell-asgi keys rotate ID [--store URL] [--secret-file PATH]

Settings come from flags, else the environment (``OZWELL_STORE_URL``, ``OZWELL_LIMITER_URL``,
``OZWELL_LIMITER_NAMESPACE``, ``OZWELL_KEY_CACHE_TTL``, ``OZWELL_ON_LIMITER_ERROR``), else the defaults
(``sqlite:///./ozwell.db``, ``memory://``). The key-hashing secret is ``OZWELL_SECRET`` (at least 16 bytes) if set,
else the contents of the secret file (``--secret-file``, ``OZWELL_SECRET_FILE``, default ``./ozwell.secret``), which
``serve`` and ``keys create`` create (32 random bytes, hex, mode 0600) when it does not exist.

Errors are one line on stderr and a non-zero exit status (2 for bad arguments, 1 for failures such as an unknown key
id or an unreachable store); secrets go to stdout only, alone on the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio

from .app import OzwellAPI, PrefixedApp
from .auth import KeyHasher, KeyManager, parse_duration
from .errors import InvalidRequestError, OzwellError
from .protocols import KeyStore
from .ratelimit import DEFAULT_PLANS, LimitsRateLimiter, quota_for
from .stores.urls import key_store_from_url
from .types import DEFAULT_SCOPES, APIKey, Receive, Scope, Send

__all__ = ["ServeConfig", "app_from_env", "build_app", "main", "resolve_secret"]

PROG = "ozwell-asgi"
DEFAULT_STORE_URL = "sqlite:///./ozwell.db"
DEFAULT_LIMITER_URL = "memory://"
DEFAULT_LIMITER_NAMESPACE = "ozwell"
DEFAULT_SECRET_FILE = "./ozwell.secret"
DEFAULT_KEY_CACHE_TTL = 5.0
MIN_SECRET_BYTES = 16
STORE_TIMEOUT_SECONDS = 15.0

ENV_STORE_URL = "OZWELL_STORE_URL"
ENV_LIMITER_URL = "OZWELL_LIMITER_URL"
ENV_LIMITER_NAMESPACE = "OZWELL_LIMITER_NAMESPACE"
ENV_SECRET = "OZWELL_SECRET"
ENV_SECRET_FILE = "OZWELL_SECRET_FILE"
ENV_KEY_CACHE_TTL = "OZWELL_KEY_CACHE_TTL"
ENV_ON_LIMITER_ERROR = "OZWELL_ON_LIMITER_ERROR"

T = TypeVar("T")


class CLIError(Exception):
    """A failure reported as one line on stderr; ``status`` is the exit code (2: bad arguments, 1: failure)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _usage_error(message: str) -> CLIError:
    return CLIError(message, status=2)


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------- secret


def _secret_from_text(text: str, origin: str) -> str:
    secret = text.strip()
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise CLIError(f"{origin} must hold at least {MIN_SECRET_BYTES} bytes")
    return secret


def _read_secret_file(path: Path) -> str:
    # A file another process is publishing right now may be briefly empty on filesystems without hard links.
    deadline = time.monotonic() + 2.0
    while True:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CLIError(f"cannot read the secret file {path}: {exc.strerror or exc}") from exc
        if text.strip() or time.monotonic() > deadline:
            return _secret_from_text(text, f"the secret file {path}")
        time.sleep(0.05)


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_secret_file(path: Path) -> bool:
    """Publish a new random secret at ``path`` unless one exists; True if this call created it.

    The secret is written in full to a private temporary file (``O_CREAT|O_EXCL``, mode 0600) and then hard-linked
    into place, which fails if ``path`` exists: processes starting together all end up with the one file that
    won, and nobody ever reads a half-written secret.
    """
    data = (secrets.token_hex(32) + "\n").encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _write_new_file(tmp, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass  # no hard links here: fall back to an exclusive create of the file itself
        finally:
            tmp.unlink(missing_ok=True)
        _write_new_file(path, data)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise CLIError(f"cannot create the secret file {path}: {exc.strerror or exc}") from exc


def resolve_secret(secret_file: str | None = None, *, create: bool) -> str:
    """The key-hashing secret: ``--secret-file`` if given, else ``OZWELL_SECRET`` if set, else a secret file's.

    The file is ``secret_file``, else ``OZWELL_SECRET_FILE``, else ``./ozwell.secret``. When it does not exist and
    ``create`` is true, a new one is made (32 random bytes as hex, mode 0600) and a note goes to stderr; otherwise
    that is an error. Raises :class:`CLIError`.
    """
    env_secret = os.environ.get(ENV_SECRET)
    if env_secret and not secret_file:  # an explicit --secret-file wins, like every other flag
        return _secret_from_text(env_secret, ENV_SECRET)
    path = Path(secret_file or _env(ENV_SECRET_FILE) or DEFAULT_SECRET_FILE)
    if not path.exists():
        if not create:
            raise CLIError(f"the secret file {path} does not exist and {ENV_SECRET} is not set")
        if not path.parent.is_dir():
            raise CLIError(f"cannot create the secret file {path}: its directory does not exist")
        if _create_secret_file(path):
            print(f"{PROG}: created a new key-hashing secret in {path} (mode 0600); keep it safe", file=sys.stderr)
    return _read_secret_file(path)


# ----------------------------------------------------------------------------------------------------- stores


def _open_store(url: str) -> KeyStore:
    try:
        return key_store_from_url(url)
    except ValueError as exc:
        raise _usage_error(str(exc)) from exc
    except Exception as exc:  # e.g. SQLAlchemy's ArgumentError for a malformed URL; never echo the URL itself
        raise _usage_error(f"invalid key store URL ({type(exc).__name__})") from exc


async def _close(resource: object) -> None:
    close = getattr(resource, "aclose", None)
    if close is not None:
        with anyio.move_on_after(5, shield=True):
            await close()


def _store_failure(exc: BaseException) -> CLIError:
    cause = exc.__cause__ if isinstance(exc, OzwellError) and exc.__cause__ is not None else exc
    detail = _first_line(str(cause)) or type(cause).__name__
    return CLIError(f"the key store failed: {type(cause).__name__}: {detail}")


def _run_with_store(url: str, work: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Run ``work(store)`` on a new event loop, bounded in time; the store is closed afterwards."""
    store = _open_store(url)

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
            await _close(store)

    try:
        return anyio.run(run)
    except (CLIError, KeyboardInterrupt):
        raise
    except InvalidRequestError as exc:
        raise _usage_error(str(exc)) from exc
    except TimeoutError as exc:
        raise CLIError(f"the key store did not answer within {STORE_TIMEOUT_SECONDS:g} s") from exc
    except Exception as exc:
        raise _store_failure(exc) from exc


# -------------------------------------------------------------------------------------------------- formatting


def _when(epoch: int | None) -> str:
    if epoch is None:
        return "never"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _limits(key: APIKey) -> tuple[int | None, int | None]:
    try:
        quota = quota_for(key.plan, key.rpm, key.tpm, DEFAULT_PLANS)
    except ValueError:  # a plan this CLI does not know (a host's own plans): show the key's own limits
        return key.rpm, key.tpm
    return quota.rpm, quota.tpm


def _key_record(key: APIKey, now: float) -> dict[str, Any]:
    """What ``keys list`` shows of a key: never its secret or hash. ``rpm``/``tpm`` are the effective limits."""
    rpm, tpm = _limits(key)
    return {
        "id": key.id,
        "name": key.name,
        "owner": key.owner,
        "plan": key.plan,
        "rpm": rpm,
        "tpm": tpm,
        "models": None if key.models is None else list(key.models),
        "scopes": list(key.scopes),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "status": key.status(now),
        "hint": key.hint,
    }


def _limit_text(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _summary(key: APIKey) -> list[str]:
    rpm, tpm = _limits(key)
    return [
        f"  id:      {key.id}",
        f"  name:    {key.name}",
        f"  owner:   {key.owner}",
        f"  plan:    {key.plan}",
        f"  limits:  {_limit_text(rpm)} requests/min, {_limit_text(tpm)} tokens/min",
        f"  models:  {'all' if key.models is None else ', '.join(key.models) or 'none'}",
        f"  scopes:  {', '.join(key.scopes)}",
        f"  expires: {_when(key.expires_at)}",
    ]


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


# ------------------------------------------------------------------------------------------------------- keys


def _csv(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise _usage_error(f"{flag} needs at least one comma-separated value")
    return items


def _store_url(args: argparse.Namespace) -> str:
    url: str = args.store or _env(ENV_STORE_URL) or DEFAULT_STORE_URL
    return url


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create a key; print a summary, then the secret alone on the last line (it is shown only this once)."""
    models = _csv(args.models, "--models")
    scopes = _csv(args.scopes, "--scopes") or list(DEFAULT_SCOPES)
    expires_in = None
    if args.expires_in is not None:
        try:
            expires_in = parse_duration(args.expires_in)
        except ValueError as exc:
            raise _usage_error(f"--expires-in: {exc}") from exc
    options: dict[str, Any] = {
        "name": args.name,
        "owner": args.owner,
        "plan": args.plan,
        "rpm": args.rpm,
        "tpm": args.tpm,
        "models": models,
        "scopes": scopes,
        "expires_in": expires_in,
    }
    url = _store_url(args)
    _open_store(url)
    # Validate everything (KeyManager's own rules, on a throwaway store) before a secret file is created for it.
    _run_with_store("memory://", lambda scratch: KeyManager(scratch, KeyHasher(b"x" * 16)).create(**options))
    hasher = KeyHasher(resolve_secret(args.secret_file, create=True))
    key, secret = _run_with_store(url, lambda store: KeyManager(store, hasher).create(**options))
    print("\n".join(["Created API key:", *_summary(key), "The secret is shown only once:", secret]))
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Print every key (of ``--owner``): a table, or a JSON array with ``--json``. Never a secret or a hash."""

    async def work(store: KeyStore) -> list[APIKey]:
        return await store.list(args.owner)

    keys = _run_with_store(_store_url(args), work)
    now = time.time()
    records = [_key_record(key, now) for key in keys]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print("no API keys" + (f" for owner {args.owner!r}" if args.owner else ""))
        return 0
    header = ["ID", "NAME", "OWNER", "PLAN", "RPM", "TPM", "MODELS", "SCOPES", "CREATED", "EXPIRES", "STATUS", "HINT"]
    rows = [header] + [
        [
            r["id"],
            r["name"],
            r["owner"],
            r["plan"],
            "-" if r["rpm"] is None else str(r["rpm"]),
            "-" if r["tpm"] is None else str(r["tpm"]),
            "*" if r["models"] is None else ",".join(r["models"]),
            ",".join(r["scopes"]),
            _when(r["created_at"]),
            _when(r["expires_at"]),
            r["status"],
            r["hint"] + "...",
        ]
        for r in records
    ]
    print(_table(rows))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key at once (running servers stop accepting it within their key cache TTL). Unknown id: exit 1."""

    async def work(store: KeyStore) -> tuple[APIKey | None, APIKey | None]:
        before = await store.get(args.id)
        if before is None:
            return None, None
        return before, await store.revoke(args.id, int(time.time()))

    before, after = _run_with_store(_store_url(args), work)
    if after is None:
        raise CLIError(f"no API key with id {args.id!r}")
    if before is not None and before.revoked_at is not None:
        print(f"API key {after.id} ({after.name}) was already revoked at {_when(after.revoked_at)}")
    else:
        print(f"Revoked API key {after.id} ({after.name}) at {_when(after.revoked_at)}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Give a key a new secret (printed alone on the last line); the old secret stops working. Unknown id: exit 1."""
    url = _store_url(args)
    _open_store(url)
    hasher = KeyHasher(resolve_secret(args.secret_file, create=False))

    async def work(store: KeyStore) -> tuple[APIKey | None, tuple[APIKey, str] | None]:
        existing = await store.get(args.id)
        if existing is None or existing.revoked_at is not None:
            return existing, None
        return existing, await KeyManager(store, hasher).rotate(args.id)

    existing, rotated = _run_with_store(url, work)
    if existing is None:
        raise CLIError(f"no API key with id {args.id!r}")
    if rotated is None:
        raise CLIError(f"API key {args.id!r} is revoked and cannot be rotated")
    key, secret = rotated
    print(f"Rotated API key {key.id} ({key.name}); the previous secret no longer works.")
    print("The new secret is shown only once:")
    print(secret)
    return 0


# ------------------------------------------------------------------------------------------------------ serve


@dataclasses.dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything a server process needs to build the same app as every other worker."""

    store_url: str
    limiter_url: str
    secret: str
    key_cache_ttl: float = DEFAULT_KEY_CACHE_TTL
    on_limiter_error: str = "closed"
    limiter_namespace: str = DEFAULT_LIMITER_NAMESPACE

    def to_env(self) -> dict[str, str]:
        return {
            ENV_STORE_URL: self.store_url,
            ENV_LIMITER_URL: self.limiter_url,
            ENV_SECRET: self.secret,
            ENV_KEY_CACHE_TTL: repr(self.key_cache_ttl),
            ENV_ON_LIMITER_ERROR: self.on_limiter_error,
            ENV_LIMITER_NAMESPACE: self.limiter_namespace,
        }


class _ServedApp(PrefixedApp):
    """:class:`PrefixedApp` that also closes the rate limiter it was given when the server shuts down."""

    def __init__(self, api: OzwellAPI, limiter: LimitsRateLimiter) -> None:
        super().__init__(api, "/v1")
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await super().__call__(scope, receive, send)
            return

        async def send_after_closing(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.limiter.aclose()
            elif message["type"] == "lifespan.startup.complete":
                # This process is ours: what exists now (schemas, tables, the app) lives as long as it does, so
                # keep it out of the cyclic collector's generations and full collections under load stay cheap.
                gc.freeze()
            await send(message)

        await super().__call__(scope, receive, send_after_closing)


def _make_limiter(config: ServeConfig) -> LimitsRateLimiter:
    if config.on_limiter_error not in ("closed", "open"):
        raise ValueError(f"on_limiter_error must be 'closed' or 'open', got {config.on_limiter_error!r}")
    return LimitsRateLimiter(
        config.limiter_url,
        namespace=config.limiter_namespace,
        on_storage_error="open" if config.on_limiter_error == "open" else "closed",
    )


def build_app(config: ServeConfig) -> PrefixedApp:
    """The app ``serve`` runs: the echo backend's :class:`OzwellAPI` under ``/v1``. Nothing connects until used."""
    limiter = _make_limiter(config)
    api = OzwellAPI(
        key_store=config.store_url,
        rate_limiter=limiter,
        secret=config.secret,
        key_cache_ttl=config.key_cache_ttl,
    )
    return _ServedApp(api, limiter)


def _float_from_env(name: str, default: float) -> float:
    value = _env(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None


def app_from_env() -> PrefixedApp:
    """uvicorn factory (``ozwell_asgi.cli:app_from_env``): the app configured by ``OZWELL_*`` variables.

    ``serve --workers N`` sets them for its workers; each worker reads them once, at startup.
    """
    config = ServeConfig(
        store_url=_env(ENV_STORE_URL) or DEFAULT_STORE_URL,
        limiter_url=_env(ENV_LIMITER_URL) or DEFAULT_LIMITER_URL,
        secret=resolve_secret(None, create=True),
        key_cache_ttl=_float_from_env(ENV_KEY_CACHE_TTL, DEFAULT_KEY_CACHE_TTL),
        on_limiter_error=_env(ENV_ON_LIMITER_ERROR) or "closed",
        limiter_namespace=_env(ENV_LIMITER_NAMESPACE) or DEFAULT_LIMITER_NAMESPACE,
    )
    return build_app(config)


def _check_store(url: str) -> None:
    """Fail fast, before any worker starts, when the key store is unreachable (this also creates its tables)."""

    async def work(store: KeyStore) -> None:
        await store.get("key_preflight")

    _run_with_store(url, work)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the API under /v1 until interrupted; every worker builds the same app from the same settings."""
    import uvicorn

    if args.workers < 1:
        raise _usage_error("--workers must be at least 1")
    if not 0 <= args.port <= 65535:
        raise _usage_error("--port must be between 0 and 65535")
    if args.key_cache_ttl < 0:
        raise _usage_error("--key-cache-ttl must be >= 0")
    store_url = _store_url(args)
    limiter_url: str = args.limiter or _env(ENV_LIMITER_URL) or DEFAULT_LIMITER_URL
    _open_store(store_url)
    config = ServeConfig(
        store_url=store_url,
        limiter_url=limiter_url,
        secret="",
        key_cache_ttl=args.key_cache_ttl,
        on_limiter_error=args.on_limiter_error,
        limiter_namespace=args.limiter_namespace,
    )
    try:
        _make_limiter(config)
    except ValueError as exc:
        raise _usage_error(f"--limiter: {exc}") from exc
    except ImportError as exc:
        raise CLIError(f"--limiter: a driver is missing ({exc.name or exc})") from exc
    _check_store(store_url)
    config = dataclasses.replace(config, secret=resolve_secret(args.secret_file, create=True))
    common: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "access_log": not args.no_access_log,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }
    if args.workers > 1:
        if limiter_url.strip().lower().startswith(("memory:", "async+memory:")):
            print(
                f"{PROG}: warning: --workers {args.workers} with a memory:// limiter: every worker counts its own "
                "limits, so a key gets up to N times its budget; use --limiter redis://... for shared limits",
                file=sys.stderr,
            )
        os.environ.update(config.to_env())
        uvicorn.run("ozwell_asgi.cli:app_from_env", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(build_app(config), **common)
    return 0


# ----------------------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def _env_float_default(name: str, default: float) -> float:
    try:
        return _float_from_env(name, default)
    except ValueError as exc:
        raise _usage_error(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Serve the Ozwell /v1 API and manage its ozw_ API keys.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    store_help = f"key store URL (default: ${ENV_STORE_URL} or {DEFAULT_STORE_URL})"
    secret_help = (
        f"secret file, used unless ${ENV_SECRET} is set (default: ${ENV_SECRET_FILE} or {DEFAULT_SECRET_FILE})"
    )

    serve = commands.add_parser("serve", help="serve the API under /v1 with uvicorn", description=cmd_serve.__doc__)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=_integer, default=8000, help="port to bind (default: 8000)")
    serve.add_argument("--store", metavar="URL", help=store_help)
    serve.add_argument(
        "--limiter",
        metavar="URL",
        help=f"rate-limit storage URL (default: ${ENV_LIMITER_URL} or {DEFAULT_LIMITER_URL})",
    )
    serve.add_argument(
        "--limiter-namespace",
        metavar="NS",
        default=_env(ENV_LIMITER_NAMESPACE) or DEFAULT_LIMITER_NAMESPACE,
        help=f"prefix of the limiter's counters (default: ${ENV_LIMITER_NAMESPACE} or {DEFAULT_LIMITER_NAMESPACE})",
    )
    serve.add_argument("--workers", type=_integer, default=1, help="worker processes (default: 1)")
    serve.add_argument(
        "--key-cache-ttl",
        metavar="SECONDS",
        type=_seconds,
        default=None,
        help=f"how long a worker may still accept a key revoked elsewhere; 0 disables the cache "
        f"(default: ${ENV_KEY_CACHE_TTL} or {DEFAULT_KEY_CACHE_TTL:g})",
    )
    serve.add_argument(
        "--on-limiter-error",
        choices=("closed", "open"),
        default=None,
        help=f"when the limiter's storage is down: refuse requests (closed) or admit them (open) "
        f"(default: ${ENV_ON_LIMITER_ERROR} or closed)",
    )
    serve.add_argument("--secret-file", metavar="PATH", help=secret_help)
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="uvicorn's log level (default: info)",
    )
    serve.add_argument("--no-access-log", action="store_true", help="turn uvicorn's access log off")
    serve.set_defaults(handler=cmd_serve)

    keys = commands.add_parser("keys", help="create, list, revoke and rotate API keys", description="Manage API keys.")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)
    key_commands.required = True

    create = key_commands.add_parser("create", help="create a key", description=cmd_keys_create.__doc__)
    create.add_argument("--name", required=True, help="a label for the key")
    create.add_argument("--owner", default="default", help="who the key belongs to (default: default)")
    create.add_argument("--plan", default="free", metavar="{" + ",".join(DEFAULT_PLANS) + "}", help="default: free")
    create.add_argument("--rpm", type=_integer, help="requests per minute, overriding the plan's")
    create.add_argument("--tpm", type=_integer, help="tokens per minute, overriding the plan's")
    create.add_argument("--models", metavar="A,B", help="models the key may use (ids or globs; default: all)")
    create.add_argument("--scopes", metavar="S,T", help="scopes: api, admin, admin:global (default: api)")
    create.add_argument("--expires-in", metavar="DURATION", help="lifetime, e.g. 3600, 90m, 12h, 30d, 1w")
    create.add_argument("--store", metavar="URL", help=store_help)
    create.add_argument("--secret-file", metavar="PATH", help=secret_help)
    create.set_defaults(handler=cmd_keys_create)

    listing = key_commands.add_parser("list", help="list keys", description=cmd_keys_list.__doc__)
    listing.add_argument("--owner", help="only this owner's keys")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.add_argument("--store", metavar="URL", help=store_help)
    listing.set_defaults(handler=cmd_keys_list)

    revoke = key_commands.add_parser("revoke", help="revoke a key", description=cmd_keys_revoke.__doc__)
    revoke.add_argument("id", metavar="ID", help="the key's id (key_...)")
    revoke.add_argument("--store", metavar="URL", help=store_help)
    revoke.set_defaults(handler=cmd_keys_revoke)

    rotate = key_commands.add_parser("rotate", help="give a key a new secret", description=cmd_keys_rotate.__doc__)
    rotate.add_argument("id", metavar="ID", help="the key's id (key_...)")
    rotate.add_argument("--store", metavar="URL", help=store_help)
    rotate.add_argument("--secret-file", metavar="PATH", help=secret_help)
    rotate.set_defaults(handler=cmd_keys_rotate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``ozwell-asgi`` command line; returns the exit status (0 on success)."""
    try:
        args = build_parser().parse_args(argv)
        if args.handler is cmd_serve:
            if args.key_cache_ttl is None:
                args.key_cache_ttl = _env_float_default(ENV_KEY_CACHE_TTL, DEFAULT_KEY_CACHE_TTL)
            if args.on_limiter_error is None:
                args.on_limiter_error = _env(ENV_ON_LIMITER_ERROR) or "closed"
                if args.on_limiter_error not in ("closed", "open"):
                    raise _usage_error(f"{ENV_ON_LIMITER_ERROR} must be 'closed' or 'open'")
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except SystemExit as exc:  # argparse (--help, bad arguments) and uvicorn's startup failures
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except CLIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an environment we did not foresee: still one line, never a traceback
        print(f"{PROG}: error: {type(exc).__name__}: {_first_line(str(exc))}", file=sys.stderr)
        return 1
