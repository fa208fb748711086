"""The ``ozwell-asgi`` command line: ``serve`` the /v1 API with uvicorn, and manage API keys.

    ozwell-asgi --version
    ozwell-asgi serve [--backend SPEC] [--upstream-key KEY] [--host H] [--port P] [--workers N] [--store URL]
                      [--limiter URL] [--limiter-namespace NS] [--key-cache-ttl SECONDS]
                      [--on-limiter-error closed|open] [--secret-file PATH] [--log-level L] [--no-access-log] [--reload]
                      [--limit-concurrency N] [--timeout-headers SECONDS] [--max-header-size N]
                      [--timeout-keep-alive SECONDS] [--backlog N] [--timeout-graceful-shutdown SECONDS]
    ozwell-asgi keys create --name NAME [--owner O] [--plan P] [--rpm N] [--tpm N] [--models a,b] [--scopes api,admin]
                            [--expires-in 30d] [--store URL] [--secret-file PATH]
    ozwell-asgi keys list [--owner O] [--json] [--store URL]
    ozwell-asgi keys revoke ID [--store URL]
    ozwell-asgi keys rotate ID [--store URL] [--secret-file PATH]

Every ``serve`` setting has a flag and an ``OZWELL_*`` variable, declared once in :mod:`.settings`: the flag wins,
else the variable, else the default. The key-hashing secret is ``--secret-file``'s contents if given, else
``OZWELL_SECRET`` (at least 16 bytes) if set, else the contents of ``OZWELL_SECRET_FILE`` or ``./ozwell.secret``,
which ``serve`` and ``keys create`` create (32 random bytes, hex, mode 0600) when it does not exist. An app that
mounts ``OzwellAPI`` itself over the same key store reads that same secret with :func:`load_secret`.

Errors are one line on stderr and a non-zero exit status (2 for bad arguments, 1 for failures such as an unknown key
id or an unreachable store); secrets go to stdout only, alone on the last line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from .errors import PROG, CLIError, Parser, first_line
from .keys import add_keys_command
from .secret import load_secret, resolve_secret
from .serve import _ServedApp as _ServedApp
from .serve import add_serve_command, app_from_env, build_app, build_backend
from .settings import SERVE_SETTINGS, ConnectionLimits, ServeConfig, ServerOptions, Setting

__all__ = [
    "SERVE_SETTINGS",
    "CLIError",
    "ConnectionLimits",
    "ServeConfig",
    "ServerOptions",
    "Setting",
    "app_from_env",
    "build_app",
    "build_backend",
    "build_parser",
    "load_secret",
    "main",
    "package_version",
    "resolve_secret",
]


def package_version() -> str:
    """The installed ozwell-asgi's version (the package's own ``__version__`` when it is not installed)."""
    try:
        return version("ozwell-asgi")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``ozwell-asgi`` parser: ``serve`` and ``keys``; each command's handler is ``args.handler``."""
    parser = Parser(prog=PROG, description="Serve the Ozwell /v1 API and manage its ozw_ API keys.")
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    add_serve_command(commands)
    add_keys_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``ozwell-asgi`` command line; returns the exit status (0 on success)."""
    try:
        args = build_parser().parse_args(argv)
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
        print(f"{PROG}: error: {type(exc).__name__}: {first_line(str(exc))}", file=sys.stderr)
        return 1
