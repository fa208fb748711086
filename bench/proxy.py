"""What the proxy costs: ``OzwellAPI(backend=OpenAICompatibleBackend(...))`` in front of an upstream, against calling
that upstream directly, side by side in one run, in two cases:

- ``echo`` (CPU-bound): the upstream is ``ozwell-asgi serve`` with the echo backend, which answers at once. Proxy,
  upstream and ``wrk`` share the machine's cores, so a proxied request costs the proxy's CPU on top of the upstream's:
  the throughput ratio measures the proxy's CPU per request against the upstream's, not what a deployment sees.
- ``model`` (latency-bound): the upstream is ``bench/model_server.py``, paced like a model server (first token after
  ``--ttft-ms``, then ``--tokens`` tokens ``--interval-ms`` apart). The upstream's time dominates, as it does in a
  deployment: added latency and the throughput ratio are what a client of the proxy sees.

    python bench/proxy.py                          # both cases, non-streaming and streaming chat
    python bench/proxy.py --rounds 5 --seconds 6
    python bench/proxy.py --cpu                    # the backend's CPU per call, in-process (no wrk)
    python bench/proxy.py --cpu --against main     # ... and main's, runs alternating in one process

The proxy is the app with the OpenAI-compatible backend pointed at the upstream (``bench.proxy:proxy_app``), under
the uvicorn settings ``serve`` uses, with its own key store (the ``echo`` upstream shares it: one enterprise key with
huge budgets works on both, and each side still authenticates, validates, counts and rate-limits every request; the
model server takes the same key as its bearer token). ``wrk`` drives both sides with the same request, alternating
rounds so drift hits both equally. Every answer is checked once first, and a non-2xx answer during a round fails the
run. Added latency (p50, p99) comes from ``wrk -c1 --latency`` rounds (one request at a time) in both cases, and for
``model`` also from the ``-c16`` rounds (the proxy serving 16 requests at once; each connection pauses a random 0 to
``--think-ms`` ms between requests, so that they do not stay in step); throughput from ``wrk -c16`` rounds,
during which the CPU time of the upstream, the proxy and wrk is read from /proc, per request. Goal: under 1 ms added
at p50, at least 0.7x the direct throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import MESSAGE, Servers, free_port  # noqa: E402

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
MODEL = "bench-model"  # bench/model_server.py's


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


def body(model: str, stream: bool) -> str:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": MESSAGE}], "stream": stream})


def check(url: str, key: str, model: str, stream: bool) -> str:
    """One answer, checked: a complete chat.completion or event stream. Returns its text."""
    request = urllib.request.Request(
        url,
        data=body(model, stream).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read().decode()
    if not stream:
        return str(json.loads(raw)["choices"][0]["message"]["content"])
    assert raw.rstrip().endswith("data: [DONE]"), raw[-200:]
    pieces = []
    for line in raw.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            pieces += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return "".join(pieces)


def cpu_seconds(pid: int) -> float:
    """The CPU time a running process has used (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_cpu_seconds() -> float:
    """The CPU time used by the wrk runs so far (children waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(
    url: str, key: str, model: str, stream: bool, seconds: int, connections: int, workdir: Path, think_ms: int = 0
) -> dict[str, float]:
    """One wrk round: requests/second, the p50/p99 latency in milliseconds, and the requests made. ``think_ms``: each
    connection waits a random 0 to ``think_ms`` ms before its next request (not counted in the latency)."""
    script = workdir / f"proxy-{model}-{'stream' if stream else 'plain'}-{think_ms}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body(model, stream))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        + (f"function delay() return math.random(0, {think_ms}) end\n" if think_ms else "")
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
    total = re.search(r"(\d+) requests in", out)
    if total is None:
        raise RuntimeError(out)
    found["requests"] = float(total.group(1))
    return found


def measure(
    direct: str,
    proxy: str,
    pids: tuple[int, int],
    key: str,
    model: str,
    stream: bool,
    plan: list[tuple[int, bool, bool, int]],
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, float]:
    """Rounds at each (connections, take latency, take throughput, think ms) of ``plan``, alternating who goes
    first: the p50 and p99 latency at that number of connections (``c1_added_p50_ms`` ...); in the throughput
    rounds, requests per second and the CPU time the upstream, the proxy and wrk use per request (``pids``: upstream,
    proxy)."""
    assert check(direct, key, model, stream) == check(proxy, key, model, stream)  # the proxy answers as the upstream
    found: dict[str, float] = {}
    rps: dict[str, list[float]] = {"direct": [], "proxy": []}
    cpu = {f"{who}_{side}": 0.0 for who in ("upstream", "proxy", "wrk") for side in ("direct", "proxy")}
    requests = {"direct": 0.0, "proxy": 0.0}
    for connections, take_latency, throughput, think_ms in plan:
        for url in (direct, proxy):  # warm both: connections, caches, the upstream pool
            wrk(url, key, model, stream, 1, connections, workdir, think_ms)
        latency: dict[str, list[float]] = {f"{side}_{q}": [] for side in ("direct", "proxy") for q in ("p50", "p99")}
        for i in range(args.rounds):
            order = [("direct", direct), ("proxy", proxy)]
            for side, url in order if i % 2 == 0 else reversed(order):
                before = (cpu_seconds(pids[0]), cpu_seconds(pids[1]), wrk_cpu_seconds())
                result = wrk(url, key, model, stream, args.seconds, connections, workdir, think_ms)
                after = (cpu_seconds(pids[0]), cpu_seconds(pids[1]), wrk_cpu_seconds())
                latency[f"{side}_p50"].append(result["p50"])
                latency[f"{side}_p99"].append(result["p99"])
                if throughput:
                    rps[side].append(result["rps"])
                    requests[side] += result["requests"]
                    for who, spent_after, spent_before in zip(("upstream", "proxy", "wrk"), after, before, strict=True):
                        cpu[f"{who}_{side}"] += spent_after - spent_before
        for q in ("p50", "p99") if take_latency else ():
            d, p = statistics.median(latency[f"direct_{q}"]), statistics.median(latency[f"proxy_{q}"])
            found[f"c{connections}_direct_{q}_ms"] = round(d, 3)
            found[f"c{connections}_proxy_{q}_ms"] = round(p, 3)
            found[f"c{connections}_added_{q}_ms"] = round(p - d, 3)
    found["direct_rps"] = round(sum(rps["direct"]) / len(rps["direct"]), 1)
    found["proxy_rps"] = round(sum(rps["proxy"]) / len(rps["proxy"]), 1)
    found["throughput_ratio"] = round(sum(rps["proxy"]) / sum(rps["direct"]), 3)
    for name, spent in cpu.items():
        if name != "proxy_direct":  # the proxy idles while the upstream is called directly
            found[f"cpu_ms_{name}"] = round(spent / requests[name.rpartition("_")[2]] * 1000, 3)
    return found


def report(case: str, name: str, r: dict[str, float]) -> str:
    lines = [f"{case} {name}:"]
    for connections in sorted({int(k[1:].partition("_")[0]) for k in r if k.startswith("c") and k[1].isdigit()}):
        c = f"c{connections}_"
        lines.append(
            f"  {connections:>3} connection(s): added p50 {r[c + 'added_p50_ms']:.3f} ms (direct "
            f"{r[c + 'direct_p50_ms']:.3f}), added p99 {r[c + 'added_p99_ms']:.3f} ms (direct "
            f"{r[c + 'direct_p99_ms']:.3f})"
        )
    lines.append(
        f"  throughput: proxy {r['proxy_rps']:.0f} req/s, direct {r['direct_rps']:.0f} req/s, ratio "
        f"{r['throughput_ratio']:.3f}"
    )
    lines.append(
        f"  CPU ms per request: upstream {r['cpu_ms_upstream_direct']:.3f} (direct) / "
        f"{r['cpu_ms_upstream_proxy']:.3f} (proxied), proxy {r['cpu_ms_proxy_proxy']:.3f}, wrk "
        f"{r['cpu_ms_wrk_direct']:.3f} / {r['cpu_ms_wrk_proxy']:.3f}"
    )
    return "\n".join(lines)


def start_proxy(servers: Servers, upstream: str, key: str) -> str:
    """The proxy in front of ``upstream``, under the uvicorn settings ``serve`` uses; its process is the last one of
    ``servers.procs``."""
    port = free_port()
    env = {**servers.env, "BENCH_UPSTREAM": upstream, "BENCH_UPSTREAM_KEY": key, "BENCH_STORE": servers.store}
    # The uvicorn settings `ozwell-asgi serve` uses by default (ozwell_asgi/cli.py): log level info.
    cmd = [sys.executable, "-m", "uvicorn", "bench.proxy:proxy_app", "--factory", "--port", str(port)]
    servers.start([*cmd, "--log-level", "info", "--lifespan", "on"], port, env)
    return f"http://127.0.0.1:{port}/v1/chat/completions"


def start_model_server(servers: Servers, key: str, ttft: float, tokens: int, interval: float) -> str:
    port = free_port()
    env = {**servers.env, "BENCH_KEY": key, "BENCH_TTFT": str(ttft), "BENCH_TOKENS": str(tokens)}
    env["BENCH_INTERVAL"] = str(interval)
    cmd = [sys.executable, "-m", "uvicorn", "bench.model_server:app", "--port", str(port), "--log-level", "info"]
    servers.start(cmd, port, env)
    return f"http://127.0.0.1:{port}/v1"


def run_wrk(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        servers = Servers(workdir)
        try:
            key = servers.cli(
                "keys", "create", "--name", "bench", "--plan", "enterprise", "--rpm", "1000000000",
                "--tpm", "1000000000000", "--store", servers.store,
            )  # fmt: skip
            cases = []
            if "echo" in args.cases:
                echo = f"http://127.0.0.1:{servers.serve()}/v1"
                # Saturated at 16 connections: latency there is queueing, only the throughput is taken.
                plan = [(1, True, False, 0), (args.connections, False, True, 0)]
                cases.append(("echo", echo, servers.procs[-1].pid, "echo", plan))
            if "model" in args.cases:
                model = start_model_server(servers, key, args.ttft_ms / 1000, args.tokens, args.interval_ms / 1000)
                # Every answer takes the same time: without a random pause between a connection's requests, the 16
                # would stay in step and reach the proxy in bursts of 16, which real clients do not.
                plan = [(1, True, False, 0), (args.connections, True, True, args.think_ms)]
                cases.append(("model", model, servers.procs[-1].pid, MODEL, plan))
            for case, upstream, upstream_pid, model_name, plan in cases:
                proxy = start_proxy(servers, upstream, key)
                pids = (upstream_pid, servers.procs[-1].pid)
                results[case] = {}
                for stream in (False, True):
                    name = "stream" if stream else "non-stream"
                    direct = upstream + "/chat/completions"
                    r = results[case][name] = measure(direct, proxy, pids, key, model_name, stream, plan, args, workdir)
                    print(report(case, name, r), flush=True)
        finally:
            servers.stop()
    return results


# -- CPU per backend call, in-process ------------------------------------------------------------------------------


_CPU_MODES = (
    ("non-stream c1", False, 1, False),
    ("non-stream c16", False, 16, False),
    ("stream c1", True, 1, False),
    ("stream c16", True, 16, False),
    ("stream c16 paced", True, 16, True),
)


def _versions(revisions: list[str], tmp: Path) -> dict[str, tuple[Any, Any, Any]]:
    """The working tree's package, and each revision's (from ``git archive``, imported under another name): the
    backend, types and chat wire modules of each."""
    names = ("backends.openai_compatible", "types", "wire.chat")
    versions = {"working tree": tuple(importlib.import_module(f"ozwell_asgi.{m}") for m in names)}
    for i, revision in enumerate(revisions):
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "ozwell_asgi"],
            capture_output=True,
            check=True,
        ).stdout
        dest = tmp / f"revision{i}"
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        (dest / "ozwell_asgi").rename(dest / f"ozwell_asgi_{i}")
        sys.path.insert(0, str(dest))
        versions[revision] = tuple(importlib.import_module(f"ozwell_asgi_{i}.{m}") for m in names)
    return versions


async def _cpu(
    urls: tuple[str, str], versions: dict[str, tuple[Any, Any, Any]], calls: int, reps: int
) -> dict[str, dict[str, dict[str, float]]]:
    """CPU milliseconds per backend call of each version, runs alternating between versions: the least of ``reps``
    runs of ``calls`` (other work on the machine only ever adds to it), and the median. ``urls``: the model server
    answering at once, and the one pacing its tokens."""
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in versions}
    backends = {name: oc.OpenAICompatibleBackend(urls[0], "bench") for name, (oc, _, _) in versions.items()}
    paced = {name: oc.OpenAICompatibleBackend(urls[1], "bench") for name, (oc, _, _) in versions.items()}
    try:
        for mode, stream, concurrency, is_paced in _CPU_MODES:
            samples: dict[str, list[float]] = {name: [] for name in versions}
            for rep in range(reps + 1):  # the first round warms: connections, caches
                for name, (_, types, chat) in versions.items():
                    backend = (paced if is_paced else backends)[name]
                    request = chat.parse_chat_request(body(MODEL, stream))
                    principal = types.Principal(key_id="k", owner="o", plan="enterprise", quota=types.Quota(None, None))

                    async def worker(n: int, backend: Any = backend, request: Any = request, types: Any = types,
                                     principal: Any = principal, stream: bool = stream) -> None:  # fmt: skip
                        for _ in range(n):
                            call = types.Call(
                                request_id="req_bench",
                                principal=principal,
                                endpoint="chat.completions",
                                max_tokens=1024,
                            )
                            if stream:
                                async for _ in backend.stream_chat(request, call):
                                    pass
                            else:
                                await backend.complete_chat(request, call)

                    count = calls // concurrency
                    start = time.process_time()
                    await asyncio.gather(*(worker(count) for _ in range(concurrency)))
                    if rep:
                        samples[name].append((time.process_time() - start) / (count * concurrency) * 1000)
            for name, values in samples.items():
                results[name][mode] = {"min": round(min(values), 3), "median": round(statistics.median(values), 3)}
                print(f"{mode:>16}  {name:>14}: {min(values):.3f} ms CPU per call (min of {reps} runs of {calls}; "
                      f"median {statistics.median(values):.3f})", flush=True)  # fmt: skip
    finally:
        for backend in (*backends.values(), *paced.values()):
            await backend.aclose()
    return results


def run_cpu(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """The backend's CPU per call against bench/model_server.py in another process: answering at once (8 tokens),
    and pacing 32 tokens 2 ms apart (each chunk then arrives on its own: the cost per chunk)."""
    with tempfile.TemporaryDirectory() as tmp:
        servers = Servers(Path(tmp))
        try:
            versions = _versions(args.against, Path(tmp))
            urls = (
                start_model_server(servers, "bench", 0.0, 8, 0.0),
                start_model_server(servers, "bench", 0.0, 32, 0.002),
            )
            return asyncio.run(_cpu(urls, versions, args.calls, args.rounds))
        finally:
            servers.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--cases", default="echo,model", help="comma-separated: echo, model")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="model server: time to the first token")
    parser.add_argument("--tokens", type=int, default=32, help="model server: tokens per answer")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="model server: time between tokens")
    parser.add_argument(
        "--think-ms", type=int, default=20, help="model, many connections: most random pause between requests"
    )
    parser.add_argument("--cpu", action="store_true", help="only the backend's CPU per call, in-process")
    parser.add_argument("--calls", type=int, default=400, help="--cpu: calls per run")
    parser.add_argument(
        "--against", action="append", default=[], metavar="REV", help="--cpu: also measure this git revision"
    )
    args = parser.parse_args()
    if args.cpu:
        print(json.dumps(run_cpu(args)))
        return 0
    if not shutil.which("wrk"):
        print("wrk is required: apt-get install wrk", file=sys.stderr)
        return 2
    print(json.dumps(run_wrk(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
