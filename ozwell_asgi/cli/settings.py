"""Every ``serve`` setting, declared once.

A setting is one field of :class:`ServerOptions` (how uvicorn listens), :class:`ServeConfig` (what builds the app, so
what ``--workers N`` hands its workers) or :class:`ConnectionLimits` (how connections are bounded); the field's
:class:`Setting` names its flag, environment variable, default, kind (parser and rule) and help. These rows alone make
the flags (:func:`add_flag`: default ``None``, so a flag not given is visible), resolve each value flag, then
environment, then default with one error style (:func:`resolve`: exit status 2, one line naming the flag or the
variable), and carry the app's settings to workers and back (:meth:`ServeConfig.to_env`, :func:`resolve` with no
arguments). A new setting is one new field here, and the code that uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..origins import normalize_origin
from .errors import usage_error

__all__ = [
    "SERVE_SETTINGS",
    "ConnectionLimits",
    "ServeConfig",
    "ServerOptions",
    "Setting",
    "add_flag",
    "env",
    "resolve",
    "resolve_one",
    "row",
    "rows",
]

G = TypeVar("G")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
MAX_SECRET_FILE_BYTES = 64 * 1024  # a key in a file is a line; anything bigger is the wrong file


def env(name: str) -> str | None:
    """The variable ``name``, stripped; ``None`` when it is unset, empty or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


# ------------------------------------------------------------------------------------------------------ kinds


