"""The official OpenAI Node SDK's Responses API (tests/node/responses_check.mjs) against a real uvicorn server:
create, the stream helper (text deltas, ``finalResponse()``), raw events, retrieve, input items, background and
cancel, delete. Skipped (or failed under OZWELL_TEST_REQUIRE_SERVICES=1) without node and npm, as
tests/test_node_sdk.py is."""

from __future__ import annotations

import json
import os
import subprocess

import anyio
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from tests.harness import uvicorn_server
from tests.test_node_sdk import NODE_DIR, _node_with_sdk

pytestmark = pytest.mark.slow


def test_node_sdk_responses() -> None:
    node = _node_with_sdk()
    api = OzwellAPI(secret="s" * 32)

    async def create() -> str:
        return (await api.keys.create(name="node-sdk", owner="o", rpm=1000))[1]

    key = anyio.run(create)
    with uvicorn_server(PrefixedApp(api)) as url:
        env = {**os.environ, "OZWELL_BASE_URL": url + "/v1", "OZWELL_API_KEY": key, "NO_COLOR": "1"}
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_LOG"):
            env.pop(name, None)
        done = subprocess.run(
            [node, "responses_check.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 0, f"responses_check.mjs exited {done.returncode}\n{done.stderr}\n{done.stdout}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    checks = {check["name"]: check["detail"] for check in summary["checks"]}
    assert list(checks) == [
        "responses.create",
        "responses.stream",
        "responses.create stream: true",
        "responses.retrieve and inputItems.list",
        "background and cancel",
        "responses.delete",
    ]
    assert checks["responses.create"]["text"] == "hello from node"
    assert checks["responses.stream"]["text"] == "streamed through node"
    assert checks["responses.stream"]["previous"] == checks["responses.create"]["id"]
    assert checks["responses.create stream: true"]["text"] == "raw events"
    assert checks["responses.retrieve and inputItems.list"]["text"] == "streamed through node"
    assert checks["background and cancel"] == {
        "status": "completed",
        "text": "in the background",
        "after_cancel": "completed",
    }
    assert checks["responses.delete"] == {"status": 404, "code": "response_not_found"}
