"""The official OpenAI Node SDK (npm ``openai``), unchanged, against a real uvicorn server: tests/node/sdk_check.mjs.

Needs ``node`` and ``npm``; installs tests/node/node_modules with ``npm ci`` when missing. Without them the test is
skipped with the reason, unless OZWELL_TEST_REQUIRE_SERVICES=1 (set by .ci/run), where it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import anyio
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from tests.harness import uvicorn_server

pytestmark = pytest.mark.slow

NODE_DIR = Path(__file__).parent / "node"
REQUIRE_SERVICES = os.environ.get("OZWELL_TEST_REQUIRE_SERVICES") == "1"
EXPECTED_CHECKS = [
    "chat.completions.create",
    "chat.completions.create stream",
    "models.list",
    "models.retrieve",
    "unknown model → NotFoundError",
    "bad key → AuthenticationError",
    "forced tool call",
    "streamed tool call arguments",
    "embeddings.create",
    "x-request-id via withResponse/asResponse",
    "files.create",
    "files.create streamed, fields after the file",
    "files.list auto-pagination",
    "files.retrieve",
    "files.content",
    "files.delete",
]


def _unavailable(reason: str) -> NoReturn:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}, and OZWELL_TEST_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)


def _node_with_sdk() -> str:
    """The ``node`` executable, with the SDK installed in tests/node (``npm ci`` if needed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm are needed to run the OpenAI Node SDK check")
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").is_file():
        try:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            _unavailable(f"`npm ci` in {NODE_DIR} timed out after 300 s")
        if done.returncode != 0:
            _unavailable(f"`npm ci` in {NODE_DIR} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return node


def _make_key(api: OzwellAPI) -> str:
    async def create() -> str:
        return (await api.keys.create(name="node-sdk", owner="o", rpm=1000))[1]

    return anyio.run(create)


def test_openai_node_sdk() -> None:
    node = _node_with_sdk()
    api = OzwellAPI(secret="s" * 32)
    key = _make_key(api)
    with uvicorn_server(PrefixedApp(api)) as url:
        env = {**os.environ, "OZWELL_BASE_URL": url + "/v1", "OZWELL_API_KEY": key, "NO_COLOR": "1"}
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_LOG"):
            env.pop(name, None)
        done = subprocess.run(
            [node, "sdk_check.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    output = f"stderr:\n{done.stderr}\nstdout:\n{done.stdout}"
    assert done.returncode == 0, f"sdk_check.mjs exited {done.returncode}\n{output}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["openai"]
    assert summary["sdk_version"].split(".")[0] == pinned.lstrip("^~").split(".")[0]
    checks = {check["name"]: check["detail"] for check in summary["checks"]}
    assert list(checks) == EXPECTED_CHECKS
    assert all(check["ok"] for check in summary["checks"])
    assert checks["chat.completions.create"]["usage"]["total_tokens"] > 0
    assert checks["chat.completions.create stream"]["content"] == "streamed through the node sdk"
    assert "echo" in checks["models.list"]["ids"]
    assert checks["unknown model → NotFoundError"]["code"] == "model_not_found"
    assert checks["bad key → AuthenticationError"]["status"] == 401
    assert checks["forced tool call"]["arguments"]["city"] == "Paris"
    assert checks["streamed tool call arguments"]["arguments"] == {"city": "Lyon"}
    assert checks["embeddings.create"]["dimensions"] == 8
    assert checks["x-request-id via withResponse/asResponse"]["request_id"].startswith("req_")
    assert checks["files.create"]["purpose"] == "fine-tune"
    assert checks["files.create streamed, fields after the file"] == {"bytes": 300_000, "expires_in": 3600}
    assert checks["files.list auto-pagination"]["listed"] == 5
    assert checks["files.content"]["bytes"] == checks["files.create"]["bytes"]
    assert checks["files.delete"] == {"status": 404, "code": "file_not_found"}
