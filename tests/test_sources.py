"""The retrieval behind ``include_sources`` (ozwell_asgi.sources, ozwell_asgi.stores.passages):

- the splitter: prose by paragraphs/lines/sentences/words with overlap, JSON by records, CSV by rows under their
  header, PDF by page (a real PDF made here, read by pypdf), and what is skipped;
- the PassageIndex contract over memory, SQLite and PostgreSQL (a database per test): cosine scores, best first,
  owner and model scoping, replacement, idempotent concurrent adds, deletion, dimensions;
- FileSources end to end on the real memory file store (and SQL): the echo backend's embeddings, a bag-of-words
  embedding backend for ranking, owner isolation, deleted files, every cap, indexing once under concurrency;
- the app's wiring (``OzwellAPI(sources_model=..., passage_index=...)``), files uploaded with the openai SDK.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.backends.echo import EchoBackend
from ozwell_asgi.errors import ServiceUnavailableError
from ozwell_asgi.protocols import PassageIndex, SourceFinder
from ozwell_asgi.sources import (
    FileSources,
    Passage,
    PassageText,
    SourceLimits,
    file_kind,
    split_file,
    split_records,
    split_text,
)
from ozwell_asgi.stores.memory import MemoryFileStore, MemoryStorage
from ozwell_asgi.stores.passages import MemoryPassageIndex, SQLPassageIndex
from ozwell_asgi.stores.sql import SQLDatabase
from ozwell_asgi.types import Call, EmbeddingResult, ModelInfo, Principal, Quota, StoredFile
from ozwell_asgi.wire.embeddings import EmbeddingRequest
from tests.harness import async_openai

pytestmark = pytest.mark.anyio

SECRET = "s" * 32


# --- helpers ----------------------------------------------------------------------------------------------------


def principal(owner: str) -> Principal:
    return Principal(key_id=f"key_{owner}", owner=owner, plan="free", quota=Quota(None, None))


def call(owner: str = "alice") -> Call:
    return Call(request_id="req_sources", principal=principal(owner), endpoint="responses")


def words_vector(text: str, dim: int = 512) -> list[float]:
    """A bag of words: each word (lowercased, a trailing "s" dropped) adds 1 to one of ``dim`` hashed slots."""
    vector = [0.0] * dim
    for word in re.findall(r"[a-z]+", text.lower()):
        word = word[:-1] if len(word) > 3 and word.endswith("s") else word
        vector[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dim] += 1.0
    return vector


class WordsBackend:
    """An embedding backend whose vectors are bags of words, so texts sharing words are close; it counts what it
    embeds (inputs and calls)."""

    def __init__(self, model: str = "words", dim: int = 512) -> None:
        self.model = model
        self.dim = dim
        self.inputs: list[str] = []
        self.calls = 0

    async def list_models(self) -> Sequence[ModelInfo]:
        return [ModelInfo(self.model, kind="embedding"), ModelInfo("chatty", kind="chat")]

    async def embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        self.calls += 1
        texts = [str(item) for item in request.inputs()]
        self.inputs.extend(texts)
        await anyio.lowlevel.checkpoint()  # a real backend suspends: lets concurrent finds interleave
        return EmbeddingResult(vectors=[words_vector(t, self.dim) for t in texts], prompt_tokens=len(texts))


async def put(store: MemoryFileStore, owner: str, file_id: str, name: str, data: bytes, **fields: Any) -> StoredFile:
    async def content() -> AsyncIterator[bytes]:
        yield data

    file = StoredFile(id=file_id, owner=owner, filename=name, purpose=fields.pop("purpose", "user_data"), **fields)
    return await store.create(file, content())


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb) if na and nb else 0.0


def make_pdf(pages: Sequence[str]) -> bytes:
    """A real PDF of one line of Helvetica text per page, its cross-reference table at the right offsets."""
    count = len(pages)
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(count)), count),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for i, text in enumerate(pages):
        stream = b"BT /F1 12 Tf 72 720 Td (%s) Tj ET" % text.encode("latin-1")
        objects[4 + 2 * i] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (5 + 2 * i)
        )
        objects[5 + 2 * i] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


PROSE = "\n\n".join(
    f"Paragraph {i} talks about topic{i} at some length. " + " ".join(f"word{i}x{j}" for j in range(15))
    for i in range(12)
)


# --- the splitter -----------------------------------------------------------------------------------------------


def test_prose_is_cut_at_paragraphs_within_the_size_with_overlap() -> None:
    passages = split_text(PROSE, size=600, overlap=250)
    assert len(passages) > 3
    assert all(0 < len(p) <= 600 for p in passages)
    words = set(PROSE.split())
    assert set(" ".join(passages).split()) == words  # nothing lost, nothing invented
    for p in passages:  # never cut mid-word
        assert set(p.split()) <= words
    # each passage repeats the end of the previous one: a whole paragraph of under 250 characters
    paragraphs = PROSE.split("\n\n")
    assert all(len(par) < 250 for par in paragraphs)
    for before, after in itertools.pairwise(passages):
        assert before.split("\n\n")[-1] == after.split("\n\n")[0]


def test_without_overlap_nothing_repeats_and_the_text_comes_back() -> None:
    passages = split_text(PROSE, size=500, overlap=0)
    assert "\n\n".join(passages) == PROSE.strip()


def test_a_long_paragraph_is_cut_at_lines_then_sentences_then_words_then_hard() -> None:
    lines = "\n".join(f"line {i} " + "x" * 40 for i in range(20))
    assert all(p.startswith("line ") for p in split_text(lines, size=100, overlap=0))
    sentences = " ".join(f"Sentence number {i} ends here." for i in range(40))
    cut = split_text(sentences, size=90, overlap=0)
    assert all(p.startswith("Sentence") and p.endswith(".") for p in cut)
    words = " ".join(f"w{i:03d}" for i in range(200))
    assert all(re.fullmatch(r"(w\d{3} ?)+", p) for p in split_text(words, size=50, overlap=10))
    long_word = "z" * 250
    assert split_text(long_word, size=100, overlap=0) == ["z" * 100, "z" * 100, "z" * 50]


def test_the_passage_limit_and_blank_text() -> None:
    assert len(split_text(PROSE, size=200, overlap=0, limit=3)) == 3
    assert split_text("  \n\n \t ", size=100) == []
    assert split_text("a\x00b", size=100) == ["ab"]
    with pytest.raises(ValueError, match="overlap"):
        split_text("x", size=10, overlap=-1)


def test_csv_rows_go_under_their_header_and_never_split_or_overlap() -> None:
    rows = [f"{i},name {i},{'note ' * (i % 5)}" for i in range(60)]
    data = ("id,name,notes\n" + "\n".join(rows)).encode()
    passages = split_file("csv", data, size=200, overlap=50)
    assert len(passages) > 3
    assert all(p.text.startswith("id,name,notes\n") and len(p.text) <= 200 and p.page is None for p in passages)
    seen = [line for p in passages for line in p.text.split("\n")[1:]]
    assert [line.split(",")[0] for line in seen] == [str(i) for i in range(60)]  # every row once, in order


def test_csv_quoted_newlines_and_tsv() -> None:
    data = b'q,a\n"multi\nline question","yes, quoted"\nplain,row\n'
    [passage] = split_file("csv", data, size=500)
    assert passage.text == 'q,a\nmulti line question,"yes, quoted"\nplain,row'
    [tsv] = split_file("tsv", b"a\tb\n1\t2\n", size=500)
    assert tsv.text == "a\tb\n1\t2"


def test_json_is_cut_by_records() -> None:
    items = [{"id": i, "title": f"item {i}", "body": "text " * 10} for i in range(30)]
    passages = split_file("json", json.dumps(items).encode(), size=300)
    records = [json.loads(line) for p in passages for line in p.text.split("\n")]
    assert records == items  # whole records, each once, in order
    [obj] = split_file("json", json.dumps({"name": "Ozwell", "port": 8000}).encode(), size=300)
    assert obj.text == '"name": "Ozwell"\n"port": 8000'
    lines = split_file("jsonl", b'{"a": 1}\n\n{"a": 2}\n', size=300)
    assert [p.text for p in lines] == ['{"a": 1}\n{"a": 2}']
    broken = split_file("json", b'{"not": "closed"', size=300)  # not JSON: cut as text
    assert [p.text for p in broken] == ['{"not": "closed"']


def test_a_record_longer_than_a_passage_is_cut_as_prose() -> None:
    passages = split_records(["short", "long " * 100], size=120)
    assert passages[0].startswith("short")
    assert all(len(p) <= 120 for p in passages)
    assert sum(p.count("long") for p in passages) == 100


def test_binary_text_gives_nothing_and_utf8_bom_is_dropped() -> None:
    assert split_file("text", b"\x89PNG\x00\x00binary") == []
    assert split_file("text", "\ufeffhello".encode()) == [PassageText("hello")]
    assert split_file("text", b"caf\xe9 latin-1") == [PassageText("caf\ufffd latin-1")]


def test_pdf_passages_carry_their_page() -> None:
    pytest.importorskip("pypdf")
    data = make_pdf(["The first page speaks of apples.", "The second page speaks of pears.", ""])
    passages = split_file("pdf", data, size=500)
    assert [(p.page, p.text) for p in passages] == [
        (1, "The first page speaks of apples."),
        (2, "The second page speaks of pears."),
    ]
    assert len(split_file("pdf", data, size=500, limit=1)) == 1


def test_a_damaged_pdf_or_no_pypdf_gives_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pypdf")
    assert split_file("pdf", b"%PDF-1.4 this is not really a pdf") == []
    data = make_pdf(["Apples."])
    assert split_file("pdf", data[: len(data) // 2]) == []
    monkeypatch.setitem(sys.modules, "pypdf", None)  # as if the pdf extra were not installed
    assert split_file("pdf", data) == []


def test_which_files_are_read() -> None:
    def kind(name: str, content_type: str = "application/octet-stream") -> str | None:
        return file_kind(StoredFile(id="f", owner="o", filename=name, purpose="user_data", content_type=content_type))

    assert [kind(n) for n in ("a.txt", "b.MD", "c.json", "d.jsonl", "e.csv", "f.tsv", "g.pdf")] == [
        "text",
        "text",
        "json",
        "jsonl",
        "csv",
        "tsv",
        "pdf",
    ]
    assert kind("photo.png") is None
    assert kind("notes", "text/plain; charset=utf-8") == "text"
    assert kind("data.bin", "application/json") == "json"


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="overlap_chars"):
        SourceLimits(overlap_chars=-1)
    with pytest.raises(ValueError, match="max_files"):
        SourceLimits(max_files=0)
    with pytest.raises(ValueError, match="embed_batch"):
        SourceLimits(embed_batch=5000)


# --- the PassageIndex contract ----------------------------------------------------------------------------------

INDEXES = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("sqlite-small-batches"),
    pytest.param("postgres", marks=pytest.mark.services),
]


@pytest.fixture(params=INDEXES)
def index_storage(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """An index's name and the URL of its (new, private) database."""
    name: str = request.param
    if name == "postgres":
        return name, request.getfixturevalue("postgres_url")
    return name, f"sqlite:///{tmp_path / 'p.db'}"


