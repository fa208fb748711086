"""The retrieval behind ``include_sources``: the owner's text files, cut into passages, embedded, searched.

:class:`FileSources` is the bundled :class:`~ozwell_asgi.protocols.SourceFinder`. On ``find`` it

1. lists the owner's files, newest first, and keeps those it can read (plain text, Markdown, JSON, JSON Lines,
   CSV, TSV, and PDF when ``pypdf`` is installed: the ``pdf`` extra) within :class:`SourceLimits` (how many files,
   how many bytes in all);
2. indexes each kept file whose passages the :class:`~ozwell_asgi.protocols.PassageIndex` does not hold yet (or
   holds under another fingerprint): it reads at most ``max_file_bytes`` of it, cuts it into passages
   (:func:`split_file`) in a worker thread, embeds them in batches through the backend's ``embed``, and adds them;
   passages of files no longer kept (deleted, or pushed out by newer ones) are forgotten;
3. embeds the query and returns the best passages by cosine similarity, as :class:`~ozwell_asgi.types.Source`.

Guarantees: only the caller's owner's files are read and searched (every index call is scoped by owner); a file is
embedded once per process however many ``find`` calls for its owner run at once (an in-process lock per owner and
model), and adding a file's passages is idempotent, so processes racing to index one file leave one copy; every
step is bounded by a :class:`SourceLimits` cap. The embedding tokens spent on indexing and queries are the host's
(they are not charged to the caller's rate limit budget).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import anyio
import anyio.to_thread

from .errors import BadGatewayError, ServiceUnavailableError
from .protocols import EmbeddingBackend, FileStore, PassageIndex
from .types import Call, PageQuery, Principal, Source, StoredFile
from .wire.embeddings import MAX_INPUTS, EmbeddingRequest

__all__ = [
    "FileKind",
    "FileSources",
    "Passage",
    "PassageText",
    "SourceLimits",
    "file_kind",
    "pdf_supported",
    "split_file",
    "split_records",
    "split_text",
]

log = logging.getLogger("ozwell_asgi.sources")

#: Bumped whenever :func:`split_file` would cut the same bytes differently: every file is then indexed anew.
SPLITTER_VERSION = 1

FileKind = Literal["text", "json", "jsonl", "csv", "tsv", "pdf"]

_BY_EXTENSION: dict[str, FileKind] = {
    "txt": "text",
    "text": "text",
    "md": "text",
    "markdown": "text",
    "rst": "text",
    "json": "json",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "csv": "csv",
    "tsv": "tsv",
    "pdf": "pdf",
}
_BY_MEDIA_TYPE: dict[str, FileKind] = {
    "text/plain": "text",
    "text/markdown": "text",
    "text/x-markdown": "text",
    "application/json": "json",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "text/csv": "csv",
    "text/tab-separated-values": "tsv",
    "application/pdf": "pdf",
}


@dataclass(frozen=True, slots=True)
class Passage:
    """A passage of one file as the index keeps it: its ``ordinal`` (0-based position in the file), the 1-based
    ``page`` of a paged document (``None`` for unpaged text) and its ``text``."""

    file_id: str
    ordinal: int
    page: int | None
    text: str


@dataclass(frozen=True, slots=True)
class PassageText:
    """A passage as :func:`split_file` cuts it, before it belongs to a stored file."""

    text: str
    page: int | None = None


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """The caps of :class:`FileSources`, each bounding what one ``find`` may make the server do.

    - ``passage_chars``: longest passage, in characters (1,200, about 300 tokens).
    - ``overlap_chars``: text a passage of prose repeats from the end of the previous one: whole paragraphs, lines,
      sentences or words, at most this many characters and at most half a passage (records and rows never overlap).
    - ``max_passages_per_file``: passages kept of one file (1,000; the rest of it is not searched).
    - ``max_files``: files of an owner considered, newest first (100).
    - ``max_listed``: files listed to find them (1,000: past that, only the newest are looked at).
    - ``max_file_bytes``: bytes read of one file (4 MiB): a longer text is searched in its first 4 MiB; a larger
      PDF is skipped, since a PDF cut short cannot be read.
    - ``max_total_bytes``: bytes of all considered files together (32 MiB; a file that would pass it is left out).
    - ``embed_batch``: passages per ``embed`` call (64).
    - ``max_query_chars``: characters of the query embedded (its first 8,000).
    - ``max_results``: most sources one ``find`` returns, whatever ``limit`` asks (20).

    So an owner's index holds at most ``max_files * max_passages_per_file`` passages (100,000), and in practice
    about ``max_total_bytes / (passage_chars - overlap_chars)`` (~34,000): that is what one search scores.
    """

    passage_chars: int = 1200
    overlap_chars: int = 200
    max_passages_per_file: int = 1000
    max_files: int = 100
    max_listed: int = 1000
    max_file_bytes: int = 4 * 1024 * 1024
    max_total_bytes: int = 32 * 1024 * 1024
    embed_batch: int = 64
    max_query_chars: int = 8000
    max_results: int = 20

    def __post_init__(self) -> None:
        for name in (
            "passage_chars",
            "max_passages_per_file",
            "max_files",
            "max_listed",
            "max_file_bytes",
            "max_total_bytes",
            "embed_batch",
            "max_query_chars",
            "max_results",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"SourceLimits.{name} must be >= 1")
        if self.overlap_chars < 0:
            raise ValueError("SourceLimits.overlap_chars must be >= 0")
        if self.embed_batch > MAX_INPUTS:
            raise ValueError(f"SourceLimits.embed_batch must be at most {MAX_INPUTS}")


# -- which files, and how they are read ----------------------------------------------------------------------


def pdf_supported() -> bool:
    """Whether PDFs can be read here (``pypdf``, the ``pdf`` extra, is installed)."""
    try:
        import pypdf  # noqa: F401
    except ImportError:
        return False
    return True


def file_kind(file: StoredFile) -> FileKind | None:
    """How ``file`` is read, from its filename's extension, else its content type; ``None``: it is not searched."""
    _, dot, extension = file.filename.rpartition(".")
    if dot:
        kind = _BY_EXTENSION.get(extension.lower())
        if kind is not None:
            return kind
    media = file.content_type.partition(";")[0].strip().lower()
    return _BY_MEDIA_TYPE.get(media)


