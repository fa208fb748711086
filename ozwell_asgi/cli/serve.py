"""``ozwell-asgi serve``: the /v1 API under uvicorn, with the backend ``--backend SPEC`` names.

Everything is checked in the parent process before any worker starts (settings, the limiter URL, the backend, the
key store); every worker then builds the same app from the same settings (:func:`app_from_env`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import re
import sys
from typing import Any
from urllib.parse import urlsplit

import anyio

from ..app import OzwellAPI, PrefixedApp
from ..backends import capabilities
from ..backends.spec import backend_from_spec
from ..ratelimit import LimitsRateLimiter
from ..stores.content import content_store_from_url
from ..stores.urls import Storages, create_private_sqlite_file, sqlite_path
from ..types import Receive, Scope, Send
from .errors import PROG, CLIError, first_line, usage_error
from .secret import ENV_SECRET, PrivateFiles, resolve_secret, secret_for_workers
from .settings import (
    SERVE_SETTINGS,
    ConnectionLimits,
    ServeConfig,
    ServerOptions,
    add_flag,
    resolve,
    resolve_one,
    row,
    rows,
    source,
)
from .stores import aclose_quietly, check_store, open_store

__all__ = [
    "add_serve_command",
    "app_from_env",
    "build_app",
    "build_backend",
    "cmd_serve",
    "describe_backend",
    "describe_url",
    "install_log_handler",
]

log = logging.getLogger("ozwell_asgi")

APP_FACTORY = "ozwell_asgi.cli:app_from_env"
BACKEND = row(ServeConfig, "backend")
UPSTREAM_KEY = row(ServeConfig, "upstream_key")
LIMITER = row(ServeConfig, "limiter_url")
LOG_LEVEL = row(ServerOptions, "log_level")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}
_LEVELS.update(debug=logging.DEBUG, trace=5)  # uvicorn's TRACE
CLOSE_TIMEOUT_SECONDS = 5.0
# What workers never inherit: secrets reach them as files (ServeConfig.to_env), or not at all.
WITHHELD = (ENV_SECRET, *(v for item in rows(ServeConfig) if item.secret for v in (item.env, item.file_env)))


def _raise_open_files_limit() -> int | None:
    """Raise this process's soft limit on open files towards its hard limit (at most 65536; workers inherit it), so
    that the bounds above, not descriptors, run out first. Returns the soft limit in force (None: unlimited)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return None if soft == resource.RLIM_INFINITY else soft


