"""Group commit on the event loop: what concurrent requests submit while one commit runs is committed
together in the next one (:class:`GroupLoop`).

The sink's :class:`monitoring.sink.GroupCommitter` (one model's events into its store) and the fleet's
:class:`monitoring.intake.IntakeJournal` (every model's events into one journal) are both one. The commit
runs on the event loop itself: on one core a thread would only add hand-offs, and while a commit runs the
next group piles up in the socket buffers, which is what makes groups large.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["GroupLoop"]

T = TypeVar("T")


class GroupLoop(Generic[T]):
    """One writer task collecting submitted items; ``_commit(batch, size)`` stores a batch of
    ``(item, future)`` and settles every future (``size``: the events in it)."""

    name = "group-commit"
    #: stores a batch of ``(item, future)`` and settles every future; each subclass has its own
    _commit: Callable[[list[tuple[T, asyncio.Future]], int], None]

    def __init__(self, *, max_group_events: int = 20_000) -> None:
        self.max_group_events = max_group_events
        self._queue: asyncio.Queue[tuple[T, int, asyncio.Future] | None] | None = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _ensure_started(self) -> asyncio.Queue:
        if self._queue is None or not self.running:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(self._queue), name=self.name)
        return self._queue

    async def _submit(self, item: T, events: int) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._ensure_started().put_nowait((item, events, future))
        return await future

    async def _run(self, queue: asyncio.Queue) -> None:
        stop = False
        while not stop:
            entry = await queue.get()
            await asyncio.sleep(0)  # let requests that are ready enqueue too: bigger groups
            batch, size = [], 0
            while True:
                if entry is None:  # aclose(): commit what came before, then end
                    stop = True
                else:
                    item, events, future = entry
                    batch.append((item, future))
                    size += events
                if stop or size >= self.max_group_events or queue.empty():
                    break
                entry = queue.get_nowait()
            if batch:
                self._commit(batch, size)

    async def aclose(self) -> None:
        """Stop the writer after committing everything already submitted."""
        if self.running and self._queue is not None:
            self._queue.put_nowait(None)
            await self._task
        self._task = None
