"""Throughput of ``ozwell-asgi serve`` against a bare Starlette route, side by side, as ratios.

    python bench/run.py                 # non-streaming and streaming chat: ozwell / bare
    python bench/run.py --limiters      # also: Redis limiter / in-memory limiter (needs Redis on 127.0.0.1:6379)
    python bench/run.py --against DIR   # also: this tree's serve / the serve of another source tree (A/B a change)

Both servers run under the same uvicorn (one worker each, same flags, access log off) on loopback; ``wrk`` (Debian
package ``wrk``) drives them with the same request (``-t1 -c32``), alternating rounds so drift hits both equally.
Every response is checked once for correctness first, and any non-2xx answer during a round fails the run. Figures
are requests/second; the result that matters is the ratio, not the absolute numbers (they depend on the machine):
the median of the per-round ratios (each round pairs one run of each side), and the ratio of the totals. Beside
them, each server's CPU time per request (from /proc, Linux): the least noisy figure on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = "Hello, Ozwell! How are you today?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def body(stream: bool) -> str:
    return json.dumps({"model": "echo", "messages": [{"role": "user", "content": MESSAGE}], "stream": stream})


def check(url: str, key: str, stream: bool) -> None:
    request = urllib.request.Request(
        url,
        data=body(stream).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    if stream:
        assert text.rstrip().endswith("data: [DONE]"), text[-200:]
        assert "Ozwell!" in text, text[:300]
    else:
        assert json.loads(text)["choices"][0]["message"]["content"] == MESSAGE, text


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far (Linux), or None where /proc cannot say."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def wrk(url: str, key: str, stream: bool, seconds: int, connections: int, workdir: Path) -> tuple[float, float | None]:
    """(requests/s, the server's CPU microseconds per request or None) of one round."""
    script = workdir / f"wrk-{'stream' if stream else 'plain'}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body(stream))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )
    pid = SERVER_PIDS.get(port_of(url))
    cpu_before = None if pid is None else cpu_seconds(pid)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"errors during the run against {url}:\n{out}")
    cpu_after = None if pid is None else cpu_seconds(pid)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"(\d+) requests in", out)
    if not match or not done:
        raise RuntimeError(out)
    cpu = None
    if cpu_before is not None and cpu_after is not None and int(done.group(1)):
        cpu = (cpu_after - cpu_before) / int(done.group(1)) * 1e6
    return float(match.group(1)), cpu


SERVER_PIDS: dict[int, int] = {}  # port -> pid of the server process listening there