def split_file(
    kind: FileKind, data: bytes, *, size: int = 1200, overlap: int = 200, limit: int = 1000
) -> list[PassageText]:
    """The passages of a file's bytes, at most ``limit`` of at most ``size`` characters each.

    Text and Markdown are cut by :func:`split_text`. JSON is cut by records (the items of a top-level array, the
    members of a top-level object), JSON Lines by lines, CSV and TSV by rows with the header row leading every
    passage (:func:`split_records`); what does not parse is cut as text. PDF is cut page by page (each passage
    carries its page; no passage spans two pages), or gives nothing without ``pypdf`` or when it cannot be read.
    Text that looks binary (a NUL in its first 8 KiB) gives nothing. Pure and CPU-bound: run it in a thread.
    """
    if kind == "pdf":
        return _split_pdf(data, size=size, overlap=overlap, limit=limit)
    if b"\x00" in data[:8192]:
        return []
    text = data.decode("utf-8-sig", errors="replace")
    records: list[str] | None = None
    header: str | None = None
    if kind == "json":
        records = _json_records(text)
    elif kind == "jsonl":
        records = [line.strip() for line in text.splitlines() if line.strip()]
    elif kind in ("csv", "tsv"):
        rows = _csv_rows(text, "\t" if kind == "tsv" else ",")
        if rows is not None and rows:
            header, records = rows[0], rows[1:]
    if records is not None and (records or header):
        return [PassageText(t) for t in split_records(records, size=size, header=header, limit=limit)]
    return [PassageText(t) for t in split_text(text, size=size, overlap=overlap, limit=limit)]


# Separators, coarsest first: a piece longer than a passage is cut at the next finer one (each piece keeps the
# separator that ends it, so joining pieces gives the text back).
_SEPARATORS = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
    re.compile(r"\n"),  # lines
    re.compile(r"(?<=[.!?;:])\s+"),  # sentences
    re.compile(r"\s+"),  # words
)