@pytest.fixture
async def index(index_storage: tuple[str, str]) -> AsyncIterator[PassageIndex]:
    name, url = index_storage
    if name == "memory":
        yield MemoryPassageIndex()
        return
    db = SQLDatabase.from_url(url)
    yield db.passage_index(scan_batch=3) if name.endswith("small-batches") else db.passage_index()
    await db.aclose()


def passages_of(file_id: str, texts: Sequence[str], pages: Sequence[int | None] | None = None) -> list[Passage]:
    return [Passage(file_id, i, None if pages is None else pages[i], t) for i, t in enumerate(texts)]


VECTORS = {
    "north": [1.0, 0.0, 0.0],
    "north-east": [1.0, 1.0, 0.0],
    "east": [0.0, 2.0, 0.0],
    "up": [0.0, 0.0, 3.0],
    "south": [-1.0, 0.0, 0.0],
}


async def add_compass(index: PassageIndex, owner: str = "alice", model: str = "m", file_id: str = "file-a") -> None:
    names = list(VECTORS)
    await index.add(owner, model, file_id, "fp1", passages_of(file_id, names, [1, 1, 2, 2, 3]), list(VECTORS.values()))


async def test_search_gives_cosine_scores_best_first(index: PassageIndex) -> None:
    assert isinstance(index, PassageIndex)
    await add_compass(index)
    query = [2.0, 1.0, 0.0]
    hits = await index.search("alice", "m", query, 10)
    expected = sorted(VECTORS, key=lambda n: -cosine(VECTORS[n], query))
    assert [p.text for p, _ in hits] == expected
    for passage, score in hits:
        assert score == pytest.approx(cosine(VECTORS[passage.text], query), abs=1e-6)
        assert passage.file_id == "file-a"
    assert [(p.ordinal, p.page) for p, _ in hits[:2]] == [(1, 1), (0, 1)]
    assert [p.text for p, _ in await index.search("alice", "m", query, 2)] == expected[:2]
    assert await index.search("alice", "m", query, 0) == []
    assert await index.search("alice", "m", [0.0, 0.0, 0.0], 5) == []  # a zero query: no direction to rank by
    assert await index.search("alice", "m", [1.0, 0.0], 5) == []  # another dimension scores nothing


