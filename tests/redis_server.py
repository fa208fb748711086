"""A throwaway ``redis-server`` on a spare loopback port, which outage tests stop, freeze and start again."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

REQUIRE_SERVICES = os.environ.get("OZWELL_TEST_REQUIRE_SERVICES") == "1"

__all__ = ["PrivateRedis", "free_port", "running_private_redis"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A throwaway ``redis-server`` on a fixed port, which a test can stop, freeze and start again."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def running_private_redis() -> Iterator[PrivateRedis]:
    """A started :class:`PrivateRedis`, killed on exit; skips (or fails, under OZWELL_TEST_REQUIRE_SERVICES=1)
    when ``redis-server`` is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        if REQUIRE_SERVICES:
            pytest.fail("redis-server is not installed, and OZWELL_TEST_REQUIRE_SERVICES=1 requires it")
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(binary, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
