"""The bundled :class:`~ozwell_asgi.protocols.PassageIndex` adapters: in this process's memory, and in SQL.

Both search by brute force: every passage of the owner and model is scored against the query (one matrix-vector
product in numpy over unit-length float32 vectors, so the score is the cosine similarity) and the best are kept.
That is exact and needs no index to build or tune; its cost grows with the passages one owner has, which
:class:`~ozwell_asgi.sources.SourceLimits` bounds. docs/sources.md gives the figures measured by
``bench/passages.py`` and what a deployment uses past them (an approximate nearest-neighbour index in the database,
such as PostgreSQL's pgvector with HNSW, or a vector database, behind this same protocol).

:class:`SQLPassageIndex` keeps its own two tables (``ozwell_passage_files``: a fingerprint per indexed file and
model; ``ozwell_passages``: owner, file, model, ordinal, page, text and the vector as a little-endian float32 blob),
created on first use. A search streams the owner's vectors in batches of ``scan_batch`` rows, so it holds one
batch at a time whatever the owner's size, and reads the text of the winners alone.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..sources import Passage
from .sql import _statement_errors, _transaction

if TYPE_CHECKING:
    from .sql import SQLDatabase

__all__ = [
    "MemoryPassageIndex",
    "PassageIndexStatementError",
    "SQLPassageIndex",
    "passage_files_table",
    "passage_metadata",
    "passages_table",
    "unit_vectors",
]

Matrix = npt.NDArray[np.float32]


def unit_vectors(vectors: Sequence[Sequence[float]] | Matrix) -> Matrix:
    """``vectors`` as rows of a float32 matrix, each scaled to unit length (a zero vector stays zero, and so scores
    0 against everything). ``ValueError`` if they are not all of one dimension."""
    if len(vectors) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    matrix = np.array(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError("vectors must all have one dimension")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    matrix /= norms
    return matrix


def _query(vector: Sequence[float]) -> Matrix | None:
    """The query as a unit float32 vector, or ``None`` if it is empty, zero (no direction to rank by) or not
    finite."""
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    if array.size == 0 or not bool(np.all(np.isfinite(array))):
        return None
    norm = float(np.linalg.norm(array))
    return array / norm if norm else None


def _best(scores: Matrix, limit: int) -> npt.NDArray[np.intp]:
    """Indices of the ``limit`` highest ``scores``, highest first (ties by position)."""
    top = np.argpartition(-scores, limit - 1)[:limit] if scores.size > limit else np.arange(scores.size)
    order: npt.NDArray[np.intp] = top[np.lexsort((top, -scores[top]))]
    return order


def _of_file(passage: Passage, file_id: str) -> Passage:
    """``passage`` as belonging to ``file_id`` (what ``add`` was told, whatever the passage says)."""
    return passage if passage.file_id == file_id else Passage(file_id, passage.ordinal, passage.page, passage.text)


# -- memory ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Group:
    """The passages of one owner and model: one matrix of unit rows and the passage of each row."""

    fingerprints: dict[str, str] = field(default_factory=dict)
    matrix: Matrix = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    passages: list[Passage] = field(default_factory=list)
    text_bytes: int = 0

    @property
    def nbytes(self) -> int:
        """Vectors and text, and an estimate of the objects around them."""
        return int(self.matrix.nbytes) + self.text_bytes + 100 * (len(self.passages) + len(self.fingerprints))

    def remove(self, file_id: str) -> None:
        self.fingerprints.pop(file_id, None)
        keep = [i for i, p in enumerate(self.passages) if p.file_id != file_id]
        if len(keep) != len(self.passages):
            self.matrix = self.matrix[keep]
            self.passages = [self.passages[i] for i in keep]
            self.text_bytes = sum(len(p.text) for p in self.passages)

    def clear_passages(self) -> None:
        self.fingerprints.clear()
        self.passages = []
        self.matrix = np.zeros((0, 0), dtype=np.float32)
        self.text_bytes = 0


class MemoryPassageIndex:
    """A :class:`~ozwell_asgi.protocols.PassageIndex` in this process's memory: per owner and model, one float32
    matrix searched by one matrix-vector product.

    Bounded: past ``max_bytes`` (vectors and text, 512 MiB by default) the owners and models searched or added to
    least recently are forgotten whole (their files are indexed again when next needed); the one just added to is
    kept. Every method is atomic (no suspension point inside). Vectors of another dimension than those an owner and
    model hold replace them all (the model changed: the rest is stale).
    """

    def __init__(self, *, max_bytes: int = 512 * 1024 * 1024) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_bytes = max_bytes
        self._groups: OrderedDict[tuple[str, str], _Group] = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """What the index holds now (vectors, text and an estimate per passage), in bytes."""
        return self._bytes

    async def fingerprints(self, owner: str, model: str) -> Mapping[str, str]:
        group = self._groups.get((owner, model))
        return {} if group is None else dict(group.fingerprints)

    async def add(
        self,
        owner: str,
        model: str,
        file_id: str,
        fingerprint: str,
        passages: Sequence[Passage],
        vectors: Sequence[Sequence[float]],
    ) -> None:
        if len(passages) != len(vectors):
            raise ValueError("one vector per passage")
        rows = unit_vectors(vectors)
        key = (owner, model)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        before = group.nbytes
        group.remove(file_id)
        if passages:
            if group.passages and group.matrix.shape[1] != rows.shape[1]:
                group.clear_passages()
            group.matrix = rows if not group.passages else np.concatenate((group.matrix, rows))
            group.passages.extend(_of_file(p, file_id) for p in passages)
            group.text_bytes += sum(len(p.text) for p in passages)
        group.fingerprints[file_id] = fingerprint
        self._bytes += group.nbytes - before
        self._groups.move_to_end(key)
        while self._bytes > self.max_bytes and len(self._groups) > 1:
            oldest = next(iter(self._groups))
            self._bytes -= self._groups.pop(oldest).nbytes

    async def search(
        self,
        owner: str,
        model: str,
        vector: Sequence[float],
        limit: int,
        file_ids: Collection[str] | None = None,
    ) -> list[tuple[Passage, float]]:
        key = (owner, model)
        group = self._groups.get(key)
        query = _query(vector)
        if group is None or query is None or limit < 1:
            return []
        self._groups.move_to_end(key)
        if not group.passages or group.matrix.shape[1] != query.shape[0]:
            return []
        scores: Matrix = group.matrix @ query
        if file_ids is not None:
            wanted = set(file_ids)
            other = np.fromiter((p.file_id not in wanted for p in group.passages), dtype=bool, count=len(scores))
            scores[other] = -np.inf
        found = []
        for row in _best(scores, limit).tolist():
            score = float(scores[row])
            if score == -np.inf:
                break
            found.append((group.passages[row], score))
        return found

    async def delete_file(self, owner: str, file_id: str) -> None:
        for (group_owner, _), group in self._groups.items():
            if group_owner == owner and file_id in group.fingerprints:
                before = group.nbytes
                group.remove(file_id)
                self._bytes += group.nbytes - before


# -- SQL -------------------------------------------------------------------------------------------------------

#: The passage index's tables; kept apart from the stores' ``metadata``, created by :class:`SQLPassageIndex`.
passage_metadata = sa.MetaData()

passage_files_table = sa.Table(
    "ozwell_passage_files",
    passage_metadata,
    sa.Column("owner", sa.Text, primary_key=True),
    sa.Column("file_id", sa.Text, primary_key=True),
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("passages", sa.Integer, nullable=False),
)

passages_table = sa.Table(
    "ozwell_passages",
    passage_metadata,
    sa.Column("owner", sa.Text, primary_key=True),
    sa.Column("file_id", sa.Text, primary_key=True),
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("ordinal", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("page", sa.Integer, nullable=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # little-endian float32, unit length
    sa.Index("ix_ozwell_passages_owner_model", "owner", "model"),
)


class PassageIndexStatementError(RuntimeError):
    """A statement of the SQL passage index failed; the message names the database's error, never the parameters."""


