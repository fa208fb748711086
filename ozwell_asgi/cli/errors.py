"""How the command line fails: one line on stderr and an exit status (2: bad arguments, 1: a failure)."""

from __future__ import annotations

import argparse
from typing import NoReturn

PROG = "ozwell-asgi"


class CLIError(Exception):
    """A failure reported as one line on stderr; ``status`` is the exit code (2: bad arguments, 1: failure)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def usage_error(message: str) -> CLIError:
    """A bad argument or environment variable: exit status 2."""
    return CLIError(message, status=2)


def first_line(text: str, limit: int = 300) -> str:
    """The first line of ``text``, at most ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
