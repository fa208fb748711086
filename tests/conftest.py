"""Shared fixtures: the machine's real Redis and PostgreSQL, isolated per test.

A test that needs a service it cannot reach is skipped with the reason, unless OZWELL_TEST_REQUIRE_SERVICES=1
(set by .ci/run), where it fails instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.redis_server import PrivateRedis, running_private_redis

REDIS_HOST = os.environ.get("OZWELL_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("OZWELL_TEST_REDIS_PORT", "6379"))
PG_HOST = os.environ.get("OZWELL_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("OZWELL_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("OZWELL_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("OZWELL_TEST_PG_DB", "test")

REQUIRE_SERVICES = os.environ.get("OZWELL_TEST_REQUIRE_SERVICES") == "1"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    """Skip (or, with OZWELL_TEST_REQUIRE_SERVICES=1, fail) when ``host:port`` does not answer."""
    if _reachable(host, port):
        return
    reason = f"{name} is not reachable at {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}, and OZWELL_TEST_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A throwaway ``redis-server`` on a spare port that the test may stop, freeze and restart."""
    with running_private_redis() as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix private to this test; keys under it are deleted afterwards by ``redis_url``."""
    return f"ozwell-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_url(redis_prefix: str) -> Iterator[str]:
    """``redis://`` URL of the machine's Redis. Tests must namespace their keys with ``redis_prefix``."""
    need_service("Redis", REDIS_HOST, REDIS_PORT)
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
    yield url
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{redis_prefix}*", count=1000))
        # limits namespaces its own keys as LIMITS:<our key>, so clean those too.
        keys += list(client.scan_iter(match=f"LIMITS:{redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """``postgresql+asyncpg://`` URL of a database created for this test and dropped after it."""
    need_service("PostgreSQL", PG_HOST, PG_PORT)
    import asyncpg

    name = f"ozwell_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
