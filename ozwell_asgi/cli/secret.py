"""The key-hashing secret: where it comes from, how a missing secret file is made, and how workers are handed
secrets (as private files, never in their environment)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import PROG, CLIError
from .settings import ServeConfig, resolve_one, row

__all__ = [
    "ENV_SECRET",
    "MIN_SECRET_BYTES",
    "PrivateFiles",
    "load_secret",
    "resolve_secret",
    "secret_for_workers",
    "secret_path",
    "write_new_file",
]

ENV_SECRET = "OZWELL_SECRET"
MIN_SECRET_BYTES = 16
SECRET_FILE = row(ServeConfig, "secret_file")


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


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) with mode 0600 and ``data``, flushed to disk."""
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
        write_new_file(tmp, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass  # no hard links here: fall back to an exclusive create of the file itself
        finally:
            tmp.unlink(missing_ok=True)
        write_new_file(path, data)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise CLIError(f"cannot create the secret file {path}: {exc.strerror or exc}") from exc


def secret_path(secret_file: str | None) -> Path | None:
    """The file the secret is read from, or ``None`` when it is ``OZWELL_SECRET``'s value (see resolve_secret)."""
    if os.environ.get(ENV_SECRET) and not secret_file:  # an explicit --secret-file wins, like every other flag
        return None
    return Path(resolve_one(SECRET_FILE, secret_file or None))


def resolve_secret(secret_file: str | None = None, *, create: bool) -> str:
    """The key-hashing secret: ``--secret-file`` if given, else ``OZWELL_SECRET`` if set, else a secret file's.

    The file is ``secret_file``, else ``OZWELL_SECRET_FILE``, else ``./ozwell.secret``. When it does not exist and
    ``create`` is true, a new one is made (32 random bytes as hex, mode 0600) and a note goes to stderr; otherwise
    that is an error. Raises :class:`CLIError`.
    """
    path = secret_path(secret_file)
    if path is None:
        return _secret_from_text(os.environ[ENV_SECRET], ENV_SECRET)
    if not path.exists():
        if not create:
            raise CLIError(f"the secret file {path} does not exist and {ENV_SECRET} is not set")
        if not path.parent.is_dir():
            raise CLIError(f"cannot create the secret file {path}: its directory does not exist")
        if _create_secret_file(path):
            print(f"{PROG}: created a new key-hashing secret in {path} (mode 0600); keep it safe", file=sys.stderr)
    return _read_secret_file(path)


def load_secret(secret_file: str | os.PathLike[str] | None = None) -> str:
    """The key-hashing secret the ``ozwell-asgi`` commands use, for an app that mounts :class:`OzwellAPI` itself
    over the same key store: ``OzwellAPI(key_store=..., secret=load_secret())``.

    Resolved exactly as the commands resolve it: ``secret_file`` (their ``--secret-file``) if given, else
    ``OZWELL_SECRET`` if set, else the file ``OZWELL_SECRET_FILE`` names, else ``./ozwell.secret``. Whitespace around
    the secret (a file's trailing newline) is ignored, as the commands ignore it, so keys they made authenticate.
    Never creates a secret: ``ValueError`` when there is none, or it is shorter than 16 bytes.
    """
    try:
        return resolve_secret(None if secret_file is None else os.fspath(secret_file), create=False)
    except CLIError as exc:
        raise ValueError(str(exc)) from None


class PrivateFiles:
    """Files only this user can read (0600, in a 0700 temporary directory made on first use), removed by
    ``cleanup``: how secrets reach worker processes without entering their environment."""

    def __init__(self, cleanup: contextlib.ExitStack) -> None:
        self._cleanup = cleanup
        self._directory: Path | None = None

    def write(self, name: str, value: str) -> str:
        """The absolute path of a new private file ``name`` holding ``value`` and a newline."""
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="ozwell-serve-"))
            self._cleanup.callback(shutil.rmtree, self._directory, ignore_errors=True)
        path = self._directory / name
        write_new_file(path, (value + "\n").encode())
        return str(path)


def secret_for_workers(secret_file: str | None, secret: str, private: PrivateFiles) -> str:
    """The absolute path of a file holding ``secret`` for workers to read: the secret file itself, or, when the
    secret came from ``OZWELL_SECRET``, a private copy."""
    path = secret_path(secret_file)
    if path is not None:
        return str(path.resolve())
    return private.write("secret", secret)