async def test_everything_is_scoped_by_owner_and_model(index: PassageIndex) -> None:
    await add_compass(index, owner="alice")
    await index.add("bob", "m", "file-b", "fpb", passages_of("file-b", ["bob's north"]), [[1.0, 0.0, 0.0]])
    await index.add("alice", "other", "file-a", "fpo", passages_of("file-a", ["other model"]), [[1.0, 0.0, 0.0]])
    north = [1.0, 0.0, 0.0]
    assert {p.text for p, _ in await index.search("bob", "m", north, 10)} == {"bob's north"}
    assert {p.text for p, _ in await index.search("alice", "other", north, 10)} == {"other model"}
    assert "bob's north" not in {p.text for p, _ in await index.search("alice", "m", north, 10)}
    assert await index.search("carol", "m", north, 10) == []
    assert await index.fingerprints("alice", "m") == {"file-a": "fp1"}
    assert await index.fingerprints("bob", "m") == {"file-b": "fpb"}
    assert await index.fingerprints("bob", "other") == {}
    await index.delete_file("bob", "file-a")  # bob naming alice's file removes nothing of hers
    assert len(await index.search("alice", "m", north, 10)) == 5
    await index.delete_file("alice", "file-a")  # every model of alice's file
    assert await index.search("alice", "m", north, 10) == []
    assert await index.search("alice", "other", north, 10) == []
    assert await index.fingerprints("alice", "m") == {}
    assert len(await index.search("bob", "m", north, 10)) == 1


