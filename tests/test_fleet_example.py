"""examples/fleet.sh in its check mode: two `ozwell-asgi serve` hosts on one PostgreSQL and one Redis admit exactly
the key's rpm between them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio.to_thread
import pytest

from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "fleet.sh"


def run_fleet(env: dict[str, str], cwd: Path, timeout: float = 120) -> tuple[int, str, str]:
    """``bash examples/fleet.sh`` in its own process group, killed whole if it overruns ``timeout``."""
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"fleet.sh did not finish within {timeout:g} s:\n{out}\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.anyio
async def test_fleet_check_admits_exactly_the_rpm(
    tmp_path: Path, postgres_url: str, redis_url: str, redis_prefix: str
) -> None:
    ports = [free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OZWELL_")}
    env.update(
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        PYTHONPATH=str(ROOT),
        OZWELL_ASGI=f"{sys.executable} -m ozwell_asgi",
        OZWELL_FLEET_CHECK="1",
        OZWELL_FLEET_PG=postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1),
        OZWELL_FLEET_REDIS=redis_url,
        OZWELL_FLEET_PORTS=" ".join(map(str, ports)),
        OZWELL_LIMITER_NAMESPACE=redis_prefix + "fleet",
    )
    # Windows are clock-aligned minutes; start well clear of a boundary (the script guards its burst too).
    into = time.time() % 60
    if into > 55:
        await anyio.sleep(60 - into + 0.5)

    code, out, err = await anyio.to_thread.run_sync(run_fleet, env, tmp_path)

    assert code == 0, f"stdout:\n{out}\nstderr:\n{err[-3000:]}"
    lines = [line for line in out.splitlines() if line.startswith("request ")]
    expected_ports = [ports[i % 2] for i in range(8)]
    assert [line.split(" -> port ")[1].split(":")[0] for line in lines] == [str(p) for p in expected_ports]
    statuses = [line.rsplit(": ", 1)[1] for line in lines]
    assert statuses == ["200"] * 5 + ["429"] * 3
    assert out.splitlines()[-1] == "OK: 5 x 200 and 3 x 429 across 2 hosts"
    # the hosts shared the OZWELL_SECRET the script exported: no secret file was made
    assert not await anyio.to_thread.run_sync((tmp_path / "ozwell.secret").exists)
