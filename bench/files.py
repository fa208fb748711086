"""Uploads and downloads through ``ozwell-asgi serve``: MB/s and the server's peak RSS growth over idle.

    python bench/files.py                          # 1 GiB up and down, then 8 concurrent 128 MiB uploads
    python bench/files.py --stores discard         # one store only
    python bench/files.py --size-mib 256 --concurrent 4 --each-mib 64

Each scenario gets a fresh server: ``serve`` (SQLite key store, in-memory limiter, echo backend), started by this
script with two changes made before ``serve`` builds its app (``--launch``): ``Settings.max_file_size`` is raised to
4 GiB (a 1 GiB file is over the default 512 MiB cap), and the file store is the one measured:

- ``memory``: the default ``MemoryFileStore`` (4 GiB in all). It holds the content in this process's memory, so an
  upload's growth is the file itself plus the path's own.
- ``discard``: a store that counts the bytes it is given and drops them, and serves a download as zeros of the
  stored size. What it measures is the upload and download path alone: ASGI messages, the multipart parser, the
  route, the response.
- any ``--files URL`` that ``serve`` accepts (when it has ``--files``): that store, as ``serve`` builds it.

The server's peak RSS is read from ``/proc/PID/status`` (``VmHWM``) after resetting it (``clear_refs``) at the start
of each measured transfer, and sampled every 5 ms as a fallback; growth is that peak minus the RSS just before.
The client streams the multipart body (a 1 MiB random block repeated, ``Content-Length`` set) and reads downloads
in 1 MiB pieces, checking the size (and, for a store that keeps content, a CRC-32 of every byte).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import Servers, free_port, wait_for  # noqa: E402

MIB = 1 << 20
BLOCK = os.urandom(MIB)
BLOCK_CRC = zlib.crc32(BLOCK)
BOUNDARY = "ozwellbench" + uuid.uuid4().hex


# --- the server side (run in the serve process by --launch) ------------------------------------------------------


class DiscardingFileStore:
    """A FileStore that keeps metadata and drops content (its size is counted); a download is zeros of that size.

    For this benchmark only: it measures what the HTTP path holds, without a store holding the bytes."""

    def __init__(self) -> None:
        from ozwell_asgi.stores.memory import MemoryFileStore

        self._meta = MemoryFileStore()
        self._sizes: dict[str, int] = {}

    async def create(self, file: Any, content: AsyncIterable[bytes]) -> Any:
        size = 0
        async for chunk in content:
            size += len(chunk)

        async def nothing() -> AsyncIterator[bytes]:
            return
            yield b""

        stored = await self._meta.create(file, nothing())
        self._sizes[file.id] = size
        return dataclasses.replace(stored, bytes=size)

    async def get(self, owner: str, file_id: str) -> Any:
        file = await self._meta.get(owner, file_id)
        return None if file is None else dataclasses.replace(file, bytes=self._sizes[file_id])

    async def list(self, owner: str, query: Any, purpose: str | None = None) -> Any:
        page = await self._meta.list(owner, query, purpose)
        data = tuple(dataclasses.replace(f, bytes=self._sizes[f.id]) for f in page.data)
        return dataclasses.replace(page, data=data)

    async def open(self, owner: str, file_id: str, start: int = 0, end: int | None = None) -> Any:
        if await self._meta.get(owner, file_id) is None:
            return None
        stop = self._sizes[file_id] if end is None else end

        async def zeros() -> AsyncIterator[bytes]:
            zero = bytes(MIB)
            left = stop - start
            while left > 0:
                yield zero if left >= MIB else zero[:left]
                left -= MIB

        return zeros()

    async def delete(self, owner: str, file_id: str) -> bool:
        self._sizes.pop(file_id, None)
        return await self._meta.delete(owner, file_id)


def launch(store: str, argv: list[str]) -> int:
    """``ozwell-asgi serve argv`` with the file store ``store`` (memory, discard or as ``--files`` builds it) and a
    4 GiB file size cap."""
    import ozwell_asgi.cli as cli
    import ozwell_asgi.cli.serve as serve
    from ozwell_asgi.context import Settings
    from ozwell_asgi.stores.memory import MemoryFileStore

    base = serve.OzwellAPI

    class BenchAPI(base):  # type: ignore[misc,valid-type]
        def __init__(self, **kwargs: Any) -> None:
            kwargs["settings"] = Settings(max_file_size=4 << 30)
            if store == "memory":
                kwargs["file_store"] = MemoryFileStore(max_total_bytes=4 << 30)
            elif store == "discard":
                kwargs["file_store"] = DiscardingFileStore()
            super().__init__(**kwargs)

    serve.OzwellAPI = BenchAPI  # type: ignore[misc]
    return cli.main(["serve", *argv])


# --- the client side ---------------------------------------------------------------------------------------------


class Server:
    """One ``serve`` process for one scenario."""

    def __init__(self, servers: Servers, store: str, key: str) -> None:
        self.port = free_port()
        self.key = key
        argv = ["--port", str(self.port), "--store", servers.store, "--log-level", "warning"]
        if store not in ("memory", "discard"):
            argv += ["--files", store]
        command = [sys.executable, str(Path(__file__)), "--launch", store, "--", *argv]
        self.proc = subprocess.Popen(command, env=servers.env, cwd=servers.workdir, stdout=subprocess.DEVNULL)
        wait_for(self.port)
        self.upload(MIB, "warm-up")  # imports and first-use work happen before the idle reading
        self.delete(self.last_id)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def status(self, field: str) -> int:
        """A ``/proc/PID/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def upload(self, size: int, name: str) -> dict[str, Any]:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        conn = self.connection()
        conn.putrequest("POST", "/v1/files")
        conn.putheader("Authorization", f"Bearer {self.key}")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
        conn.putheader("Content-Length", str(len(head) + size + len(tail)))
        conn.endheaders()
        conn.send(head)
        view = memoryview(BLOCK)
        left = size
        while left > 0:
            conn.send(view[: min(left, MIB)])
            left -= MIB
        conn.send(tail)
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        if response.status != 200 or body["bytes"] != size:
            raise RuntimeError(f"upload failed: {response.status} {body}")
        self.last_id: str = body["id"]
        return dict(body)

    def download(self, file_id: str, size: int, check_content: bool) -> None:
        conn = self.connection()
        conn.request("GET", f"/v1/files/{file_id}/content", headers={"Authorization": f"Bearer {self.key}"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"download failed: {response.status} {response.read()[:300]!r}")
        total = 0
        crc = 0
        while piece := response.read(MIB):
            total += len(piece)
            if check_content:
                crc = zlib.crc32(piece, crc)
        conn.close()
        if total != size:
            raise RuntimeError(f"downloaded {total} bytes of {size}")
        if check_content and crc != expected_crc(size):
            raise RuntimeError("the downloaded content differs from the uploaded one")

    def delete(self, file_id: str) -> None:
        conn = self.connection()
        conn.request("DELETE", f"/v1/files/{file_id}", headers={"Authorization": f"Bearer {self.key}"})
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.status != 200:
            raise RuntimeError(f"delete failed: {response.status}")


def expected_crc(size: int) -> int:
    crc = 0
    for _ in range(size // MIB):
        crc = zlib.crc32(BLOCK, crc)
    return zlib.crc32(BLOCK[: size % MIB], crc)


class Peak:
    """The server's peak RSS over a block: ``VmHWM`` after a ``clear_refs`` reset, and 5 ms samples of ``VmRSS``."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> Peak:
        server = self.server
        try:
            Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.idle = server.status("VmRSS")
        self.sampled = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.began = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self.sampled = max(self.sampled, self.server.status("VmRSS"))
            except (OSError, KeyError):
                return

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.began
        self._stop.set()
        self._thread.join()
        peak = max(self.sampled, self.server.status("VmHWM")) if self.hwm_reset else self.sampled
        self.growth = peak - self.idle


def measure(servers: Servers, store: str, key: str, size: int, concurrent: int, each: int) -> dict[str, Any]:
    keeps_content = store != "discard"
    result: dict[str, Any] = {"store": store}

    server = Server(servers, store, key)
    try:
        with Peak(server) as up:
            file_id = server.upload(size, "big")["id"]
        with Peak(server) as down:
            server.download(file_id, size, keeps_content)
        result["upload"] = {
            "mib_s": size / MIB / up.seconds,
            "rss_growth_mib": up.growth / MIB,
            "idle_mib": up.idle / MIB,
        }
        result["download"] = {"mib_s": size / MIB / down.seconds, "rss_growth_mib": down.growth / MIB}
    finally:
        server.stop()

    server = Server(servers, store, key)
    try:
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                server.upload(each, f"part-{i}")
            except BaseException as exc:  # reported after the run
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrent)]
        with Peak(server) as many:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if errors:
            raise errors[0]
        result["concurrent"] = {
            "uploads": concurrent,
            "mib_s": concurrent * each / MIB / many.seconds,
            "rss_growth_mib": many.growth / MIB,
        }
    finally:
        server.stop()
    return result


def serve_has_files_flag(servers: Servers) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "ozwell_asgi", "serve", "--help"], env=servers.env, capture_output=True, text=True
    )
    return "--files" in out.stdout


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--launch":
        store, argv = sys.argv[2], sys.argv[sys.argv.index("--") + 1 :]
        return launch(store, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", nargs="+", default=["memory", "discard"], help="memory, discard")
    parser.add_argument("--files", action="append", default=[], metavar="URL", help="also serve --files URL")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--each-mib", type=int, default=128)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        servers = Servers(Path(tmp))
        key = servers.cli(
            "keys", "create", "--name", "bench", "--plan", "enterprise", "--rpm", "1000000000",
            "--store", servers.store,
        )  # fmt: skip
        stores = list(args.stores)
        if args.files:
            if serve_has_files_flag(servers):
                stores += args.files
            else:
                print("serve has no --files flag here: skipping", ", ".join(args.files), file=sys.stderr)
        for store in stores:
            result = measure(servers, store, key, args.size_mib * MIB, args.concurrent, args.each_mib * MIB)
            results.append(result)
            up, down, many = result["upload"], result["download"], result["concurrent"]
            print(
                f"{store:>8}: {args.size_mib} MiB up {up['mib_s']:7.1f} MiB/s (+{up['rss_growth_mib']:.1f} MiB RSS)"
                f"   down {down['mib_s']:7.1f} MiB/s (+{down['rss_growth_mib']:.1f} MiB)"
                f"   {many['uploads']} x {args.each_mib} MiB up {many['mib_s']:7.1f} MiB/s"
                f" (+{many['rss_growth_mib']:.1f} MiB)   idle RSS {up['idle_mib']:.0f} MiB",
                flush=True,
            )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