class Servers:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OZWELL_SECRET": uuid.uuid4().hex * 2}
        self.store = f"sqlite:///{workdir}/bench.db"

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "ozwell_asgi", *args], env=self.env, cwd=self.workdir, capture_output=True, text=True
        )
        if out.returncode:
            raise RuntimeError(out.stderr)
        return out.stdout.strip().splitlines()[-1]

    def start(self, argv: list[str], port: int, env: dict[str, str] | None = None) -> None:
        proc = subprocess.Popen(argv, env=env or self.env, cwd=self.workdir, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        SERVER_PIDS[port] = proc.pid  # one worker: uvicorn serves in this very process
        wait_for(port)

    def serve(self, *extra: str, root: Path = ROOT) -> int:
        """``ozwell-asgi serve`` with its defaults but the access log off, from the source tree ``root``."""
        port = free_port()
        cmd = [sys.executable, "-m", "ozwell_asgi", "serve", "--port", str(port), "--store", self.store]
        cmd += ["--no-access-log", *extra]
        self.start(cmd, port, {**self.env, "PYTHONPATH": str(root)})
        return port

    def bare(self, key: str) -> int:
        port = free_port()
        # The uvicorn settings `ozwell-asgi serve --no-access-log` uses (ozwell_asgi/cli.py): log level info.
        cmd = [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", str(port), "--log-level", "info"]
        cmd += ["--no-access-log"]
        self.start(cmd, port, {**self.env, "BENCH_KEY": key})
        return port

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def compare(a: str, b: str, key: str, stream: bool, rounds: int, seconds: int, conns: int, workdir: Path) -> dict:
    """Alternate rounds between ``a`` and ``b`` (swapping who goes first); returns the rps lists, the ratio of the
    totals a/b, the median of the per-round ratios, and the servers' CPU per request (b's over a's: the same sense
    as the rps ratio, and far less moved by whatever else the machine runs)."""
    check(a, key, stream)
    check(b, key, stream)
    wrk(a, key, stream, 1, conns, workdir)  # warm both
    wrk(b, key, stream, 1, conns, workdir)
    rps_a: list[float] = []
    rps_b: list[float] = []
    cpu: dict[str, list[float]] = {a: [], b: []}
    for i in range(rounds):
        order = [(a, rps_a), (b, rps_b)] if i % 2 == 0 else [(b, rps_b), (a, rps_a)]
        for url, sink in order:
            rps, us = wrk(url, key, stream, seconds, conns, workdir)
            sink.append(rps)
            if us is not None:
                cpu[url].append(us)
    median = statistics.median(x / y for x, y in zip(rps_a, rps_b, strict=True))
    result = {"a": rps_a, "b": rps_b, "ratio": sum(rps_a) / sum(rps_b), "median": median}
    if len(cpu[a]) == len(cpu[b]) == rounds:
        result["cpu_a"], result["cpu_b"] = statistics.median(cpu[a]), statistics.median(cpu[b])
    return result


def report(name: str, r: dict, a: str = "ozwell", b: str = "bare") -> dict:
    mean_a, mean_b = statistics.mean(r["a"]), statistics.mean(r["b"])
    line = (
        f"{name:>14}: {a} {mean_a:8.0f} req/s   {b} {mean_b:8.0f} req/s   "
        f"ratio: median {r['median']:.3f}, of totals {r['ratio']:.3f}"
    )
    out = {
        f"{a}_rps": [round(x) for x in r["a"]],
        f"{b}_rps": [round(x) for x in r["b"]],
        "ratio": round(r["ratio"], 3),
        "median": round(r["median"], 3),
    }
    if "cpu_a" in r:
        line += f"   server CPU/request: {a} {r['cpu_a']:.0f} us, {b} {r['cpu_b']:.0f} us"
        line += f" (ratio {r['cpu_b'] / r['cpu_a']:.3f})"
        out.update(
            {
                f"{a}_cpu_us": round(r["cpu_a"]),
                f"{b}_cpu_us": round(r["cpu_b"]),
                "cpu_ratio": round(r["cpu_b"] / r["cpu_a"], 3),
            }
        )
    print(line, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--only", choices=("plain", "stream"), help="only non-streaming (plain) or streaming chat")
    parser.add_argument("--against", metavar="DIR", type=Path, help="also compare with serve from this source tree")
    parser.add_argument("--limiters", action="store_true", help="also compare the Redis limiter with the in-memory one")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is required: apt-get install wrk", file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        servers = Servers(workdir)
        try:
            # An enterprise key with budgets far above what the run can use: the limiter still counts every request.
            key = servers.cli(
                "keys", "create", "--name", "bench", "--plan", "enterprise", "--rpm", "1000000000",
                "--tpm", "1000000000000", "--store", servers.store,
            )  # fmt: skip
            ozwell = f"http://127.0.0.1:{servers.serve()}/v1/chat/completions"
            bare = f"http://127.0.0.1:{servers.bare(key)}/v1/chat/completions"
            other = None
            if args.against is not None:
                other = f"http://127.0.0.1:{servers.serve(root=args.against.resolve())}/v1/chat/completions"
            kinds = {"plain": (False,), "stream": (True,), None: (False, True)}[args.only]
            for stream in kinds:
                name = "streaming" if stream else "non-streaming"
                r = compare(ozwell, bare, key, stream, args.rounds, args.seconds, args.connections, workdir)
                results[name] = report(name, r)
                if other is not None:
                    r = compare(ozwell, other, key, stream, args.rounds, args.seconds, args.connections, workdir)
                    results[f"{name} vs {args.against}"] = report(name, r, "this", "other")
            if args.limiters:
                namespace = f"ozwell-bench-{uuid.uuid4().hex[:8]}"
                servers.env["OZWELL_LIMITER_NAMESPACE"] = namespace
                redis_port = servers.serve("--limiter", args.redis)
                redis_url = f"http://127.0.0.1:{redis_port}/v1/chat/completions"
                r = compare(redis_url, ozwell, key, False, args.rounds, args.seconds, args.connections, workdir)
                results["redis-vs-memory limiter"] = report("limiter", r, "redis", "memory")
        finally:
            servers.stop()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
