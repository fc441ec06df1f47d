"""Fairness between clients: an address that keeps sending what the service refuses is slowed to a few requests a
second, so that a few abusive clients cannot take the event loop (and the cores) from everyone else.

Refusals are cheap one by one (a 413 from the headers, a bomb refused from its image header), but a client that
sends the next one as soon as the last is answered makes thousands a second, each read, parsed and answered. So
each client address has a bucket of `refusal_burst` refusals, refilled at `refusal_rate` a second. An answer that
refuses the request itself (REFUSALS: malformed, too large, too slow, another origin or host, not an image, an
invalid field) takes one. While an address's bucket holds less than one, each request from it waits, before
anything past its headers is read, until the bucket would hold one again (a bucket in debt makes the next wait
longer: many connections at once buy nothing); its body stays in the socket meanwhile (past its first 64 KB), the
wait costs a timer, and it ends early if the client leaves.
At most `MOST_WAITING` requests of one address wait at once; more are answered 429 at once. A client that is never
refused never waits; `refusal_rate` 0 turns the rule off.

The address is the connection's peer as uvicorn gives it (behind a reverse proxy on this machine, uvicorn takes
it from X-Forwarded-For, which it trusts from 127.0.0.1 only).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from duch.pipeline.serve.limits import answer

REFUSALS = frozenset({400, 403, 408, 413, 415, 422, 431})
MOST_WAITING = 16  # requests of one address held at once; more get a 429
HELD_BODY = 65_536  # body bytes taken in while a request waits (a wait notices a client leaving)
MOST_ADDRESSES = 10_000  # addresses remembered before those whose buckets are full again are forgotten


class RefusalBuckets:
    """Per-address token buckets of refusals (pure: the clock is given, so the rule is tested without timing)."""

    def __init__(self, burst: int, rate: float, clock: Callable[[], float] = time.monotonic):
        self.burst, self.rate, self.clock = float(burst), rate, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)

    def tokens(self, address: str) -> float:
        tokens, then = self.buckets.get(address, (self.burst, 0.0))
        return min(self.burst, tokens + (self.clock() - then) * self.rate) if self.rate > 0 else self.burst

    def wait(self, address: str) -> float:
        """Seconds a request from `address` arriving now waits before it is read (0: none)."""
        if self.rate <= 0 or address not in self.buckets:
            return 0.0
        return max(0.0, (1.0 - self.tokens(address)) / self.rate)

    def refused(self, address: str) -> None:
        """One refusal taken from the address's bucket (which may go into debt, at most `burst` deep)."""
        if self.rate <= 0:
            return
        if len(self.buckets) >= MOST_ADDRESSES:
            self.forget()
        self.buckets[address] = (max(-self.burst, self.tokens(address) - 1.0), self.clock())

    def forget(self) -> None:
        """Drops the addresses whose buckets have refilled (they would wait no more than a new address), and if
        more than half the room is still taken (very many addresses in debt at once), the oldest of them: memory
        stays bounded, and each forgetting frees room for many refusals (its cost is shared out)."""
        for address in [a for a in self.buckets if self.tokens(a) >= self.burst]:
            del self.buckets[address]
        for address in list(self.buckets)[:max(0, len(self.buckets) - MOST_ADDRESSES // 2)]:
            del self.buckets[address]


class RefusalPenalty:
    """ASGI middleware applying RefusalBuckets to every HTTP request; `on_wait` / `on_turned_away` count them."""

    def __init__(self, app, burst: int, rate: float, on_wait: Callable[[], None] | None = None,
                 on_turned_away: Callable[[], None] | None = None):
        self.app, self.buckets = app, RefusalBuckets(burst, rate)
        self.waiting: dict[str, int] = {}
        self.on_wait, self.on_turned_away = on_wait, on_turned_away

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("",))[0] or ""
        delay = self.buckets.wait(address)
        if delay > 0:
            if self.waiting.get(address, 0) >= MOST_WAITING:
                if self.on_turned_away:
                    self.on_turned_away()
                return await answer(send, 429, f"too many refused requests from {address}; send valid requests, "
                                               f"one at a time, or retry in {delay:.0f} s",
                                    [(b"retry-after", b"%d" % (delay + 1))])
            if self.on_wait:
                self.on_wait()
            self.waiting[address] = self.waiting.get(address, 0) + 1
            try:
                early = await hold(delay, receive)
            finally:
                self.waiting[address] -= 1
                if not self.waiting[address]:
                    del self.waiting[address]
            if early is None:
                return  # the client left while it waited
            receive = replay(early, receive)
        status = 0

        async def watched(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if status in REFUSALS:
                self.buckets.refused(address)


async def hold(delay: float, receive) -> list | None:
    """Waits `delay` seconds, or until the client leaves (None); the body messages that came in meanwhile (at most
    HELD_BODY bytes: the rest stays in the socket), to be handed to the app first."""
    loop = asyncio.get_running_loop()
    end, early, size = loop.time() + delay, [], 0
    while size <= HELD_BODY:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, end - loop.time()))
        except asyncio.TimeoutError:
            return early
        if message["type"] == "http.disconnect":
            return None
        early.append(message)
        size += len(message.get("body", b""))
    await asyncio.sleep(max(0.0, end - loop.time()))
    return early


def replay(early: list, receive):
    async def receive_again():
        return early.pop(0) if early else await receive()

    return receive_again
