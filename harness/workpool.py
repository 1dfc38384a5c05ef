"""Bounded concurrent work that stops cleanly: the pattern of the debate stage and STaR's
rationalizations (asyncio's TaskGroup cancels every task on the first error; here the work
already under way, paid for, is let finish and kept).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable, TypeVar

from harness.errors import HarnessError

T = TypeVar("T")
R = TypeVar("R")


async def drain(todo: deque[T], work: Callable[[T], Awaitable[R]], finished: Callable[[R], None], *,
                max_in_flight: int) -> None:
    """Run `work` on the items of `todo`, at most `max_in_flight` at once, handing each result to
    `finished` as it comes. When an item fails with a HarnessError (the budget cap, an
    authentication error, retries used up), no new item starts, the items under way finish and
    are handed over, and the first such error is raised. Anything else (Ctrl-C, a bug) cancels
    every item at once and propagates."""
    stop: HarnessError | None = None

    async def worker() -> None:
        nonlocal stop
        while todo and stop is None:
            item = todo.popleft()
            try:
                result = await work(item)
            except HarnessError as e:
                stop = stop or e
                return
            finished(result)

    workers = [asyncio.create_task(worker()) for _ in range(min(max_in_flight, len(todo)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:  # interrupted, or a bug: stop everything now
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    if stop is not None:
        raise stop