async def test_add_replaces_a_file_and_remembers_empty_ones(index: PassageIndex) -> None:
    await add_compass(index)
    await index.add("alice", "m", "file-a", "fp2", passages_of("file-a", ["only"]), [[0.0, 1.0, 0.0]])
    hits = await index.search("alice", "m", [1.0, 1.0, 1.0], 10)
    assert [(p.text, p.ordinal) for p, _ in hits] == [("only", 0)]
    await index.add("alice", "m", "empty", "fp-empty", [], [])
    assert await index.fingerprints("alice", "m") == {"file-a": "fp2", "empty": "fp-empty"}
    with pytest.raises(ValueError, match="one vector per passage"):
        await index.add("alice", "m", "bad", "fp", passages_of("bad", ["a", "b"]), [[1.0, 0.0, 0.0]])


async def test_search_within_some_files(index: PassageIndex) -> None:
    await add_compass(index, file_id="file-a")
    await index.add("alice", "m", "file-b", "fpb", passages_of("file-b", ["b north"]), [[1.0, 0.0, 0.0]])
    north = [1.0, 0.0, 0.0]
    assert {p.file_id for p, _ in await index.search("alice", "m", north, 10, file_ids=["file-b"])} == {"file-b"}
    assert len(await index.search("alice", "m", north, 10, file_ids=["file-a", "file-b"])) == 6
    assert await index.search("alice", "m", north, 10, file_ids=[]) == []
    assert await index.search("alice", "m", north, 10, file_ids=["nope"]) == []


async def test_concurrent_adds_of_one_file_leave_one_copy(index: PassageIndex) -> None:
    texts = [f"passage {i}" for i in range(40)]
    vectors = [[1.0, float(i), 0.5] for i in range(40)]

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(index.add, "alice", "m", "file-a", "fp", passages_of("file-a", texts), vectors)
    hits = await index.search("alice", "m", [1.0, 0.0, 0.0], 100)
    assert sorted(p.text for p, _ in hits) == sorted(texts)
    assert await index.fingerprints("alice", "m") == {"file-a": "fp"}