class Kind(Protocol):
    """How a setting's text becomes its value, and what values it holds."""

    @property
    def rule(self) -> str:
        """What the setting must be, as the end of "--flag must be ...": ``an integer >= 1``."""
        ...

    def parse(self, text: str) -> Any:
        """The value ``text`` stands for; ``ValueError`` unless it follows :attr:`rule`."""
        ...

    def holds(self, value: object) -> bool:
        """Whether ``value`` (given in code, not parsed) follows :attr:`rule`."""
        ...

    def format(self, value: Any) -> str:
        """Text that :meth:`parse` turns back into ``value``."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    """Text, stripped; never empty."""

    rule: str = "a non-empty string"

    def parse(self, text: str) -> str:
        if not text.strip():
            raise ValueError(text)
        return text.strip()

    def holds(self, value: object) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def format(self, value: Any) -> str:
        return str(value)


@dataclasses.dataclass(frozen=True, slots=True)
class Integer:
    """An integer from ``low`` to ``high`` (none: no upper bound)."""

    low: int
    high: int | None = None

    @property
    def rule(self) -> str:
        return f"an integer >= {self.low}" if self.high is None else f"an integer from {self.low} to {self.high}"

    def parse(self, text: str) -> int:
        value = int(text)
        if not self.holds(value):
            raise ValueError(text)
        return value

    def holds(self, value: object) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value >= self.low
            and (self.high is None or value <= self.high)
        )

    def format(self, value: Any) -> str:
        return str(value)


@dataclasses.dataclass(frozen=True, slots=True)
class Seconds:
    """A finite number of seconds, at least ``low`` (``above``: more than ``low``)."""

    low: float = 0.0
    above: bool = False  # strictly above ``low``

    @property
    def rule(self) -> str:
        return f"a number of seconds {'>' if self.above else '>='} {self.low:g}"

    def parse(self, text: str) -> float:
        value = float(text)
        if not self.holds(value):
            raise ValueError(text)
        return value

    def holds(self, value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return False
        return value > self.low if self.above else value >= self.low

    def format(self, value: Any) -> str:
        return repr(float(value))


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    """One of ``options``, exactly."""

    options: tuple[str, ...]

    @property
    def rule(self) -> str:
        return "one of " + ", ".join(self.options)

    def parse(self, text: str) -> str:
        if text.strip() not in self.options:
            raise ValueError(text)
        return text.strip()

    def holds(self, value: object) -> bool:
        return value in self.options

    def format(self, value: Any) -> str:
        return str(value)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True, slots=True)
class Switch:
    """On or off: ``--flag`` / ``--no-flag``, or the variable set to 1, true, yes, on / 0, false, no, off."""

    rule: str = "one of " + ", ".join(_TRUE + _FALSE)

    def parse(self, text: str) -> bool:
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError(text)
        return word in _TRUE

    def holds(self, value: object) -> bool:
        return isinstance(value, bool)

    def format(self, value: Any) -> str:
        return "1" if value else "0"


@dataclasses.dataclass(frozen=True, slots=True)
class Origins:
    """Browser origins (``scheme://host[:port]``, ``https://*.domain`` or ``*``), comma-separated; canonicalised."""

    rule: str = "browser origins such as https://app.example.com, https://*.example.com or *, comma-separated"

    def parse(self, text: str) -> tuple[str, ...]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ValueError(text)
        return tuple(dict.fromkeys(normalize_origin(item, allow_any=True) for item in items))

    def holds(self, value: object) -> bool:
        if not isinstance(value, tuple) or not value:
            return False
        try:
            return all(isinstance(v, str) and normalize_origin(v, allow_any=True) == v for v in value)
        except ValueError:
            return False

    def format(self, value: Any) -> str:
        return ",".join(value)


TEXT = Text()
SWITCH = Switch()


# -------------------------------------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table. ``name`` and ``flag`` (``--`` and the name, dashed, unless given) are filled in from
    the field. A ``secret`` is never shown, in help or errors, and may also come from the file named by the
    variable ``<env>_FILE``; workers get it only that way. A ``repeat`` flag may be given several times, its values
    joined with commas (its variable holds them comma-separated). ``fallback``, when set, is what the help says
    applies without the flag (instead of "the variable, or the default")."""

    env: str
    default: Any
    kind: Kind
    help: str
    flag: str = ""
    metavar: str | None = None
    secret: bool = False
    name: str = ""
    repeat: bool = False
    fallback: str = ""

    @property
    def file_env(self) -> str:
        """The variable naming a file that holds a secret setting's value."""
        return self.env + "_FILE"

    def shown_default(self) -> str:
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


def setting(
    env_name: str,
    default: Any,
    kind: Kind,
    help: str,
    *,
    flag: str = "",
    metavar: str | None = None,
    secret: bool = False,
    repeat: bool = False,
    fallback: str = "",
) -> Any:
    """A dataclass field that is a row of the table (typed ``Any`` so that it fits the field's annotation)."""
    item = Setting(
        env_name, default, kind, help, flag=flag, metavar=metavar, secret=secret, repeat=repeat, fallback=fallback
    )
    return dataclasses.field(default=default, repr=not secret, metadata={"setting": item})


_ROWS: dict[type, tuple[Setting, ...]] = {}


def rows(group: type) -> tuple[Setting, ...]:
    """The rows of one group (a dataclass of :func:`setting` fields), in field order."""
    found = _ROWS.get(group)
    if found is None:
        found = tuple(
            dataclasses.replace(item, name=field.name, flag=item.flag or "--" + field.name.replace("_", "-"))
            for field in dataclasses.fields(group)
            if (item := field.metadata.get("setting")) is not None
        )
        _ROWS[group] = found
    return found


def check(instance: object) -> None:
    """``ValueError`` naming the flag of the first setting of ``instance`` whose value breaks its rule."""
    for item in rows(type(instance)):
        value = getattr(instance, item.name)
        if value is None and item.default is None:
            continue
        if not item.kind.holds(value):
            shown = "" if item.secret else f", got {value!r}"
            raise ValueError(f"{item.flag} must be {item.kind.rule}{shown}")


def add_flag(parser: argparse.ArgumentParser, item: Setting) -> None:
    """Add ``item``'s flag to ``parser``: its value is stored under ``item.name``, ``None`` when not given."""
    if item.fallback:
        text = f"{item.help} (default: {item.fallback})"
    else:
        fallback = f"${item.env}, else the file ${item.file_env} names," if item.secret else f"${item.env}"
        text = f"{item.help} (default: {fallback} or {item.shown_default()})"
    text = text.replace("%", "%%")
    if isinstance(item.kind, Switch):
        parser.add_argument(item.flag, dest=item.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        return
    metavar = item.metavar
    if metavar is None and isinstance(item.kind, Choice):
        metavar = "{" + ",".join(item.kind.options) + "}"
    if item.repeat:
        parser.add_argument(item.flag, dest=item.name, metavar=metavar, default=None, action="append", help=text)
        return
    parser.add_argument(item.flag, dest=item.name, metavar=metavar, default=None, help=text)


def _parse(item: Setting, text: str, origin: str) -> Any:
    try:
        return item.kind.parse(text)
    except ValueError:
        shown = "" if item.secret else f", got {text!r}"
        raise usage_error(f"{origin} must be {item.kind.rule}{shown}") from None


def _read_file(item: Setting, path: str) -> str:
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise usage_error(f"{item.file_env}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise usage_error(f"{item.file_env}: {path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    if not data.strip():
        raise usage_error(f"{item.file_env}: {path} is empty")
    return data.decode("utf-8", errors="replace")


def source(item: Setting, given: object = None) -> str:
    """Where ``item``'s value comes from, to name in an error: its flag if given, else its variable if set, else the
    flag."""
    if given is None and env(item.env) is not None:
        return item.env
    if given is None and item.secret and env(item.file_env) is not None:
        return item.file_env
    return item.flag


def resolve_one(item: Setting, given: object = None) -> Any:
    """``item``'s value: the flag's (``given``), else the variable's, else (a secret) the file's that ``<env>_FILE``
    names, else the default. Exit status 2 (a :class:`~.errors.CLIError`) naming where a bad value came from."""
    if given is not None:
        if isinstance(given, list):  # a repeated flag
            given = ",".join(given)
        return given if isinstance(given, bool) else _parse(item, str(given), item.flag)
    text = env(item.env)
    if text is not None:
        return _parse(item, text, item.env)
    if item.secret:
        path = env(item.file_env)
        if path is not None:
            return _parse(item, _read_file(item, path), item.file_env)
    return item.default


def resolve(group: type[G], given: argparse.Namespace | Mapping[str, Any] | None = None) -> G:
    """The ``group`` (ServerOptions, ServeConfig or ConnectionLimits) made from flags (``given``; none: the
    environment and defaults alone, as a worker reads them)."""
    values = given if isinstance(given, Mapping) else vars(given) if given is not None else {}
    return group(**{item.name: resolve_one(item, values.get(item.name)) for item in rows(group)})


def row(group: type, name: str) -> Setting:
    """The row of ``group`` named ``name``."""
    return next(item for item in rows(group) if item.name == name)


# ------------------------------------------------------------------------------------------------------- table


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServerOptions:
    """Where and how uvicorn listens; the parent process's alone (workers are given them by uvicorn)."""

    host: str = setting("OZWELL_HOST", "127.0.0.1", TEXT, "interface to bind", metavar="H")
    port: int = setting("OZWELL_PORT", 8000, Integer(0, 65535), "port to bind", metavar="P")
    workers: int = setting("OZWELL_WORKERS", 1, Integer(1), "worker processes, each serving the same app", metavar="N")
    log_level: str = setting("OZWELL_LOG_LEVEL", "info", Choice(LOG_LEVELS), "uvicorn's log level")
    access_log: bool = setting("OZWELL_ACCESS_LOG", True, SWITCH, "uvicorn's access log, a line per request")
    reload: bool = setting(
        "OZWELL_RELOAD",
        False,
        SWITCH,
        "restart the server when a .py file under the working directory changes (development; one worker)",
    )

    def __post_init__(self) -> None:
        check(self)

    def uvicorn_options(self) -> dict[str, Any]:
        """The keyword arguments of ``uvicorn.run`` these stand for (``workers`` is the caller's to pass)."""
        return {"host": self.host, "port": self.port, "log_level": self.log_level, "access_log": self.access_log}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig:
    """Everything a server process needs to build the same app as every other worker.

    ``secret`` (the key-hashing secret, see ``resolve_secret``) is not a setting of its own: it comes from
    ``secret_file`` or ``OZWELL_SECRET``. Workers are told where a secret is, never what it is (:meth:`to_env`).
    """

    backend: str = setting(
        "OZWELL_BACKEND",
        "echo",
        TEXT,
        "what answers: echo, openai+http://host:port/v1, openai+https://..., package.module:attribute (a backend or "
        "a factory), or a router file (.toml, .json)",
        metavar="SPEC",
    )
    upstream_key: str | None = setting(
        "OZWELL_UPSTREAM_KEY",
        None,
        TEXT,
        "API key sent to an openai+http(s):// backend; other local users can read a flag in the process list, so "
        "prefer the variables",
        metavar="KEY",
        secret=True,
    )
    store_url: str = setting(
        "OZWELL_STORE_URL", "sqlite:///./ozwell.db", TEXT, "key store URL", flag="--store", metavar="URL"
    )
    files_url: str | None = setting(
        "OZWELL_FILES_URL",
        None,
        TEXT,
        "file metadata store URL (default: the key store's URL, sharing its engine or client)",
        flag="--files",
        metavar="URL",
    )
    responses_url: str | None = setting(
        "OZWELL_RESPONSES_URL",
        None,
        TEXT,
        "response store URL for /responses (default: the key store's URL, sharing its engine or client, so every "
        "worker chains to every stored response)",
        flag="--responses",
        metavar="URL",
    )
    file_content_url: str | None = setting(
        "OZWELL_FILE_CONTENT_URL",
        None,
        TEXT,
        "where file bytes live: file:///dir, s3://bucket/prefix?endpoint=..., or 'store' (the metadata store "
        "itself); default: a directory beside a SQLite database (ozwell.db: ./ozwell-files), else the store",
        flag="--file-content",
        metavar="URL",
    )
    limiter_url: str = setting(
        "OZWELL_LIMITER_URL", "memory://", TEXT, "rate-limit storage URL", flag="--limiter", metavar="URL"
    )
    limiter_namespace: str = setting(
        "OZWELL_LIMITER_NAMESPACE", "ozwell", TEXT, "prefix of the limiter's counters", metavar="NS"
    )
    key_cache_ttl: float = setting(
        "OZWELL_KEY_CACHE_TTL",
        5.0,
        Seconds(0),
        "how long a worker may still accept a key revoked elsewhere; 0 disables the cache",
        metavar="SECONDS",
    )
    sources_model: str | None = setting(
        "OZWELL_SOURCES_MODEL",
        None,
        TEXT,
        "embedding model of the backend that include_sources searches the owner's files with (default: none, "
        "include_sources is refused); passages are kept in the file store's database (memory for Redis)",
        metavar="MODEL",
    )
    on_limiter_error: str = setting(
        "OZWELL_ON_LIMITER_ERROR",
        "closed",
        Choice(("closed", "open")),
        "when the limiter's storage is down: refuse requests (closed) or admit them (open)",
    )
    cors_origins: tuple[str, ...] | None = setting(
        "OZWELL_CORS_ORIGINS",
        None,
        Origins(),
        "a browser origin that may call the API (CORS), e.g. https://app.example.com, https://*.example.com or *; "
        "repeat the flag for more (the variable: comma-separated)",
        flag="--cors-origin",
        metavar="ORIGIN",
        repeat=True,
    )
    secret_file: str = setting(
        "OZWELL_SECRET_FILE",
        "./ozwell.secret",
        TEXT,
        "the key-hashing secret's file, its contents stripped of surrounding whitespace; given, it wins over "
        "$OZWELL_SECRET",
        metavar="PATH",
        fallback="$OZWELL_SECRET, the secret itself, if set; else the file $OZWELL_SECRET_FILE names; else "
        "./ozwell.secret, which serve and keys create create when missing",
    )
    secret: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        check(self)

    def to_env(self, private_file: Callable[[str, str], str]) -> dict[str, str]:
        """The ``OZWELL_*`` variables that ``resolve(ServeConfig)`` rebuilds this config from, in a worker.

        No secret is among them. The key-hashing secret goes as ``secret_file``, which must be the absolute path of
        a file holding it; a secret setting's value is written by ``private_file(name, value)`` to a private file,
        whose path goes as the variable ``<env>_FILE``.
        """
        if not os.path.isabs(self.secret_file):
            raise ValueError("workers are told where the secret is: secret_file must be an absolute path")
        exported: dict[str, str] = {}
        for item in rows(ServeConfig):
            value = getattr(self, item.name)
            if value is None:  # unset: the worker resolves it to the same default
                continue
            if not item.secret:
                exported[item.env] = item.kind.format(value)
            elif value is not None:
                exported[item.file_env] = private_file(item.name, value)
        return exported


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    """How ``serve`` bounds its connections, per worker.

    ``limit_concurrency``: requests in progress before more are answered 503 (0: no limit); ``timeout_headers``:
    seconds a connection may take to send a request's headers while none of its requests is being answered;
    ``max_header_size``: bytes of one request's headers (431 beyond); ``timeout_keep_alive``: seconds an idle
    connection is kept; ``backlog``: connections the kernel queues before they are accepted;
    ``timeout_graceful_shutdown``: seconds requests in progress are given on shutdown.
    """

    limit_concurrency: int = setting(
        "OZWELL_LIMIT_CONCURRENCY",
        1000,
        Integer(0),
        "requests in progress per worker before more get a 503; 0: none",
        metavar="N",
    )
    timeout_headers: float = setting(
        "OZWELL_TIMEOUT_HEADERS",
        10.0,
        Seconds(0, above=True),
        "seconds a connection has to send a request's headers, from its accept or its previous response",
        metavar="SECONDS",
    )
    max_header_size: int = setting(
        "OZWELL_MAX_HEADER_SIZE",
        32768,
        Integer(1024),
        "bytes of one request's headers; more is answered 431",
        metavar="N",
    )
    timeout_keep_alive: float = setting(
        "OZWELL_TIMEOUT_KEEP_ALIVE", 5.0, Seconds(0), "seconds an idle connection is kept open", metavar="SECONDS"
    )
    backlog: int = setting(
        "OZWELL_BACKLOG", 2048, Integer(1), "connections the kernel queues before they are accepted", metavar="N"
    )
    timeout_graceful_shutdown: float = setting(
        "OZWELL_TIMEOUT_GRACEFUL_SHUTDOWN",
        10.0,
        Seconds(0),
        "seconds requests in progress get on shutdown",
        metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        check(self)

    def uvicorn_options(self, http: str = "auto") -> dict[str, Any]:
        """The keyword arguments of ``uvicorn.run``/``uvicorn.Config`` that apply these limits.

        uvicorn's own ``limit_concurrency`` stays off: it counts idle and half-sent connections, which would let
        a few stalled sockets turn every real request away; ours counts requests (see guarded_http).
        """
        from ..guarded_http import guarded_protocol

        return {
            "http": guarded_protocol(
                header_timeout=self.timeout_headers,
                max_header_size=self.max_header_size,
                limit_concurrency=self.limit_concurrency or None,
                http=http,
            ),
            "h11_max_incomplete_event_size": self.max_header_size,
            "ws": "none",
            "limit_concurrency": None,
            "backlog": self.backlog,
            "timeout_keep_alive": self.timeout_keep_alive,
            "timeout_graceful_shutdown": self.timeout_graceful_shutdown,
        }


GROUPS: tuple[type, ...] = (ServerOptions, ServeConfig, ConnectionLimits)


def _all_rows() -> Iterator[Setting]:
    for group in GROUPS:
        yield from rows(group)


SERVE_SETTINGS: tuple[Setting, ...] = tuple(_all_rows())
"""The table: every ``serve`` setting, in the order of ``serve --help``."""
