"""How far brute-force passage search goes: one search over N passages of D dimensions, for the memory index, the
SQLite index and a pure-Python loop (what it would cost without numpy), median of a few runs.

    python bench/passages.py                     # 10k and 100k passages of 256 and 1536 dimensions
    python bench/passages.py --sql-max-floats 200000000   # SQL at 100k x 1536 too (600 MB of vectors)
    python bench/passages.py --postgres postgresql://postgres@127.0.0.1:5432/test

The SQLite database is a temporary file; a PostgreSQL run writes the index's tables into the database given and
drops them at the end. docs/sources.md keeps the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import statistics
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np

from ozwell_asgi.sources import Passage
from ozwell_asgi.stores.passages import MemoryPassageIndex, SQLPassageIndex, passage_metadata
from ozwell_asgi.stores.sql import SQLDatabase

PER_FILE = 1000  # passages per added file


async def fill(index: MemoryPassageIndex | SQLPassageIndex, n: int, d: int, rng: np.random.Generator) -> None:
    for start in range(0, n, PER_FILE):
        count = min(PER_FILE, n - start)
        file_id = f"file-{start // PER_FILE}"
        vectors = rng.standard_normal((count, d), dtype=np.float32)
        passages = [Passage(file_id, i, None, f"passage {start + i} " + "x" * 800) for i in range(count)]
        await index.add("owner", "model", file_id, "fp", passages, vectors)  # type: ignore[arg-type]


async def timed_search(index: MemoryPassageIndex | SQLPassageIndex, d: int, rng: np.random.Generator) -> float:
    times = []
    for _ in range(3):
        query = rng.standard_normal(d).tolist()
        began = time.perf_counter()
        hits = await index.search("owner", "model", query, 8)
        times.append(time.perf_counter() - began)
        assert len(hits) == 8
    return statistics.median(times)


def pure_python(n: int, d: int, rng: np.random.Generator) -> float:
    """A dot product per passage over array('f') in pure Python, timed on 2,000 and scaled to ``n``."""
    sample = min(n, 2000)
    rows = [array("f", rng.standard_normal(d).tolist()) for _ in range(sample)]
    query = array("f", rng.standard_normal(d).tolist())
    began = time.perf_counter()
    mul = operator.mul
    scores = [sum(map(mul, query, row)) for row in rows]
    elapsed = time.perf_counter() - began
    assert len(scores) == sample
    return elapsed * n / sample


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dims", default="256,1536")
    parser.add_argument(
        "--sql-max-floats", type=int, default=30_000_000, help="largest N*D run on SQL (default: 120 MB of vectors)"
    )
    parser.add_argument("--postgres", default=None, help="also run on this PostgreSQL database")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    print("| passages | dims | memory | SQLite | PostgreSQL | pure Python (estimated) |")
    print("|---|---|---|---|---|---|")
    for n in map(int, args.sizes.split(",")):
        for d in map(int, args.dims.split(",")):
            memory = MemoryPassageIndex(max_bytes=1 << 40)
            await fill(memory, n, d, rng)
            mem = await timed_search(memory, d, rng)
            del memory
            sql = pg = "-"
            if n * d <= args.sql_max_floats:
                with tempfile.TemporaryDirectory() as tmp:
                    db = SQLDatabase.from_url(f"sqlite:///{Path(tmp) / 'bench.db'}")
                    index = db.passage_index()
                    await fill(index, n, d, rng)
                    sql = f"{await timed_search(index, d, rng) * 1000:.0f} ms"
                    await db.aclose()
                if args.postgres:
                    db = SQLDatabase.from_url(args.postgres)
                    index = db.passage_index()
                    await fill(index, n, d, rng)
                    pg = f"{await timed_search(index, d, rng) * 1000:.0f} ms"
                    async with db.engine.begin() as conn:
                        await conn.run_sync(passage_metadata.drop_all)
                    await db.aclose()
            py = pure_python(n, d, rng)
            print(f"| {n:,} | {d} | {mem * 1000:.1f} ms | {sql} | {pg} | {py:.2f} s |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