async def test_text_and_pages_survive_as_given(index: PassageIndex) -> None:
    text = "Ünïcode — “quotes”, emoji 🙂 and\nnew lines"
    await index.add("alice", "m", "f", "fp", [Passage("f", 0, 7, text)], [[0.3, 0.4, 0.5]])
    [(passage, score)] = await index.search("alice", "m", [0.3, 0.4, 0.5], 3)
    assert passage == Passage("f", 0, 7, text)
    assert score == pytest.approx(1.0, abs=1e-6)


async def test_the_memory_index_forgets_the_least_recently_used_owner_past_its_cap() -> None:
    index = MemoryPassageIndex(max_bytes=60_000)
    vectors = [[1.0] * 256 for _ in range(20)]  # 20 KiB of float32 each add
    for owner in ("a", "b", "c"):
        await index.add(owner, "m", "f", "fp", passages_of("f", ["x"] * 20), vectors)
        await index.search("a", "m", [1.0] * 256, 1)  # "a" stays in use
    assert index.nbytes <= 60_000
    assert await index.fingerprints("a", "m") == {"f": "fp"}
    assert await index.fingerprints("b", "m") == {}  # forgotten: indexed again when next needed
    assert await index.fingerprints("c", "m") == {"f": "fp"}


# --- FileSources end to end ------------------------------------------------------------------------------------


@pytest.fixture
def store() -> MemoryFileStore:
    return MemoryFileStore()


DOCS = {
    "cats.md": "# Cats\n\nCats purr when they are content. A cat sleeps for most of the day.",
    "boats.txt": "Boats float on water. A sailing boat uses the wind; a motor boat burns fuel.",
    "bread.txt": "Bread rises because yeast makes gas. Bakers knead the dough before baking bread.",
}


async def test_finds_the_passages_that_answer_best_first(store: MemoryFileStore) -> None:
    backend = WordsBackend()
    for i, (name, text) in enumerate(DOCS.items()):
        await put(store, "alice", f"file-{i}", name, text.encode(), created_at=i)
    finder = FileSources(store, backend, "words")
    assert isinstance(finder, SourceFinder)
    sources = await finder.find(principal("alice"), "why does my cat purr?", call(), 3)
    assert [s.filename for s in sources][:1] == ["cats.md"]
    top = sources[0]
    assert (top.file_id, top.page, top.excerpt) == ("file-0", None, DOCS["cats.md"])
    assert top.score == pytest.approx(cosine(words_vector(DOCS["cats.md"]), words_vector("why does my cat purr?")))
    assert [s.score for s in sources] == sorted((s.score for s in sources), reverse=True)
    assert (await finder.find(principal("alice"), "how do boats float", call(), 1))[0].filename == "boats.txt"
    assert (await finder.find(principal("alice"), "baking bread with yeast", call(), 1))[0].filename == "bread.txt"


async def test_the_echo_embeddings_find_an_exact_passage(store: MemoryFileStore) -> None:
    """Echo vectors are hashes of the text: unrelated texts are near-orthogonal, the same text is identical."""
    text = "\n\n".join(f"Fact {i}: the value of setting {i} is {i * 7}." for i in range(50))
    await put(store, "alice", "file-1", "facts.txt", text.encode())
    finder = FileSources(
        store, EchoBackend(), "echo-embedding", limits=SourceLimits(passage_chars=200, overlap_chars=50)
    )
    passages = split_text(text, size=200, overlap=50)
    wanted = passages[3]
    [best, *rest] = await finder.find(principal("alice"), wanted, call(), 5)
    assert (best.excerpt, best.score) == (wanted, pytest.approx(1.0, abs=1e-6))
    assert all(abs(s.score) < 0.2 for s in rest)


async def test_another_owner_never_sees_the_passages(store: MemoryFileStore) -> None:
    backend = WordsBackend()
    await put(store, "alice", "file-a", "secret.txt", b"The launch code is purple elephant.")
    await put(store, "bob", "file-b", "bob.txt", b"Bob likes gardening and tomatoes.")
    finder = FileSources(store, backend, "words")
    query = "the launch code purple elephant"
    assert [s.file_id for s in await finder.find(principal("alice"), query, call(), 5)] == ["file-a"]
    assert [s.file_id for s in await finder.find(principal("bob"), query, call("bob"), 5)] == ["file-b"]
    assert await finder.find(principal("carol"), query, call("carol"), 5) == []


