"""An S3-compatible server on a spare loopback port: moto's server mode, run as a child process.

Without moto (``pip install 'moto[server]'``, in the ``dev`` extra) a test that needs it is skipped with the reason,
unless OZWELL_TEST_REQUIRE_SERVICES=1, where it fails instead.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.redis_server import free_port

REQUIRE_SERVICES = os.environ.get("OZWELL_TEST_REQUIRE_SERVICES") == "1"
REGION = "us-east-1"
# moto takes any credentials; these are what the tests put in the environment.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ozwell-test", "AWS_SECRET_ACCESS_KEY": "ozwell-test-secret"}

__all__ = ["CREDENTIALS", "REGION", "MotoServer", "need_moto", "running_moto_server"]


def need_moto() -> None:
    """Skip (or, with OZWELL_TEST_REQUIRE_SERVICES=1, fail) when moto's server mode is not installed."""
    if importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None:
        return
    reason = "moto[server] is not installed (pip install 'moto[server]')"
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}, and OZWELL_TEST_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)


class MotoServer:
    """A running moto server: its endpoint, and a boto3 client to make buckets and look behind the store's back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        import boto3

        self.client: Any = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def new_bucket(self) -> str:
        """A fresh, empty bucket."""
        name = f"ozwell-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket``."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def pending_uploads(self, bucket: str) -> list[str]:
        """The keys of the multipart uploads begun and neither completed nor aborted in ``bucket``."""
        return [upload["Key"] for upload in self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@contextmanager
def running_moto_server() -> Iterator[MotoServer]:
    """moto's S3 server on a spare loopback port for the duration of the block."""
    need_moto()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start on port {port}") from None
                time.sleep(0.05)
        yield MotoServer(port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