class _ServedApp(PrefixedApp):
    """:class:`PrefixedApp` that also closes what ``serve`` built for it, the rate limiter and the backend, when the
    server shuts down."""

    def __init__(
        self, api: OzwellAPI, limiter: LimitsRateLimiter, backend: object = None, storages: Storages | None = None
    ) -> None:
        super().__init__(api, "/v1")
        self.limiter = limiter
        self.backend = backend
        self.storages = storages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await super().__call__(scope, receive, send)
            return

        async def send_after_closing(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.limiter.aclose()
                if self.storages is not None:
                    await self.storages.aclose()
                try:
                    await aclose_quietly(self.backend, CLOSE_TIMEOUT_SECONDS)
                except Exception:
                    log.exception("closing the backend %s failed", type(self.backend).__name__)
            elif message["type"] == "lifespan.startup.complete":
                # This process is ours: what exists now (schemas, tables, the app) lives as long as it does, so
                # keep it out of the cyclic collector's generations and full collections under load stay cheap.
                gc.freeze()
            await send(message)

        await super().__call__(scope, receive, send_after_closing)


def _make_limiter(config: ServeConfig) -> LimitsRateLimiter:
    return LimitsRateLimiter(
        config.limiter_url,
        namespace=config.limiter_namespace,
        on_storage_error="open" if config.on_limiter_error == "open" else "closed",
    )


def build_backend(config: ServeConfig) -> Any:
    """The backend ``config.backend`` names (``backend_from_spec``), checked as the app will check it: a
    ``ValueError`` or ``TypeError`` says what is wrong with the spec."""
    backend = backend_from_spec(config.backend, upstream_key=config.upstream_key)
    capabilities(backend)
    return backend


def build_app(config: ServeConfig, backend: object = None) -> PrefixedApp:
    """The app ``serve`` runs: :class:`OzwellAPI` under ``/v1``, on ``backend`` (else the one ``config.backend``
    names), which the app closes at shutdown with the limiter. Nothing connects until used."""
    limiter = _make_limiter(config)
    if backend is None:
        backend = build_backend(config)
    storages = Storages()  # one engine or client per URL: keys and files on one URL share it
    files_url = config.files_url or config.store_url
    content_url = file_content_url(files_url, config.file_content_url)
    passages = None
    if config.sources_model is not None:  # the file store's database keeps the passages, if it can
        make = getattr(storages.open(files_url), "passage_index", None)
        passages = make() if make is not None else None
    api = OzwellAPI(
        backend=backend,  # type: ignore[arg-type]  # checked by build_backend
        key_store=storages.key_store(config.store_url),
        file_store=storages.file_store(files_url, None if content_url is None else content_store_from_url(content_url)),
        rate_limiter=limiter,
        secret=config.secret,
        key_cache_ttl=config.key_cache_ttl,
        cors_origins=config.cors_origins or (),
        response_store=storages.response_store(config.responses_url or config.store_url),
        sources_model=config.sources_model,
        passage_index=passages,
    )
    return _ServedApp(api, limiter, backend, storages)


def file_content_url(files_url: str, given: str | None) -> str | None:
    """Where ``serve`` keeps file bytes: ``given`` (``"store"``: in the metadata store itself, ``None`` returned),
    else a directory beside a SQLite database file (``./ozwell.db`` → ``./ozwell-files``), else the store."""
    if given is not None:
        return None if given.strip() == "store" else given
    path = sqlite_path(files_url)
    if path is None:
        return None
    return (path.parent / f"{path.stem}-files").resolve().as_uri()


def app_from_env() -> PrefixedApp:
    """uvicorn factory (``ozwell_asgi.cli:app_from_env``): the app configured by ``OZWELL_*`` variables.

    ``serve --workers N`` and ``serve --reload`` set them for their server processes; each reads them once, at
    startup, and builds its own backend from the same spec. The secret must exist already (a worker never makes one
    of its own, which would not match the keys of the others). The ``ozwell_asgi`` logger gets serve's log handler
    (:func:`install_log_handler`) at ``OZWELL_LOG_LEVEL``.
    """
    install_log_handler(resolve_one(LOG_LEVEL))
    config = dataclasses.replace(resolve(ServeConfig), secret=resolve_secret(None, create=False))
    return build_app(config)


def install_log_handler(level: str) -> bool:
    """Give the ``ozwell_asgi`` logger a handler on stderr whose lines carry their time, level and logger
    (``2026-01-01 12:00:00,123 WARNING ozwell_asgi.ratelimit: ...``), at ``level`` (a ``--log-level`` name), unless
    logging is configured already: a handler on the root logger or on ``ozwell_asgi`` (a host's own) is left as it is
    and nothing is added. True when the handler was installed."""
    logger = logging.getLogger("ozwell_asgi")
    if logger.handlers or logging.getLogger().handlers:
        return False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(_LEVELS.get(level, logging.INFO))
    return True


_PASSWORD = re.compile(r"(://[^/?#@\s:'\"]*:)[^/?#@\s'\"]+@")


def _redact(text: str) -> str:
    """``text`` with the password of every URL's user info in it replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", text)


def describe_url(url: str) -> str:
    """What a log line says of a storage URL: its scheme, host, port and path; never a password or a query."""
    url = url.strip()
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return _redact(url.split("?", 1)[0].split("#", 1)[0])
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    user = f"{parts.username}@" if parts.username else ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _banner(server: ServerOptions, config: ServeConfig, content_url: str | None) -> str:
    """The one line ``serve`` prints before it starts: where, what answers, and where keys, files and counters are."""
    host = f"[{server.host}]" if ":" in server.host else server.host
    workers = f", {server.workers} workers" if server.workers > 1 else ""
    reload = ", reloading on code changes" if server.reload else ""
    key = " with an upstream key" if config.upstream_key is not None else ""
    files_url = config.files_url or config.store_url
    files = describe_url(files_url) + (f" (bytes in {describe_url(content_url)})" if content_url else "")
    return (
        f"{PROG}: serving http://{host}:{server.port}/v1 on the backend {describe_backend(config.backend)}{key}"
        f"{workers}{reload}; keys in {describe_url(config.store_url)}, files in {files}, rate limits in "
        f"{describe_url(config.limiter_url)} (fail {config.on_limiter_error})"
    )


def describe_backend(spec: str) -> str:
    """What a log line says of the backend ``spec``: never a password, a query string or a key."""
    spec = spec.strip()
    if spec.startswith(("openai+http://", "openai+https://")):
        parts = urlsplit(spec)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # not a port: say no more than the host
            port = ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    if spec.lower().endswith((".toml", ".json")) and ":" not in os.path.basename(spec):
        return f"the router file {spec}"
    return _redact(spec)


def _backend_or_exit(config: ServeConfig, given: object) -> Any:
    origin = source(BACKEND, given)
    try:
        return build_backend(config)
    except (ValueError, TypeError) as exc:
        raise usage_error(f"{origin}: {first_line(_redact(str(exc)), 500)}") from exc
    except Exception as exc:  # the user's module or factory failed: not a usage error
        raise CLIError(
            f"{origin}: building {_redact(config.backend)!r} failed: {type(exc).__name__}: {first_line(str(exc))}"
        ) from exc


def _close_now(backend: object) -> None:
    if getattr(backend, "aclose", None) is not None:
        anyio.run(aclose_quietly, backend, CLOSE_TIMEOUT_SECONDS)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the API under /v1 until interrupted; every worker builds the same app from the same settings."""
    import uvicorn

    server = resolve(ServerOptions, args)
    config = resolve(ServeConfig, args)
    limits = resolve(ConnectionLimits, args)
    open_store(config.store_url)
    try:
        _make_limiter(config)
    except ValueError as exc:
        raise usage_error(f"{source(LIMITER, args.limiter_url)}: {exc}") from exc
    except ImportError as exc:
        raise CLIError(f"{source(LIMITER, args.limiter_url)}: {first_line(str(exc), 500)}") from exc
    if server.reload and server.workers > 1:
        raise usage_error("--reload runs one server process: it cannot be used with --workers")
    files_url = config.files_url or config.store_url
    if config.files_url is not None:
        open_store(files_url)
        create_private_sqlite_file(files_url)  # 0600, as the key store's file
    content = file_content_url(files_url, config.file_content_url)
    if content is not None:
        try:
            content_store_from_url(content)
        except ValueError as exc:
            raise usage_error(f"--file-content: {exc}") from exc
    backend = _backend_or_exit(config, args.backend)
    handed_over = False
    try:
        check_store(config.store_url)
        config = dataclasses.replace(config, secret=resolve_secret(args.secret_file, create=True))
        if config.upstream_key is not None and not config.backend.startswith(("openai+http://", "openai+https://")):
            _warn(
                f"{source(UPSTREAM_KEY, args.upstream_key)} is used by an openai+http(s):// backend only (a router "
                "file names its backends' keys itself)"
            )
        open_files = _raise_open_files_limit()
        if open_files is not None and open_files < limits.limit_concurrency + 100:
            _warn(
                f"this process may open only {open_files} files, too few for --limit-concurrency "
                f"{limits.limit_concurrency}: descriptors can run out before it applies (raise the hard limit)"
            )
        options: dict[str, Any] = {**server.uvicorn_options(), "lifespan": "on", **limits.uvicorn_options()}
        if server.workers > 1 and config.limiter_url.strip().lower().startswith(("memory:", "async+memory:")):
            _warn(
                f"--workers {server.workers} with a memory:// limiter: every worker counts its own limits, so a key "
                "gets up to N times its budget; use --limiter redis://... for shared limits"
            )
        if server.log_level in ("info", "debug", "trace"):
            print(_banner(server, config, content), file=sys.stderr)
        install_log_handler(server.log_level)
        if server.workers > 1 or server.reload:
            handed_over = True
            _close_now(backend)  # it was built to check the spec: each server process builds its own
            with contextlib.ExitStack() as cleanup:
                private = PrivateFiles(cleanup)
                secret_file = secret_for_workers(args.secret_file, config.secret, private)
                exported = dataclasses.replace(config, secret_file=secret_file).to_env(private.write)
                exported[LOG_LEVEL.env] = server.log_level
                for name in WITHHELD:  # workers inherit this environment: no secret stays in it
                    os.environ.pop(name, None)
                os.environ.update(exported)
                if server.reload:
                    uvicorn.run(APP_FACTORY, factory=True, reload=True, **options)
                else:
                    uvicorn.run(APP_FACTORY, factory=True, workers=server.workers, **options)
        else:
            app = build_app(config, backend)
            handed_over = True  # the app closes it at shutdown
            uvicorn.run(app, **options)
    finally:
        if not handed_over:
            _close_now(backend)
    return 0


def add_serve_command(commands: Any) -> None:
    """Add ``serve`` and a flag for every row of :data:`SERVE_SETTINGS` to ``commands``."""
    serve = commands.add_parser("serve", help="serve the API under /v1 with uvicorn", description=cmd_serve.__doc__)
    for item in SERVE_SETTINGS:
        add_flag(serve, item)
    serve.set_defaults(handler=cmd_serve)