def _cut(text: str, separator: re.Pattern[str]) -> list[str]:
    pieces: list[str] = []
    start = 0
    for match in separator.finditer(text):
        if match.end() > start:
            pieces.append(text[start : match.end()])
            start = match.end()
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _units(text: str, size: int, level: int = 0) -> Iterator[str]:
    """``text`` as pieces of at most ``size`` characters, cut at the coarsest separator that makes them fit (hard
    cuts only for a run of ``size`` characters without whitespace)."""
    if len(text) <= size:
        yield text
        return
    if level == len(_SEPARATORS):
        for start in range(0, len(text), size):
            yield text[start : start + size]
        return
    for piece in _cut(text, _SEPARATORS[level]):
        yield from _units(piece, size, level + 1)


def _pack(units: Iterable[str], size: int, overlap: int, limit: int, prefix: str = "") -> list[str]:
    """Consecutive ``units`` (each at most ``size - len(prefix)`` characters) joined into passages of at most
    ``size`` characters, each after ``prefix``; a new passage first repeats the previous one's last units that
    fit in ``overlap`` characters. Stops at ``limit`` passages."""
    room = size - len(prefix)
    passages: list[str] = []
    current: list[str] = []
    length = 0
    for unit in units:
        if current and length + len(unit) > room:
            text = (prefix + "".join(current)).strip()
            if text:
                passages.append(text)
                if len(passages) >= limit:
                    return passages
            carried: list[str] = []
            kept = 0
            for previous in reversed(current):
                if kept + len(previous) > overlap or kept + len(previous) + len(unit) > room:
                    break
                carried.insert(0, previous)
                kept += len(previous)
            # Never carry everything: a passage that only repeats the last one would add nothing.
            if len(carried) == len(current):
                carried, kept = [], 0
            current, length = carried, kept
        current.append(unit)
        length += len(unit)
    text = (prefix + "".join(current)).strip()
    if text and len(passages) < limit:
        passages.append(text)
    return passages