async def test_a_deleted_file_is_forgotten(store: MemoryFileStore) -> None:
    backend = WordsBackend()
    index = MemoryPassageIndex()
    await put(store, "alice", "file-a", "a.txt", b"Apples are red.", created_at=1)
    await put(store, "alice", "file-b", "b.txt", b"Apples are sometimes green.", created_at=2)
    finder = FileSources(store, backend, "words", index)
    assert {s.file_id for s in await finder.find(principal("alice"), "apples", call(), 5)} == {"file-a", "file-b"}
    assert await store.delete("alice", "file-a")
    assert {s.file_id for s in await finder.find(principal("alice"), "apples", call(), 5)} == {"file-b"}
    assert set(await index.fingerprints("alice", "words")) == {"file-b"}


async def test_each_file_is_embedded_once_even_by_concurrent_finds(store: MemoryFileStore) -> None:
    backend = WordsBackend()
    text = "\n\n".join(f"Paragraph {i} about subject{i}." for i in range(200))
    await put(store, "alice", "file-a", "a.md", text.encode())
    await put(store, "alice", "file-b", "b.md", b"Another file.")
    finder = FileSources(store, backend, "words", limits=SourceLimits(passage_chars=100, overlap_chars=0))
    expected = len(split_text(text, size=100, overlap=0)) + 1

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(finder.find, principal("alice"), "subject7", call(), 3)
    assert len(backend.inputs) == expected + 4  # every passage once, and each of the four queries
    await finder.find(principal("alice"), "subject8", call(), 3)
    assert len(backend.inputs) == expected + 5  # nothing indexed again: only the query
    assert finder._locks._locks == {}  # no lock left behind
    await put(store, "alice", "file-c", "c.md", b"A third file.")
    assert await finder.refresh("alice", call()) == 1  # indexing ahead of a question: only the new file
    assert backend.inputs[-1] == "A third file."


async def test_two_processes_share_a_sql_index(tmp_path: Path, store: MemoryFileStore) -> None:
    """Two finders (as two processes would be) on one SQLite database index concurrently: one copy remains, and the
    second process reuses what the first indexed."""

    def tag(i: int) -> str:  # a word per number: 42 is "qec"
        return "q" + "".join("abcdefghij"[int(c)] for c in str(i))

    await put(store, "alice", "file-a", "a.md", "\n\n".join(f"Topic {tag(i)} matters." for i in range(80)).encode())
    db = SQLDatabase.from_url(f"sqlite:///{tmp_path / 'shared.db'}")
    limits = SourceLimits(passage_chars=60, overlap_chars=0)
    one, two = WordsBackend(), WordsBackend()
    finders = [FileSources(store, b, "words", db.passage_index(), limits=limits) for b in (one, two)]
    async with anyio.create_task_group() as tg:
        for finder in finders:
            tg.start_soon(finder.find, principal("alice"), "topic 5", call(), 3)
    index = finders[0].index
    assert isinstance(index, SQLPassageIndex)
    hits = await index.search("alice", "words", words_vector("topic"), 1000)
    assert sorted(p.ordinal for p, _ in hits) == list(range(len(hits)))  # one copy of each passage
    third = WordsBackend()
    again = FileSources(store, third, "words", db.passage_index(), limits=limits)
    [found] = await again.find(principal("alice"), "which topic is qec", call(), 1)
    assert "Topic qec matters." in found.excerpt
    assert len(third.inputs) == 1  # only the query: the files were indexed by the others
    await db.aclose()


async def test_the_caps(store: MemoryFileStore) -> None:
    backend = WordsBackend()
    for i in range(6):
        await put(store, "alice", f"file-{i}", f"{i}.txt", f"Shared words in file number{i}.".encode(), created_at=i)
    finder = FileSources(store, backend, "words", limits=SourceLimits(max_files=3, max_results=2))
    found = await finder.find(principal("alice"), "shared words", call(), 10)
    assert len(found) == 2  # max_results
    found = await finder.find(principal("alice"), "number0 number1 number2 number3 number4 number5", call(), 2)
    assert {s.file_id for s in found} <= {"file-3", "file-4", "file-5"}  # only the newest three are considered
    assert set(await finder.index.fingerprints("alice", "words")) == {"file-3", "file-4", "file-5"}


