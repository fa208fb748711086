"""Background responses (``background: true``) running in this process: a bounded set of tasks owned by the app.

A run is started by ``POST /responses`` and ends on its own, when ``POST /responses/{id}/cancel`` cancels it
here, or when the app closes (:meth:`BackgroundRuns.aclose` cancels every run and waits for each to settle its
meter and record its end). At most ``cap`` runs are in progress at once (``Settings.max_background_responses``);
one more is refused with 503 before anything is started. Tasks are created lazily on the running loop, so the app
works mounted in a host that never runs its lifespan.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from .errors import ServiceUnavailableError

__all__ = ["BackgroundRuns"]


class BackgroundRuns:
    """The background runs of this process, by response id."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("the cap on background runs must be >= 1")
        self.cap = cap
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def check_room(self) -> None:
        """503 if ``cap`` runs are already in progress."""
        if len(self._tasks) >= self.cap:
            raise ServiceUnavailableError(
                f"This server is running its maximum of {self.cap} background responses; retry shortly.",
                headers=(("Retry-After", "1"),),
            )

    def start(self, response_id: str, run: Coroutine[Any, Any, None]) -> None:
        """Run ``run`` as the background run of ``response_id`` (503, ``run`` closed unstarted, if there is no
        room). ``run`` must handle its own errors and cancellation: it records how it ended."""
        try:
            self.check_room()
        except BaseException:
            run.close()
            raise
        task = asyncio.get_running_loop().create_task(run, name=f"ozwell-background-{response_id}")
        self._tasks[response_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(response_id, None))

    def running(self, response_id: str) -> bool:
        return response_id in self._tasks

    async def cancel(self, response_id: str) -> bool:
        """Cancel the run of ``response_id`` here and wait until it has recorded its end; ``False`` if it is not
        running in this process."""
        task = self._tasks.get(response_id)
        if task is None:
            return False
        task.cancel()
        await asyncio.wait((task,))
        return True

    async def aclose(self) -> None:
        """Cancel every run and wait for them to settle their meters and record their end."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
