"""A running service takes each new generation of its archives (`duch add`, `remove`, `compact`) without a
restart: a watcher thread notices RUN/archive.json change, opens the new generation beside the one in use (the
model and encoders shared, the scans built), then swaps it in with one assignment. A request holds the archive it
started with to its end, so it answers from one generation whole, the old or the new."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from duch.pipeline.archive.generation import GENERATION_FILE
from duch.pipeline.retrieval.search import Index
from duch.pipeline.serve.archives import ServedArchive

log = logging.getLogger("duch.serve")


def stamp(run: str | Path) -> tuple | None:
    """What changes whenever a generation is published (an atomic rename: a new inode)."""
    try:
        st = os.stat(Path(run) / GENERATION_FILE)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class GenerationWatcher:
    """Polls each archive's generation file every `interval` seconds; on a change, `reopen(name)` builds the new
    ServedArchive and `swap(name, archive)` puts it in service (and says the generation it replaced). Each switch
    is logged (logger `duch.serve`, INFO; `duch serve` shows it on stderr)."""

    def __init__(self, runs: dict[str, str], reopen: Callable[[str], ServedArchive],
                 swap: Callable[[str, ServedArchive], int | None], interval: float = 0.5):
        self.runs, self.reopen, self.swap, self.interval = runs, reopen, swap, interval
        self.seen = {name: stamp(run) for name, run in runs.items()}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="duch-generations", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def check(self) -> list[str]:
        """Reopen every archive whose generation changed since last seen; the names swapped."""
        swapped = []
        for name, run in self.runs.items():
            now = stamp(run)
            if now == self.seen[name]:
                continue
            start = time.perf_counter()
            try:
                archive = self.reopen(name)
            except Exception as e:  # noqa: BLE001 (the generation in use keeps serving; the next tick tries again)
                log.warning("duch serve: archive %s changed but could not be opened yet (%s); still serving the "
                            "generation in use", name, e)
                continue
            previous = self.swap(name, archive)
            self.seen[name] = now
            swapped.append(name)
            log.info("duch serve: archive %s now serves generation %d (was %s; opened in %.2f s)", name,
                     archive.index.generation, previous, time.perf_counter() - start)
        return swapped

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            self.check()


def show_switches() -> None:
    """The service's log lines (generation switches, archives that could not be opened) on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def reopened(previous: ServedArchive, main: Index, verify: bool) -> ServedArchive:
    """`previous`'s archive at its current generation, with `main`'s model and encoders (loaded and warmed
    already), its scans built."""
    index = Index.load(previous.index.run, bits=previous.index.bits, device=str(previous.index.device),
                       backend=previous.index.backend, verify=verify)
    index.coder.share(main.coder)
    archive = ServedArchive(previous.name, index)
    archive.warm()
    return archive