async def test_byte_and_passage_caps(store: MemoryFileStore) -> None:
    backend = WordsBackend()
    head = b"The beginning mentions alpha. " * 10
    await put(store, "alice", "long", "long.txt", head + b"The end mentions omega. " * 100, created_at=1)
    limits = SourceLimits(passage_chars=100, overlap_chars=0, max_file_bytes=len(head), max_total_bytes=10_000)
    finder = FileSources(store, backend, "words", limits=limits)
    assert all("omega" not in s.excerpt for s in await finder.find(principal("alice"), "omega", call(), 20))
    assert any("alpha" in s.excerpt for s in await finder.find(principal("alice"), "alpha", call(), 20))

    few = FileSources(store, WordsBackend(), "words", limits=SourceLimits(passage_chars=100, max_passages_per_file=2))
    assert len(await few.find(principal("alice"), "mentions", call(), 20)) == 2

    # a file that would pass the total byte cap is left out; a smaller older one still fits
    await put(store, "bob", "small", "small.txt", b"tiny note about kiwis", created_at=1)
    await put(store, "bob", "big", "big.txt", b"big note about kiwis " * 1000, created_at=2)
    capped = FileSources(store, WordsBackend(), "words", limits=SourceLimits(max_total_bytes=1000))
    assert {s.file_id for s in await capped.find(principal("bob"), "kiwis", call("bob"), 5)} == {"small"}


async def test_only_readable_files_of_the_chosen_purposes(store: MemoryFileStore) -> None:
    backend = WordsBackend()
    await put(store, "alice", "img", "photo.png", b"zebra zebra zebra", content_type="image/png")
    await put(store, "alice", "batch", "b.jsonl", b'{"zebra": 1}\n', purpose="batch")
    await put(store, "alice", "notes", "n.txt", b"a zebra note")
    await put(store, "alice", "empty", "e.txt", b"")
    finder = FileSources(store, backend, "words", purposes=["user_data", "assistants"])
    assert [s.file_id for s in await finder.find(principal("alice"), "zebra", call(), 5)] == ["notes"]
    everything = FileSources(store, WordsBackend(), "words")
    assert {s.file_id for s in await everything.find(principal("alice"), "zebra", call(), 5)} == {"notes", "batch"}


async def test_pdfs_are_searched_by_page_or_skipped_without_pypdf(store: MemoryFileStore) -> None:
    pytest.importorskip("pypdf")
    await put(store, "alice", "pdf", "guide.pdf", make_pdf(["Install the pump first.", "Then prime the valve."]))
    await put(store, "alice", "txt", "notes.txt", b"The valve notes are here.")
    finder = FileSources(store, WordsBackend(), "words")
    found = await finder.find(principal("alice"), "prime the valve", call(), 1)
    assert [(s.file_id, s.filename, s.page, s.excerpt) for s in found] == [
        ("pdf", "guide.pdf", 2, "Then prime the valve.")
    ]
    without = FileSources(store, WordsBackend(), "words", pdf=False)
    assert {s.file_id for s in await without.find(principal("alice"), "prime the valve", call(), 5)} == {"txt"}
    assert "pdf" in await without.index.fingerprints("alice", "words")  # remembered, with nothing in it


async def test_nothing_to_search_costs_no_embedding(store: MemoryFileStore) -> None:
    backend = WordsBackend()
    finder = FileSources(store, backend, "words")
    assert await finder.find(principal("alice"), "anything", call(), 5) == []
    await put(store, "alice", "f", "f.txt", b"something")
    assert await finder.find(principal("alice"), "   ", call(), 5) == []
    assert await finder.find(principal("alice"), "something", call(), 0) == []
    assert backend.calls == 0


async def test_a_model_that_is_not_an_embedding_model_is_a_clear_503(store: MemoryFileStore) -> None:
    await put(store, "alice", "f", "f.txt", b"something")
    for model in ("chatty", "missing"):
        finder = FileSources(store, WordsBackend(), model)
        with pytest.raises(ServiceUnavailableError, match=f"embedding model `{model}`") as caught:
            await finder.find(principal("alice"), "something", call(), 5)
        assert caught.value.code == "sources_unavailable"


# --- the app's wiring -------------------------------------------------------------------------------------------


