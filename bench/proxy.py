"""What the proxy costs: ``OzwellAPI(backend=OpenAICompatibleBackend(...))`` in front of another ozwell-asgi,
against calling that upstream directly, side by side in one run.

    python bench/proxy.py                      # non-streaming and streaming chat
    python bench/proxy.py --rounds 5 --seconds 6

The upstream is ``ozwell-asgi serve`` (echo backend, SQLite key store, in-memory limiter); the proxy is the same app
with the OpenAI-compatible backend pointed at the upstream, under the same uvicorn settings, sharing the key store
(one enterprise key with huge budgets works on both; each side still counts every request). ``wrk`` drives both
with the same request, alternating rounds so drift hits both equally:

- added latency: ``wrk -c1 --latency`` (one request at a time), p50 and p99 through the proxy minus direct;
- throughput: ``wrk -c16``, proxy / direct requests per second.

Every answer is checked once first (the proxy must answer exactly as the upstream does), and any non-2xx answer
during a round fails the run. Goal: under 1 ms added at p50, at least 0.7x the direct throughput. On one machine
the proxy and the upstream share the CPUs (the proxied request costs both processes' work), so throughput is
bounded by the cores there are, not by the proxy alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import Servers, body, check, free_port  # noqa: E402

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def proxy_app() -> Any:
    """uvicorn factory (``bench.proxy:proxy_app``): the proxy, configured by ``BENCH_*`` and ``OZWELL_SECRET``."""
    from ozwell_asgi import OzwellAPI
    from ozwell_asgi.backends.openai_compatible import OpenAICompatibleBackend
    from ozwell_asgi.cli import _ServedApp
    from ozwell_asgi.ratelimit import LimitsRateLimiter

    backend = OpenAICompatibleBackend(os.environ["BENCH_UPSTREAM"], os.environ["BENCH_UPSTREAM_KEY"])
    limiter = LimitsRateLimiter("memory://")
    api = OzwellAPI(
        backend=backend, key_store=os.environ["BENCH_STORE"], rate_limiter=limiter, secret=os.environ["OZWELL_SECRET"]
    )
    return _ServedApp(api, limiter)


def wrk(url: str, key: str, stream: bool, seconds: int, connections: int, workdir: Path) -> dict[str, float]:
    """One wrk round: requests/second, and the p50/p99 latency in milliseconds."""
    script = workdir / f"proxy-{'stream' if stream else 'plain'}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body(stream))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"errors during the run against {url}:\n{out}")
    found: dict[str, float] = {}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    for name, pattern in (("p50", r"^\s*50%\s+([\d.]+)(us|ms|s)\s*$"), ("p99", r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$")):
        match = re.search(pattern, out, re.MULTILINE)
        if match is None or rps is None:
            raise RuntimeError(out)
        found[name] = float(match.group(1)) * _UNITS[match.group(2)]
    found["rps"] = float(rps.group(1))  # type: ignore[union-attr]
    return found


def measure(direct: str, proxy: str, key: str, stream: bool, args: argparse.Namespace, workdir: Path) -> dict:
    """Latency rounds (one connection) first, then throughput rounds, each alternating who goes first."""
    check(direct, key, stream)
    check(proxy, key, stream)
    runs: dict[str, dict[str, list[float]]] = {side: {"p50": [], "p99": [], "rps": []} for side in ("direct", "proxy")}
    for connections in (1, args.connections):
        for url in (direct, proxy):  # warm both: connections, caches, the upstream pool
            wrk(url, key, stream, 1, connections, workdir)
        for i in range(args.rounds):
            order = [("direct", direct), ("proxy", proxy)]
            for side, url in order if i % 2 == 0 else reversed(order):
                result = wrk(url, key, stream, args.seconds, connections, workdir)
                if connections == 1:
                    runs[side]["p50"].append(result["p50"])
                    runs[side]["p99"].append(result["p99"])
                else:
                    runs[side]["rps"].append(result["rps"])
    d, p = runs["direct"], runs["proxy"]
    return {
        "direct_p50_ms": round(statistics.median(d["p50"]), 3),
        "proxy_p50_ms": round(statistics.median(p["p50"]), 3),
        "added_p50_ms": round(statistics.median(p["p50"]) - statistics.median(d["p50"]), 3),
        "direct_p99_ms": round(statistics.median(d["p99"]), 3),
        "proxy_p99_ms": round(statistics.median(p["p99"]), 3),
        "added_p99_ms": round(statistics.median(p["p99"]) - statistics.median(d["p99"]), 3),
        "direct_rps": round(sum(d["rps"]) / len(d["rps"])),
        "proxy_rps": round(sum(p["rps"]) / len(p["rps"])),
        "throughput_ratio": round(sum(p["rps"]) / sum(d["rps"]), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is required: apt-get install wrk", file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        servers = Servers(workdir)
        try:
            key = servers.cli(
                "keys", "create", "--name", "bench", "--plan", "enterprise", "--rpm", "1000000000",
                "--tpm", "1000000000000", "--store", servers.store,
            )  # fmt: skip
            upstream = f"http://127.0.0.1:{servers.serve()}/v1"
            port = free_port()
            env = {**servers.env, "BENCH_UPSTREAM": upstream, "BENCH_UPSTREAM_KEY": key, "BENCH_STORE": servers.store}
            # The uvicorn settings `ozwell-asgi serve` uses by default (ozwell_asgi/cli.py): log level info.
            cmd = [sys.executable, "-m", "uvicorn", "bench.proxy:proxy_app", "--factory", "--port", str(port)]
            servers.start([*cmd, "--log-level", "info", "--lifespan", "on"], port, env)
            proxy = f"http://127.0.0.1:{port}/v1/chat/completions"
            for stream in (False, True):
                name = "streaming" if stream else "non-streaming"
                r = results[name] = measure(upstream + "/chat/completions", proxy, key, stream, args, workdir)
                print(
                    f"{name:>14}: added p50 {r['added_p50_ms']:.3f} ms (direct {r['direct_p50_ms']:.3f}), "
                    f"added p99 {r['added_p99_ms']:.3f} ms (direct {r['direct_p99_ms']:.3f}); "
                    f"proxy {r['proxy_rps']} req/s, direct {r['direct_rps']} req/s, ratio {r['throughput_ratio']:.3f}",
                    flush=True,
                )
        finally:
            servers.stop()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