def split_text(text: str, *, size: int = 1200, overlap: int = 200, limit: int = 1000) -> list[str]:
    """Prose cut into at most ``limit`` passages of at most ``size`` characters, by paragraphs (then lines,
    sentences, words) so that no passage starts or ends mid-word unless a word is longer than ``size``; each
    passage repeats whole pieces from the end of the previous one, up to ``overlap`` characters and at most half a
    passage. NUL characters are dropped and whitespace at a passage's ends is trimmed; blank text gives no passage.
    """
    if size < 1 or overlap < 0:
        raise ValueError("size must be >= 1 and overlap >= 0")
    return _pack(_units(text.replace("\x00", ""), size), size, min(overlap, size // 2), limit)


def split_records(
    records: Sequence[str], *, size: int = 1200, header: str | None = None, limit: int = 1000
) -> list[str]:
    """Records (JSON items, CSV rows), one per line, packed into at most ``limit`` passages of at most ``size``
    characters, never overlapping; with ``header`` (a CSV's first row, at most half a passage), every passage
    starts with it. A record longer than a passage is cut as prose."""
    if size < 1:
        raise ValueError("size must be >= 1")
    prefix = ""
    if header is not None and size >= 4:
        prefix = header.replace("\x00", "").strip()[: size // 2 - 1] + "\n"
    room = size - len(prefix)
    units = (
        unit for record in records if (line := record.replace("\x00", "").strip()) for unit in _units(line + "\n", room)
    )
    return _pack(units, size, 0, limit, prefix)


def _json_records(text: str) -> list[str] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, list):
        return [_compact(item) for item in value]
    if isinstance(value, dict):
        return [f"{_compact(key)}: {_compact(item)}" for key, item in value.items()]
    return [_compact(value)]


def _compact(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    except (ValueError, RecursionError):
        return str(value)


def _csv_rows(text: str, delimiter: str) -> list[str] | None:
    """The rows of a CSV text, each written back as one line (quoted newlines escaped), or ``None`` if it does not
    parse."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="")
    rows: list[str] = []
    try:
        for row in csv.reader(io.StringIO(text), delimiter=delimiter):
            if not any(cell.strip() for cell in row):
                continue
            out.seek(0)
            out.truncate()
            writer.writerow([cell.replace("\r\n", " ").replace("\n", " ") for cell in row])
            rows.append(out.getvalue())
    except csv.Error:
        return None
    return rows


def _split_pdf(data: bytes, *, size: int, overlap: int, limit: int) -> list[PassageText]:
    try:
        from pypdf import PdfReader
    except ImportError:
        return []
    passages: list[PassageText] = []
    try:
        reader = PdfReader(io.BytesIO(data))
        for number, page in enumerate(reader.pages, start=1):
            if len(passages) >= limit:
                break
            text = page.extract_text() or ""
            for piece in split_text(text, size=size, overlap=overlap, limit=limit - len(passages)):
                passages.append(PassageText(piece, number))
    except Exception as exc:  # a damaged or encrypted PDF: what was read so far stays
        log.warning("a PDF could not be read to its end: %s", type(exc).__name__)
    return passages


# -- the finder ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Considered:
    file: StoredFile
    kind: FileKind
    fingerprint: str


class _OwnerLocks:
    """One lock per key, made when first wanted and dropped when nobody holds or waits for it (bounded by the
    keys in use)."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[anyio.Lock, int]] = {}

    def __call__(self, key: tuple[str, str]) -> _Held:
        return _Held(self, key)


class _Held:
    __slots__ = ("key", "locks")

    def __init__(self, locks: _OwnerLocks, key: tuple[str, str]) -> None:
        self.locks = locks
        self.key = key

    async def __aenter__(self) -> None:
        lock, users = self.locks._locks.get(self.key) or (anyio.Lock(), 0)
        self.locks._locks[self.key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *_: object) -> None:
        self.locks._locks[self.key][0].release()
        self._release_user()

    def _release_user(self) -> None:
        lock, users = self.locks._locks[self.key]
        if users <= 1:
            del self.locks._locks[self.key]
        else:
            self.locks._locks[self.key] = (lock, users - 1)


class FileSources:
    """A :class:`~ozwell_asgi.protocols.SourceFinder` over a :class:`~ozwell_asgi.protocols.FileStore`: the owner's
    text files, embedded with ``model`` through ``embeddings`` when first needed and kept in ``index``.

    ``index`` defaults to a :class:`~ozwell_asgi.stores.passages.MemoryPassageIndex` (this process's memory).
    ``purposes`` limits the files searched to those purposes (``None``: every purpose). ``model`` is checked to be
    an embedding model of ``embeddings`` on first use (a 503 naming the model until it is).
    """

    def __init__(
        self,
        files: FileStore,
        embeddings: EmbeddingBackend,
        model: str,
        index: PassageIndex | None = None,
        *,
        limits: SourceLimits | None = None,
        purposes: Iterable[str] | None = None,
        pdf: bool | None = None,
    ) -> None:
        if index is None:
            from .stores.passages import MemoryPassageIndex

            index = MemoryPassageIndex()
        self.files = files
        self.embeddings = embeddings
        self.model = model
        self.index = index
        self.limits = limits or SourceLimits()
        self.purposes = None if purposes is None else frozenset(purposes)
        self.pdf = pdf_supported() if pdf is None else pdf
        self._model_checked = False
        self._locks = _OwnerLocks()

    async def find(self, principal: Principal, query: str, call: Call, limit: int) -> list[Source]:
        """The best ``limit`` passages (at most ``max_results``) of the owner's files for ``query``, best first."""
        limit = min(limit, self.limits.max_results)
        query = query.strip()[: self.limits.max_query_chars]
        if limit < 1 or not query:
            return []
        await self._check_model()
        owner = principal.owner
        considered = await self._considered(owner)
        await self._refresh(owner, call, considered)
        if not considered:
            return []
        [vector] = await self._embed([query], call)
        hits = await self.index.search(owner, self.model, vector, limit, file_ids=list(considered))
        sources: list[Source] = []
        for passage, score in hits:
            entry = considered.get(passage.file_id)
            if entry is None:  # the index answered for a file we did not ask about: never shown
                continue
            score = max(-1.0, min(1.0, float(score)))
            sources.append(Source(passage.file_id, entry.file.filename, passage.page, passage.text, score))
        return sources

    async def refresh(self, owner: str, call: Call) -> int:
        """Bring ``owner``'s passages up to date (what ``find`` does first, e.g. to index ahead of the first
        question); how many files were indexed."""
        return await self._refresh(owner, call, await self._considered(owner))

    async def _refresh(self, owner: str, call: Call, considered: Mapping[str, _Considered]) -> int:
        async with self._locks((owner, self.model)):
            held = await self.index.fingerprints(owner, self.model)
            for file_id in held.keys() - considered.keys():
                await self.index.delete_file(owner, file_id)
            indexed = 0
            for file_id, entry in considered.items():
                if held.get(file_id) != entry.fingerprint:
                    await self._index_file(owner, entry, call)
                    indexed += 1
        return indexed

    async def _check_model(self) -> None:
        if self._model_checked:
            return
        for info in await self.embeddings.list_models():
            if info.id == self.model:
                if info.kind == "embedding":
                    self._model_checked = True
                    return
                break
        log.error("include_sources: %r is not an embedding model of the backend", self.model)
        raise ServiceUnavailableError(
            f"Sources are unavailable: the embedding model `{self.model}` is not served by this server's backend.",
            code="sources_unavailable",
        )

    async def _considered(self, owner: str) -> dict[str, _Considered]:
        """The owner's files to search, newest first, within the file and byte caps."""
        limits = self.limits
        kept: dict[str, _Considered] = {}
        total = 0
        listed = 0
        after: str | None = None
        while listed < limits.max_listed and len(kept) < limits.max_files:
            page = await self.files.list(owner, PageQuery(limit=min(100, limits.max_listed - listed), after=after))
            for file in page.data:
                listed += 1
                kind = file_kind(file)
                if kind is None or file.bytes <= 0 or (self.purposes is not None and file.purpose not in self.purposes):
                    continue
                if kind == "pdf" and (not self.pdf or file.bytes > limits.max_file_bytes):
                    reader = "none"  # kept, with no passages: a later pypdf install changes the fingerprint
                    cost = 0
                else:
                    reader = kind
                    cost = min(file.bytes, limits.max_file_bytes)
                if total + cost > limits.max_total_bytes:
                    continue
                total += cost
                kept[file.id] = _Considered(file, kind, self._fingerprint(file, reader))
                if len(kept) >= limits.max_files:
                    break
            if not page.has_more or not page.data:
                break
            after = page.data[-1].id
        return kept

    def _fingerprint(self, file: StoredFile, reader: str) -> str:
        """What the passages of ``file`` depend on: the file (ids are never reused, contents never change), how it
        is read and cut. Another fingerprint than the index holds means: index it again."""
        limits = self.limits
        parts = (
            SPLITTER_VERSION,
            reader,
            file.bytes,
            file.created_at,
            limits.passage_chars,
            limits.overlap_chars,
            limits.max_passages_per_file,
            limits.max_file_bytes,
        )
        return hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()

    async def _index_file(self, owner: str, entry: _Considered, call: Call) -> None:
        file = entry.file
        limits = self.limits
        texts: list[PassageText] = []
        if entry.kind != "pdf" or (self.pdf and file.bytes <= limits.max_file_bytes):
            data = await self._read(owner, file.id, limits.max_file_bytes)
            if data is None:  # deleted meanwhile: the next find forgets it
                return
            split: Callable[[], list[PassageText]] = lambda: split_file(  # noqa: E731
                entry.kind,
                data,
                size=limits.passage_chars,
                overlap=limits.overlap_chars,
                limit=limits.max_passages_per_file,
            )
            texts = await anyio.to_thread.run_sync(split)
        vectors: list[Sequence[float]] = []
        for start in range(0, len(texts), limits.embed_batch):
            batch = [p.text for p in texts[start : start + limits.embed_batch]]
            vectors.extend(await self._embed(batch, call))
        passages = [Passage(file.id, ordinal, p.page, p.text) for ordinal, p in enumerate(texts)]
        await self.index.add(owner, self.model, file.id, entry.fingerprint, passages, vectors)

    async def _read(self, owner: str, file_id: str, cap: int) -> bytes | None:
        stream = await self.files.open(owner, file_id, 0, cap)
        if stream is None:
            return None
        data = bytearray()
        try:
            async for chunk in stream:
                data += chunk[: cap - len(data)]
                if len(data) >= cap:
                    break
        except FileNotFoundError:  # deleted while it was read
            return None
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
        return bytes(data)

    async def _embed(self, texts: list[str], call: Call) -> Sequence[Sequence[float]]:
        request = EmbeddingRequest(input=texts, model=self.model)
        result = await self.embeddings.embed(request, call)
        if len(result.vectors) != len(texts):
            raise BadGatewayError(f"The model returned {len(result.vectors)} embeddings for {len(texts)} inputs.")
        return result.vectors