async def test_the_app_searches_files_uploaded_with_the_sdk(tmp_path: Path) -> None:
    api = OzwellAPI(secret=SECRET, backend=WordsBackend(), sources_model="words")
    _, alice = await api.keys.create(name="alice", owner="alice")
    client = async_openai(api, alice, max_retries=0)
    created = await client.files.create(file=("faq.md", DOCS["boats.txt"].encode()), purpose="user_data")
    await client.files.create(file=("bread.txt", DOCS["bread.txt"].encode()), purpose="user_data")
    sources = api.services.sources
    assert sources is not None
    [best] = await sources.find(principal("alice"), "sailing boat wind", call(), 1)
    assert (best.file_id, best.filename, best.page) == (created.id, "faq.md", None)
    assert await sources.find(principal("bob"), "sailing boat wind", call("bob"), 1) == []
    await client.close()
    await api.aclose()


async def test_the_app_picks_the_passage_index(tmp_path: Path) -> None:
    assert OzwellAPI(secret=SECRET).services.sources is None  # no sources_model: include_sources is a 400
    default = OzwellAPI(secret=SECRET, sources_model="echo-embedding").services.sources
    assert isinstance(default, FileSources) and isinstance(default.index, MemoryPassageIndex)
    url = f"sqlite:///{tmp_path / 'ozwell.db'}"
    on_sql = OzwellAPI(secret=SECRET, file_store=url, sources_model="echo-embedding")
    assert isinstance(on_sql.services.sources, FileSources)
    index = on_sql.services.sources.index
    assert isinstance(index, SQLPassageIndex) and index.db is on_sql.services.files.db  # type: ignore[union-attr]
    await on_sql.aclose()
    given = MemoryPassageIndex()
    mine = OzwellAPI(secret=SECRET, sources_model="echo-embedding", passage_index=given).services.sources
    assert isinstance(mine, FileSources) and mine.index is given
    storage = MemoryStorage()
    assert storage.passage_index() is storage.passage_index()
    by_url = OzwellAPI(secret=SECRET, sources_model="echo-embedding", passage_index=url)
    assert isinstance(by_url.services.sources, FileSources)
    assert isinstance(by_url.services.sources.index, SQLPassageIndex)
    await by_url.aclose()


async def test_the_app_refuses_sources_it_cannot_serve() -> None:
    class ChatOnly:
        async def list_models(self) -> Sequence[ModelInfo]:
            return [ModelInfo("c")]

        async def stream_chat(self, request: Any, call: Call) -> AsyncIterator[Any]:
            yield None

    with pytest.raises(ValueError, match="backend that serves embeddings"):
        OzwellAPI(secret=SECRET, backend=ChatOnly(), sources_model="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a file store"):
        OzwellAPI(secret=SECRET, file_store=None, sources_model="echo-embedding")


async def test_serve_keeps_passages_in_the_file_stores_database(tmp_path: Path) -> None:
    """What ``serve --sources-model echo-embedding`` builds: FileSources on the echo backend, its passages in the
    SQLite database that holds the files (one engine), and nothing of the kind without the flag."""
    from ozwell_asgi.cli.serve import build_app
    from ozwell_asgi.cli.settings import ServeConfig

    store = f"sqlite:///{tmp_path / 'ozwell.db'}"
    config = ServeConfig(store_url=store, secret="s" * 32, sources_model="echo-embedding")
    app = build_app(config)
    sources = app.api.services.sources
    assert isinstance(sources, FileSources) and sources.model == "echo-embedding"
    assert isinstance(sources.index, SQLPassageIndex)
    assert sources.index.db is app.api.services.files.db  # type: ignore[union-attr]
    _, key = await app.api.keys.create(name="t", owner="o")
    client = async_openai(app, key, max_retries=0)
    created = await client.files.create(file=("a.txt", b"The answer is forty-two."), purpose="user_data")
    [found] = await sources.find(principal("o"), "The answer is forty-two.", call("o"), 1)
    assert (found.file_id, found.score) == (created.id, pytest.approx(1.0, abs=1e-6))
    await client.close()
    await app.api.aclose()
    await app.limiter.aclose()
    plain = build_app(ServeConfig(store_url=store, secret="s" * 32))
    assert plain.api.services.sources is None
    await plain.api.aclose()
    await plain.limiter.aclose()