class _AddedElsewhere(Exception):
    """Another transaction added the same file first."""


_errors = functools.partial(_statement_errors, "passage index", "passage index", PassageIndexStatementError)

_INSERT_BATCH = 500  # passage rows per INSERT


def _has_nul(*values: str) -> bool:
    return any("\x00" in value for value in values)


class SQLPassageIndex:
    """A :class:`~ozwell_asgi.protocols.PassageIndex` in SQL (SQLite or PostgreSQL), on a shared
    :class:`~ozwell_asgi.stores.sql.SQLDatabase` (``SQLDatabase.passage_index()``).

    ``add`` replaces a file's rows in one transaction; when another process added the same file meanwhile, its
    rows stand and this add does nothing (idempotent). ``search`` scans at most ``max_scan`` rows of the owner and
    model (200,000), ``scan_batch`` (2,048) at a time, scoring each batch in numpy and keeping the best; then reads
    the winners' text. Outages are a 503 ("The passage index is unavailable").
    """

    def __init__(self, db: SQLDatabase, *, scan_batch: int = 2048, max_scan: int = 200_000) -> None:
        if scan_batch < 1 or max_scan < 1:
            raise ValueError("scan_batch and max_scan must be >= 1")
        self.db = db
        self.scan_batch = scan_batch
        self.max_scan = max_scan
        self._ready = False
        self._lock = anyio.Lock()
        self._f = passage_files_table
        self._p = passages_table

    async def ensure_tables(self) -> None:
        """Create the index's tables if they are missing (once; a lost creation race is retried)."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            with _errors():
                for attempt in range(5):
                    try:
                        async with self.db.engine.begin() as conn:
                            await conn.run_sync(passage_metadata.create_all, checkfirst=True)
                        break
                    except (IntegrityError, ProgrammingError, OperationalError):
                        # Another process created a table between our check and our CREATE: the next pass sees it.
                        if attempt == 4:
                            raise
                        await anyio.sleep(0.05 * (attempt + 1))
            self._ready = True

    def _transaction(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A transaction whose rollback and release also run when the task is cancelled (the SQL stores' own)."""
        return _transaction(self.db.engine, _errors, "passage index")

    async def fingerprints(self, owner: str, model: str) -> Mapping[str, str]:
        if _has_nul(owner, model):
            return {}
        f = self._f
        await self.ensure_tables()
        stmt = sa.select(f.c.file_id, f.c.fingerprint).where(f.c.owner == owner, f.c.model == model)
        with _errors():
            async with self.db.engine.connect() as conn:
                return {row[0]: row[1] for row in await conn.execute(stmt)}

    async def add(
        self,
        owner: str,
        model: str,
        file_id: str,
        fingerprint: str,
        passages: Sequence[Passage],
        vectors: Sequence[Sequence[float]],
    ) -> None:
        if len(passages) != len(vectors):
            raise ValueError("one vector per passage")
        if _has_nul(owner, model, file_id, fingerprint):
            raise ValueError("an owner, model, file id or fingerprint cannot hold NUL characters")
        rows = unit_vectors(vectors).astype("<f4", copy=False)
        f, p = self._f, self._p
        await self.ensure_tables()
        file_row = {"owner": owner, "file_id": file_id, "model": model}
        try:
            async with self._transaction() as conn:
                with _errors():
                    # Writes only, no read first: a SQLite transaction that read first could not wait for the lock.
                    await conn.execute(
                        sa.delete(f).where(f.c.owner == owner, f.c.file_id == file_id, f.c.model == model)
                    )
                    await conn.execute(
                        sa.delete(p).where(p.c.owner == owner, p.c.file_id == file_id, p.c.model == model)
                    )
                    try:
                        await conn.execute(
                            sa.insert(f).values(**file_row, fingerprint=fingerprint, passages=len(passages))
                        )
                    except IntegrityError:
                        raise _AddedElsewhere from None
                    for start in range(0, len(passages), _INSERT_BATCH):
                        batch = [
                            {
                                **file_row,
                                "ordinal": passage.ordinal,
                                "page": passage.page,
                                "text": passage.text.replace("\x00", ""),
                                "vector": rows[start + i].tobytes(),
                            }
                            for i, passage in enumerate(passages[start : start + _INSERT_BATCH])
                        ]
                        await conn.execute(sa.insert(p), batch)
        except _AddedElsewhere:
            return  # another process added this file meanwhile (its row came first): its rows stand

    async def search(
        self,
        owner: str,
        model: str,
        vector: Sequence[float],
        limit: int,
        file_ids: Collection[str] | None = None,
    ) -> list[tuple[Passage, float]]:
        query = _query(vector)
        if query is None or limit < 1 or _has_nul(owner, model):
            return []
        p = self._p
        where = [p.c.owner == owner, p.c.model == model]
        if file_ids is not None:
            ids = [i for i in file_ids if "\x00" not in i]
            if not ids:
                return []
            where.append(p.c.file_id.in_(ids))
        width = query.shape[0] * 4
        await self.ensure_tables()
        stmt = sa.select(p.c.file_id, p.c.ordinal, p.c.vector).where(*where).limit(self.max_scan)
        best_scores: Matrix = np.zeros(0, dtype=np.float32)
        best_keys: list[tuple[str, int]] = []
        with _errors():
            async with self.db.engine.connect() as conn:
                result = await conn.stream(stmt.execution_options(yield_per=self.scan_batch))
                async for rows in result.partitions(self.scan_batch):
                    fitting = [row for row in rows if len(row[2]) == width]
                    if not fitting:
                        continue
                    blob = b"".join(row[2] for row in fitting)
                    matrix = np.frombuffer(blob, dtype="<f4").reshape(len(fitting), -1)
                    scores: Matrix = np.concatenate((best_scores, matrix @ query))
                    keys = best_keys + [(row[0], row[1]) for row in fitting]
                    top = _best(scores, limit)
                    best_scores, best_keys = scores[top], [keys[i] for i in top.tolist()]
        if not best_keys:
            return []
        return await self._passages(owner, model, best_keys, best_scores.tolist())

    async def _passages(
        self, owner: str, model: str, keys: list[tuple[str, int]], scores: list[float]
    ) -> list[tuple[Passage, float]]:
        p = self._p
        # Each winner by its whole primary key: SQLite and PostgreSQL look them up one by one (a MULTI-INDEX OR, a
        # BitmapOr), where row values in an IN list would be a scan on SQLite.
        wanted = sa.or_(
            *(
                sa.and_(p.c.owner == owner, p.c.file_id == file_id, p.c.model == model, p.c.ordinal == ordinal)
                for file_id, ordinal in keys
            )
        )
        stmt = sa.select(p.c.file_id, p.c.ordinal, p.c.page, p.c.text).where(wanted)
        with _errors():
            async with self.db.engine.connect() as conn:
                found: dict[tuple[str, int], Any] = {(r[0], r[1]): r for r in await conn.execute(stmt)}
        out = []
        for key, score in zip(keys, scores, strict=True):
            row = found.get(key)
            if row is not None:  # gone since it was scored (the file was deleted): left out
                out.append((Passage(row[0], row[1], row[2], row[3]), float(score)))
        return out

    async def delete_file(self, owner: str, file_id: str) -> None:
        if _has_nul(owner, file_id):
            return
        f, p = self._f, self._p
        await self.ensure_tables()
        async with self._transaction() as conn:
            with _errors():
                await conn.execute(sa.delete(f).where(f.c.owner == owner, f.c.file_id == file_id))
                await conn.execute(sa.delete(p).where(p.c.owner == owner, p.c.file_id == file_id))
