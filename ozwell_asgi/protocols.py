"""The seams: what a host implements, or picks from the bundled adapters. Nothing else lives here.

Each protocol has the fewest methods that serve every route; pagination, HTTP, errors and caching live once,
above them. Adapters raise :class:`ozwell_asgi.errors.OzwellError` for failures a client should see (a backend's
502/503/504, say); any other exception becomes a 500 with no internals.

Lifecycle is optional: if an adapter has ``async def aclose(self) -> None``, the app calls it on shutdown.
Adapters that need setup (a pool, tables) do it lazily on first use, so they work when mounted inside a host
that never runs a sub-application's lifespan.

"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .types import (
    APIKey,
    Call,
    ChatChunk,
    ChatResult,
    EmbeddingResult,
    ModelInfo,
    Page,
    PageQuery,
    Principal,
    Quota,
    Reservation,
    Source,
    StoredFile,
    StoredResponse,
)

if TYPE_CHECKING:
    from .sources import Passage
    from .wire.chat import ChatCompletionRequest
    from .wire.embeddings import EmbeddingRequest

__all__ = [
    "ChatBackend",
    "CompletesChat",
    "ContentStore",
    "EmbeddingBackend",
    "FileStore",
    "KeyStore",
    "ModelCatalog",
    "PassageIndex",
    "RateLimiter",
    "ResponseStore",
    "SourceFinder",
]


# -- model backends, by capability --------------------------------------------------------------------------------
#
# A backend is any object with ``list_models`` and at least one capability: chat (``stream_chat``, optionally
# ``complete_chat``) and/or embeddings (``embed``). The app serves the routes its capabilities allow and checks the
# backend when it is built. Requests are passed inward as the validated wire models (pydantic, as vLLM does): fields
# we do not model are in ``request.model_extra``.


@runtime_checkable
class ModelCatalog(Protocol):
    async def list_models(self) -> Sequence[ModelInfo]:
        """Every model this backend serves (``ModelInfo.kind`` says which routes take it). Called per request:
        cache it if it is costly to compute."""
        ...


@runtime_checkable
class ChatBackend(ModelCatalog, Protocol):
    def stream_chat(self, request: ChatCompletionRequest, call: Call) -> AsyncIterator[ChatChunk]:
        """The completion as it is produced (an async generator, typically): the one required chat method.

        Generate at most ``call.max_tokens`` tokens per choice. The iterator is closed (``aclose``) if the client
        goes away: release upstream resources then. Raise an ``OzwellError`` for what the client should see.
        """
        ...


@runtime_checkable
class CompletesChat(Protocol):
    async def complete_chat(self, request: ChatCompletionRequest, call: Call) -> ChatResult:
        """Optional: a whole completion for ``stream: false`` (a proxy sends it upstream non-streamed). Without it
        the app folds ``stream_chat`` into one result."""
        ...


@runtime_checkable
class EmbeddingBackend(ModelCatalog, Protocol):
    async def embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        """One vector per input of ``request.inputs()``, in order, of ``request.dimensions`` when it is set."""
        ...


@runtime_checkable
class KeyStore(Protocol):
    """Stores API keys by id and by keyed hash. Every method is atomic on its own.

    Guarantees every adapter passes (:class:`ozwell_asgi.testing.contracts.KeyStoreContract`): ``key_hash`` and
    ``id`` are unique; ``list`` and ``list_page`` are ordered by ``created_at`` then ``id``; ``revoke`` is idempotent
    and keeps the first revocation time; ``rotate`` replaces the hash of an active key, so the old secret stops
    working and the id, owner, plan and limits stay.
    """

    async def create(self, key: APIKey) -> None:
        """Store a new key; ``ValueError`` if its id or hash is taken."""
        ...

    async def get_by_hash(self, key_hash: str) -> APIKey | None: ...

    async def get(self, key_id: str) -> APIKey | None: ...

    async def list(self, owner: str | None = None) -> list[APIKey]:
        """Every key, or every key of ``owner``; revoked and expired ones included."""
        ...

    async def list_page(self, query: PageQuery, owner: str | None = None) -> Page[APIKey]:
        """One page of :meth:`list`, exactly as :func:`ozwell_asgi.pages.paginate` cuts it (a cursor that is not a
        key of ``owner`` gives an empty page); each page costs work in proportion to ``query.limit``."""
        ...

    async def revoke(self, key_id: str, at: int) -> APIKey | None:
        """Mark the key revoked at ``at``; the updated key, or ``None`` if there is no such key."""
        ...

    async def rotate(self, key_id: str, key_hash: str, hint: str) -> APIKey | None:
        """Give an active key a new secret; the updated key, or ``None`` if it is unknown or revoked."""
        ...


@runtime_checkable
class RateLimiter(Protocol):
    """Per-subject budgets of requests and tokens per minute, exact across every process sharing its storage.

    ``reserve`` takes one request and ``tokens`` tokens up front, or raises ``RateLimitError`` (429, with
    ``Retry-After``) and takes nothing; a request asking for no tokens is never refused on them.
    ``reserve_tokens`` adds tokens to an admitted reservation once a request's size is known (the app admits a
    request before reading its body, then reserves what the parsed body needs), or raises 429 and adds nothing;
    ``settle`` reconciles the reservation with the tokens really used (a refund never credits a later window).
    Storage outages follow the limiter's policy: raise ``ServiceUnavailableError`` (fail closed) or return a
    ``degraded`` reservation (fail open).
    """

    async def reserve(self, subject: str, quota: Quota, tokens: int) -> Reservation: ...

    async def reserve_tokens(self, reservation: Reservation, tokens: int) -> None: ...

    async def settle(self, reservation: Reservation, used_tokens: int) -> None: ...


@runtime_checkable
class FileStore(Protocol):
    """Owner-scoped files: metadata and content, content always as async byte iterators (never one bytes object).

    Guarantees every adapter passes (the contract suite): another owner's id behaves exactly like an unknown one;
    ``create`` is all or nothing (if ``content`` raises, e.g. a client gone mid-upload or a body over the cap, neither
    metadata nor bytes remain); ``list`` is ordered by ``(created_at, id)`` and stable under concurrent creates.
    """

    async def create(self, file: StoredFile, content: AsyncIterable[bytes]) -> StoredFile:
        """Store ``file`` and its ``content``; the stored file (``bytes`` set to the content's size).

        ``file`` is kept as it stands once ``content`` is exhausted: an upload's form fields (``purpose``,
        ``expires_at``) may follow its bytes, and the route fills them in on the same object when the body ends.
        Write the metadata last (or write it again then); only ``id`` and ``owner`` are final from the start."""
        ...

    async def get(self, owner: str, file_id: str) -> StoredFile | None: ...

    async def list(self, owner: str, query: PageQuery, purpose: str | None = None) -> Page[StoredFile]: ...

    async def open(
        self, owner: str, file_id: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes] | None:
        """The content from byte ``start`` up to ``end`` (exclusive; ``None``: to the end), or ``None`` if there is
        no such file of ``owner``."""
        ...

    async def delete(self, owner: str, file_id: str) -> bool:
        """Remove the file and its content; ``False`` if there was no such file of ``owner``."""
        ...


@runtime_checkable
class ContentStore(Protocol):
    """Where file bytes live, by key, for a file store that keeps its metadata elsewhere (a local directory,
    S3-compatible object storage). ``put`` is all or nothing: if ``content`` raises, nothing remains under ``key``.
    """

    async def put(self, key: str, content: AsyncIterable[bytes]) -> int:
        """Store ``content`` under ``key`` (replacing nothing: keys are new file ids); the number of bytes stored."""
        ...

    def get(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` under ``key`` as they are read (``FileNotFoundError`` if there are none)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove what is under ``key``; nothing there is not an error."""
        ...


