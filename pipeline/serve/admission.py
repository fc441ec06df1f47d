"""Admission of queries: at most `limit` in flight; one more is refused at once (a 503 with Retry-After, never a
wait in a queue that grows), and one that runs past `timeout` seconds is answered with a 503 too. One client
address holds at most `per_client` of the slots (a 503 past them, reason "client"), so that a few clients sending
costly queries on many connections cannot take them all from the others.

A query's slot is given back when its task has ended, not when its answer was sent. A timed-out query's task is
cancelled: a caption or image still waiting for the query coder is dropped uncoded (batching), and so is one
handed to it after its deadline (`DEADLINE`, which the query's task sees: the timer and the end of a step on a
thread can come in either order); a step already running on a thread finishes there, on a pool of fixed size, so
the work in flight stays bounded whatever the clients do.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")

# When the query being answered times out (time.monotonic(), the event loop's clock), as its task sees it.
DEADLINE: ContextVar[float | None] = ContextVar("duch_query_deadline", default=None)


class Overloaded(Exception):
    """Refused: the service is at its limit of queries in flight (`reason` "overload"), or a query ran past the
    timeout ("timeout")."""

    def __init__(self, message: str, retry_after: int, reason: str = "overload"):
        super().__init__(message)
        self.retry_after, self.reason = retry_after, reason


class Admission:
    """Counts the queries in flight on the event loop's thread (so it needs no lock)."""

    def __init__(self, limit: int, timeout: float, on_change: Callable[[int], None] | None = None,
                 per_client: int | None = None):
        self.limit, self.timeout = limit, timeout
        self.per_client = per_client or limit
        self.in_flight = 0
        self.clients: dict[str, int] = {}  # address -> its queries in flight (addresses with none are not kept)
        self.on_change = on_change  # told the new count (a metrics gauge)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one timeout's share per query ahead, at least 1."""
        return max(1, math.ceil(min(self.timeout, 5.0) * self.in_flight / max(self.limit, 1) / 4))

    async def run(self, work: Callable[[], Awaitable[T]], client: str = "") -> T:
        """`await work()` within the bounds, or Overloaded; `client`: the address asking."""
        if self.in_flight >= self.limit:
            raise Overloaded(f"the service is at its limit of {self.limit} queries in flight; retry shortly",
                             self.retry_after())
        if self.clients.get(client, 0) >= self.per_client:
            raise Overloaded(f"{client or 'this client'} has {self.per_client} queries in flight, the most one "
                             "client may; send the next when one is answered", self.retry_after(), "client")
        self._change(+1)
        self.clients[client] = self.clients.get(client, 0) + 1
        token = DEADLINE.set(time.monotonic() + self.timeout)  # copied into the task's context
        try:
            task = asyncio.ensure_future(work())
        finally:
            DEADLINE.reset(token)
        task.add_done_callback(lambda _: self._done(client))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.timeout)
        except asyncio.TimeoutError:
            task.cancel()
            task.add_done_callback(_consume)  # its result or error is no one's now
            raise Overloaded(f"the query took longer than the {self.timeout:g} s limit; retry when the service "
                             f"is less busy", self.retry_after(), "timeout") from None

    def _done(self, client: str) -> None:
        self._change(-1)
        self.clients[client] -= 1
        if not self.clients[client]:
            del self.clients[client]

    def _change(self, delta: int) -> None:
        self.in_flight += delta
        if self.on_change is not None:
            self.on_change(self.in_flight)


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
