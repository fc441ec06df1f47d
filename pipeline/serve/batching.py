"""Query coding on a worker thread that owns an encoder: the captions (or images) that arrive while a pass runs
are coded together in the next one, one forward pass of the encoder and head for all of them.

Nothing waits to fill a batch: a lone query is coded at once, and batches form only when queries queue up,
which is when one pass for many pays (measured for captions: docs/results.md, 3.6). One thread per encoder also
keeps its thread pool from being entered by many request threads at once on a small CPU.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

Coder = Callable[[list], Sequence]  # a list of queries -> their codes, one per query, in order


@dataclass
class _Job:
    coder: Coder
    item: Any
    deadline: float | None = None  # time.monotonic() after which its query has timed out: not coded then
    future: Future = field(default_factory=Future)

    def live(self) -> bool:
        """Whether to code it: its query has neither been cancelled nor timed out (the future then runs). One past
        its deadline fails as admission's timer would have it (asyncio.TimeoutError: the query's 503)."""
        if not self.future.set_running_or_notify_cancel():
            return False
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.future.set_exception(asyncio.TimeoutError("the query's deadline passed before it was coded"))
            return False
        return True


class QueryBatcher:
    """`submit(coder, item)` -> a Future of (coder([..., item, ...])[its place], the pass's size): jobs with the
    same coder that are waiting when a pass starts go through it together (at most `max_batch`)."""

    def __init__(self, max_batch: int = 64, on_batch: Callable[[Coder, int, float], None] | None = None,
                 name: str = "query"):
        self.max_batch = max_batch
        self.on_batch = on_batch  # called after each pass with (coder, batch size, seconds)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"duch-{name}-coder", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, coder: Coder, item, deadline: float | None = None) -> Future:
        if self._closed:
            raise RuntimeError("the query coder is closed")
        job = _Job(coder, item, deadline)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Codes what was submitted, then ends the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, stop = [job], False
            while len(jobs) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
            groups: dict[Coder, list[_Job]] = {}
            for j in jobs:
                groups.setdefault(j.coder, []).append(j)
            for coder, group in groups.items():
                self._run(coder, group)
            if stop:
                return

    def _run(self, coder: Coder, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.live()]  # a timed-out query is not coded
        if not live:
            return
        start = time.perf_counter()
        try:
            codes = coder([j.item for j in live])
        except BaseException as e:  # noqa: BLE001  (handed to every waiting query, the thread goes on)
            for j in live:
                j.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(coder, len(live), time.perf_counter() - start)
        for j, code in zip(live, codes):
            j.future.set_result((code, len(live)))