@runtime_checkable
class ResponseStore(Protocol):
    """Owner-scoped stored responses of the Responses API (:class:`~ozwell_asgi.types.StoredResponse`).

    Guarantees every adapter passes (:class:`ozwell_asgi.testing.contracts.ResponseStoreContract`): another owner's
    id behaves exactly like an unknown one; ``put`` stores a record whole or not at all and replaces a record of the
    same id and owner (a background run is put when queued and again as it ends); ``last_in_conversation`` is the
    newest record (by ``created_at``, then ``id``) of that owner's conversation. Bounded adapters may forget records
    (the memory store past its size caps, Redis past its TTL): a forgotten record is simply unknown. SQL keeps
    every record until it is deleted.
    """

    async def put(self, record: StoredResponse) -> None:
        """Store ``record`` whole, or replace the record of the same id and owner whole. Ids are unique across
        owners: an id another owner holds is a ``ValueError`` ("... belongs to another owner") and changes
        nothing. (The bundled stores keep the parts as JSON and refuse, with ``ValueError``, parts that are not
        JSON-ready.)"""
        ...

    async def get(self, owner: str, response_id: str) -> StoredResponse | None: ...

    async def delete(self, owner: str, response_id: str) -> bool:
        """Remove the record; ``False`` if there was no such record of ``owner``."""
        ...

    async def last_in_conversation(self, owner: str, conversation_id: str) -> StoredResponse | None: ...


@runtime_checkable
class SourceFinder(Protocol):
    """What ``include_sources`` asks (Ozwell's extension to /responses): passages of the caller's owner's files
    that answer ``query``, best first, at most ``limit`` of them. The bundled one (:mod:`ozwell_asgi.sources`)
    embeds the owner's text files when first needed and searches them by cosine similarity."""

    async def find(self, principal: Principal, query: str, call: Call, limit: int) -> Sequence[Source]: ...


@runtime_checkable
class PassageIndex(Protocol):
    """Embedded passages of files, by owner and embedding model: what :class:`ozwell_asgi.sources.FileSources`
    searches. Vectors are compared by cosine similarity (adapters keep them unit-length, as float32).

    Guarantees every adapter passes (the contract in tests/test_sources.py): every method is scoped by ``owner``
    (another owner's passages are never returned, listed or removed); ``add`` replaces what the index held for
    that file and model, all or nothing, and is idempotent (two processes adding one file leave one copy); a file
    added with no passages is still remembered with its fingerprint. Bounded adapters may forget files (the memory
    index past its size cap): a forgotten file is simply not indexed, and is indexed again when next needed.
    """

    async def fingerprints(self, owner: str, model: str) -> Mapping[str, str]:
        """``file_id`` → fingerprint of every file of ``owner`` indexed for ``model``."""
        ...

    async def add(
        self,
        owner: str,
        model: str,
        file_id: str,
        fingerprint: str,
        passages: Sequence[Passage],
        vectors: Sequence[Sequence[float]],
    ) -> None:
        """Keep ``passages`` (of ``file_id``, one vector each, in order) under ``fingerprint``, replacing what was
        held for that file and model."""
        ...

    async def search(
        self,
        owner: str,
        model: str,
        vector: Sequence[float],
        limit: int,
        file_ids: Collection[str] | None = None,
    ) -> list[tuple[Passage, float]]:
        """The ``limit`` passages of ``owner`` (of ``file_ids`` only, if given) most similar to ``vector``, with
        their cosine similarity, best first. Vectors of another dimension than ``vector``'s score nothing."""
        ...

    async def delete_file(self, owner: str, file_id: str) -> None:
        """Forget every passage of ``owner``'s ``file_id`` (every model); nothing held is not an error."""
        ...
