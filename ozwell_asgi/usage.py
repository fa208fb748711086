"""Usage hooks: each request's :class:`~ozwell_asgi.types.UsageEvent`, delivered to the host's callbacks off the
response path.

    api = OzwellAPI(on_usage=[record, metrics])   # one callable or several; or later api.add_usage_hook(fn)
    ...
    await api.usage.flush()                       # every queued event delivered (tests, a periodic export)
    api.usage.dropped, api.usage.failed           # what was not delivered, and why

Guarantees:

- Emitting costs a request one append per hook onto that hook's queue: no await, no I/O, no lock, no hook code.
  A hook never runs on the request's path, so a slow, blocking or failing hook never delays or breaks an answer.
- Each hook has its own queue, bounded by ``max_queue`` events (``Settings.usage_queue_size``, 10,000 by
  default), and its own worker task on the serving event loop, started with the first event: a slow hook delays
  only its own events. An event that finds its hook's queue full is dropped and counted (:attr:`UsageHooks.dropped`).
- Events reach each hook once, in the order they were emitted. An async hook is awaited on the loop, one event
  at a time; a sync hook is called in a worker thread (a batch of up to 256 events per hop), so one that blocks
  never stalls the loop. A hook that raises is counted (:attr:`UsageHooks.failed`) and logged, at most once per
  hook per ``log_interval`` seconds (the line says how many failures it stands for); delivery goes on.
- :meth:`UsageHooks.aclose` delivers what is queued within a deadline (``Settings.usage_drain_timeout``), then
  drops what is left (counted); events emitted after it start the workers again.

The workers live on the loop that emits; an app served on one loop and later on another (a test's loop, then the
next test's) moves its workers to the new loop with the events still queued.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .types import UsageEvent

__all__ = ["DEFAULT_QUEUE_SIZE", "UNKNOWN_ENDPOINT", "UsageHook", "UsageHooks", "endpoint_name"]

log = logging.getLogger("ozwell_asgi")

UsageHook = Callable[[UsageEvent], Any]
"""A host callback: ``def hook(event) -> None`` (called in a worker thread) or ``async def hook(event) -> None``
(awaited on the event loop)."""

DEFAULT_QUEUE_SIZE = 10_000
BATCH = 256  # events handed to a sync hook's thread per hop
UNKNOWN_ENDPOINT = "unknown"  # the endpoint of a request no route matched (404, 405)

_ON_ITEM = {"GET": "retrieve", "DELETE": "delete", "POST": "update"}


def endpoint_name(path: str, method: str) -> str:
    """The ``endpoint`` of a route's usage events, as the SDKs name the call: the path's fixed segments joined by
    dots (``-`` as ``_``), then what is done: ``.list`` (GET on a collection), ``.retrieve``/``.delete``/``.update``
    (on an item); a create (POST on a collection) and an action (a fixed last segment after an id) are the path
    alone. So ``POST /chat/completions`` is ``chat.completions``, ``GET /files/{file_id}`` ``files.retrieve``,
    ``GET /files/{file_id}/content`` ``files.content``, ``POST /api-keys/{key_id}/rotate`` ``api_keys.rotate``."""
    segments = [s for s in path.strip("/").split("/") if s]
    base = ".".join(s.replace("-", "_") for s in segments if not s.startswith("{"))
    if segments and segments[-1].startswith("{"):
        return f"{base}.{_ON_ITEM.get(method, method.lower())}"
    if method == "GET" and not any(s.startswith("{") for s in segments):
        return f"{base}.list"
    return base


class _Lane:
    """One hook, its queue and its worker."""

    __slots__ = (
        "delivered",
        "done",
        "dropped",
        "failed",
        "fn",
        "in_flight",
        "is_async",
        "name",
        "next_log",
        "pending",
        "suppressed",
        "task",
        "waiters",
        "wake",
    )

    def __init__(self, fn: UsageHook) -> None:
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)
        self.name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        self.pending: deque[UsageEvent] = deque()
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.done = 0  # events taken off the queue and handed to the hook (delivered or failed)
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.suppressed = 0  # failures not logged since the last log line
        self.next_log = 0.0
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []


class UsageHooks:
    """The host's usage hooks and their queues (``OzwellAPI.usage``). See the module docstring for guarantees.

    ``max_queue``: events each hook's queue holds before new ones are dropped. ``drain_timeout``: seconds
    :meth:`aclose` waits for queued events to be delivered. ``log_interval``: seconds between two log lines about
    one hook's failures. ``clock``: monotonic seconds, for that interval (tests may inject one).
    """

    def __init__(
        self,
        hooks: Iterable[UsageHook] = (),
        *,
        max_queue: int = DEFAULT_QUEUE_SIZE,
        drain_timeout: float = 5.0,
        log_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")
        self.max_queue = max_queue
        self.drain_timeout = drain_timeout
        self.log_interval = log_interval
        self.clock = clock
        self._lanes: list[_Lane] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        for hook in hooks:
            self.add(hook)

    def add(self, hook: UsageHook) -> None:
        """Register ``hook`` (sync or async); it receives the events emitted from now on."""
        if not callable(hook):
            raise TypeError(f"a usage hook must be callable, got {type(hook).__name__}")
        self._lanes.append(_Lane(hook))  # its worker starts with the next event

    def __len__(self) -> int:
        return len(self._lanes)

    def __bool__(self) -> bool:
        return bool(self._lanes)

    # -- counters ----------------------------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Events dropped (a full queue, or still queued when :meth:`aclose` gave up), summed over hooks."""
        return sum(lane.dropped for lane in self._lanes)

    @property
    def failed(self) -> int:
        """Events a hook raised on, summed over hooks."""
        return sum(lane.failed for lane in self._lanes)

    @property
    def delivered(self) -> int:
        """Events a hook returned from normally, summed over hooks."""
        return sum(lane.delivered for lane in self._lanes)

    @property
    def pending(self) -> int:
        """Events queued or being delivered now, summed over hooks."""
        return sum(len(lane.pending) + lane.in_flight for lane in self._lanes)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per hook (by qualified name; repeats numbered): delivered, failed, dropped and pending events."""
        out: dict[str, dict[str, int]] = {}
        for lane in self._lanes:
            name, n = lane.name, 2
            while name in out:
                name, n = f"{lane.name}#{n}", n + 1
            out[name] = {
                "delivered": lane.delivered,
                "failed": lane.failed,
                "dropped": lane.dropped,
                "pending": len(lane.pending) + lane.in_flight,
            }
        return out

    # -- the hot path ------------------------------------------------------------------------------------------

    def emit(self, event: UsageEvent) -> None:
        """Queue ``event`` for every hook (dropped and counted where a queue is full); never blocks, never raises.
        Call it on the event loop that serves the app."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here: queue it, the next emit or flush on a loop delivers it
            loop = None
        if loop is not self._loop and loop is not None:
            self._bind(loop)
        limit = self.max_queue
        for lane in self._lanes:
            pending = lane.pending
            if len(pending) >= limit:
                lane.dropped += 1
                continue
            pending.append(event)
            if loop is None:
                continue
            wake = lane.wake
            if wake is not None:
                wake.set()
            else:  # a hook added since the workers started
                self._start(lane, loop)

    __call__ = emit  # a UsageHooks is itself a usage sink

    # -- workers -----------------------------------------------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run every hook's worker on ``loop`` (the old ones, on a loop no longer serving, are left behind)."""
        self._loop = loop
        for lane in self._lanes:
            self._start(lane, loop)

    def _ensure(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every hook has a worker on ``loop``."""
        if loop is not self._loop:
            self._bind(loop)
            return
        for lane in self._lanes:
            if lane.wake is None:
                self._start(lane, loop)

    def _start(self, lane: _Lane, loop: asyncio.AbstractEventLoop) -> None:
        wake = lane.wake = asyncio.Event()
        if lane.pending:
            wake.set()
        lane.in_flight = 0
        lane.waiters = []
        lane.task = loop.create_task(self._run(lane, wake), name=f"ozwell usage hook {lane.name}")

    async def _run(self, lane: _Lane, wake: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        pending = lane.pending
        while lane.wake is wake:  # a newer worker (another loop) replaces this one
            if not pending:
                wake.clear()
                await wake.wait()
                continue
            batch = [pending.popleft() for _ in range(min(len(pending), BATCH))]
            lane.in_flight = len(batch)
            if lane.is_async:
                for event in batch:
                    try:
                        await lane.fn(event)
                    except asyncio.CancelledError as exc:
                        if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # we are stopped
                            raise
                        self._failed(lane, exc)  # the hook's own cancellation: a failure like any other
                    except Exception as exc:
                        self._failed(lane, exc)
                    else:
                        lane.delivered += 1
                    lane.in_flight -= 1
                    lane.done += 1
                    self._wake_waiters(lane)
            else:
                try:
                    failures = await loop.run_in_executor(None, _call_each, lane.fn, batch)
                except RuntimeError as exc:  # the loop's executor is shut down: the batch is lost, counted
                    failures = [exc] * len(batch)
                lane.in_flight = 0
                lane.done += len(batch)
                lane.delivered += len(batch) - len(failures)
                for failure in failures:
                    self._failed(lane, failure)
                self._wake_waiters(lane)

    def _failed(self, lane: _Lane, exc: BaseException) -> None:
        lane.failed += 1
        now = self.clock()
        if now < lane.next_log:
            lane.suppressed += 1
            return
        more = f" ({lane.suppressed} more failures since the last report)" if lane.suppressed else ""
        lane.suppressed = 0
        lane.next_log = now + self.log_interval
        log.error("usage hook %s failed%s", lane.name, more, exc_info=(type(exc), exc, exc.__traceback__))

    @staticmethod
    def _wake_waiters(lane: _Lane) -> None:
        if lane.waiters:
            keep = []
            for target, future in lane.waiters:
                if lane.done >= target:
                    if not future.done():
                        future.set_result(None)
                else:
                    keep.append((target, future))
            lane.waiters = keep

    # -- flush and close ---------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Return once every event emitted before the call has been handed to every hook and returned from."""
        loop = asyncio.get_running_loop()
        self._ensure(loop)
        waits: list[Awaitable[None]] = []
        for lane in self._lanes:
            target = lane.done + len(lane.pending) + lane.in_flight
            if lane.done < target:
                future: asyncio.Future[None] = loop.create_future()
                lane.waiters.append((target, future))
                waits.append(future)
        if waits:
            await asyncio.gather(*waits)

    async def aclose(self, drain_timeout: float | None = None) -> None:
        """Deliver what is queued within ``drain_timeout`` seconds (default: the one given at construction), then
        stop the workers; events still queued (or being delivered) are dropped and counted. Later events start the
        workers again."""
        if self.pending:
            try:
                async with asyncio.timeout(self.drain_timeout if drain_timeout is None else drain_timeout):
                    await self.flush()
            except TimeoutError:
                left = self.pending
                log.warning("usage hooks: %d events not delivered within the shutdown deadline; dropped", left)
        self._loop = None
        for lane in self._lanes:
            task, lane.task, lane.wake = lane.task, None, None
            if task is not None and not task.done() and task.get_loop().is_running():
                task.cancel()
            lane.dropped += len(lane.pending) + lane.in_flight
            lane.pending.clear()
            lane.in_flight = 0
            for _, future in lane.waiters:  # a flush waiting elsewhere returns: nothing more will come
                if not future.done():
                    future.set_result(None)
            lane.waiters = []


def _call_each(fn: UsageHook, batch: list[UsageEvent]) -> list[BaseException]:
    """Call a sync hook on each event (in a worker thread); the exceptions it raised."""
    failures: list[BaseException] = []
    for event in batch:
        try:
            fn(event)
        except Exception as exc:
            failures.append(exc)
    return failures
