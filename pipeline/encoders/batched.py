"""Stage 1's batched image path: files read on CPU threads, JPEGs decoded in batches (nvJPEG on a GPU) and
preprocessed in batches on the device, overlapped with the encoder.

Three things run at once: reader threads (file bytes and a header check, a few batches ahead), one decoder
thread (a whole batch per nvJPEG call, then the batched resize / crop / normalise, on its own CUDA stream) and
the caller's thread, which encodes the batch before. Any file the batched decoder does not take (not a plain
JPEG, refused by nvJPEG, unreadable) goes to the PIL path on a thread pool, image by image, with the same
reject reasons as the DataLoader path. Batches come out in order, so shards hold the same rows either way.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from duch.data import Item
from duch.pipeline.encoders.gpu_decode import TensorPreprocess, decode_and_preprocess, sniff_jpeg

LOOKAHEAD = 3  # batches read ahead of the decoder
QUEUE_DEPTH = 2  # decoded batches waiting for the encoder (each ~0.6 GB at 1024 x 224 px in float32)
READ_CHUNK = 64  # files per reader task: a task per file costs more in scheduling than the read itself
# Reading a cached tile is a few microseconds of system call and more of Python holding the GIL, so reader
# threads mostly queue for the GIL: with 16 of them the H100 machine's producer made only ~6,700 images/s,
# starving the decoder. Reading and header checks of UCM tiles from the page cache, on the 2-core dev
# machine: 52k files/s on 1 thread, 49k on 2, 27k on 16. Two keep a read going while the other waits on I/O.
READ_THREADS = 2

_DONE = object()


class BatchedImages:
    """Iterates (item indices, pixels [n, 1, 3, h, w] on the device, [(index, reason)]) per batch, in order.

    `fallback(i)` is the PIL path for item i: (i, pixels [1, 3, h, w], None) or (i, None, reason)."""

    def __init__(self, items: list[Item], images_dir: Path, batches: list[list[int]], prep: TensorPreprocess,
                 device: torch.device, fallback, pil_threads: int | None = None):
        self.items = items
        self.images_dir = str(images_dir)
        self.batches = batches
        self.prep = prep
        self.device = device
        self.fallback = fallback
        # PIL releases the GIL while it decodes and resamples, so threads do scale for the odd files.
        self.pil_threads = pil_threads or min(8, max(1, os.cpu_count() or 1))
        self.stats = {"batched": 0, "pil": 0}

    # -- reader threads
    def _read(self, indices: list[int]) -> list[tuple[int, torch.Tensor | None, tuple | None]]:
        rows = []
        for i in indices:
            data = _read_file(os.path.join(self.images_dir, self.items[i].image))
            size = sniff_jpeg(data) if data else None  # unreadable or not plain JPEG: PIL has the last word
            rows.append((i, torch.frombuffer(data, dtype=torch.uint8), size) if size else (i, None, None))
        return rows

    # -- decoder thread
    def _decode_loop(self, out: queue.Queue, stop: threading.Event, readers, pil) -> None:
        try:
            cuda = self.device.type == "cuda"
            stream = torch.cuda.Stream(self.device) if cuda else None
            pending: deque = deque()

            def submit(b: int):
                idx = self.batches[b]
                return [readers.submit(self._read, idx[s:s + READ_CHUNK]) for s in range(0, len(idx), READ_CHUNK)]

            for b in range(min(LOOKAHEAD, len(self.batches))):
                pending.append(submit(b))
            for b, indices in enumerate(self.batches):
                rows = [row for fut in pending.popleft() for row in fut.result()]
                if b + LOOKAHEAD < len(self.batches):
                    pending.append(submit(b + LOOKAHEAD))
                fast = [k for k, (_, data, _) in enumerate(rows) if data is not None]
                pixels, event, ok = None, None, []
                if fast:
                    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                        pixels, ok_sub, failed_sub = decode_and_preprocess(
                            [rows[k][1] for k in fast], [rows[k][2] for k in fast], self.prep, self.device)
                        if cuda:
                            event = torch.cuda.Event()
                            event.record(stream)
                    ok = [fast[k] for k in ok_sub]
                slow = sorted(set(range(len(rows))) - set(ok))
                pil_futures = [(k, pil.submit(self.fallback, rows[k][0])) for k in slow]
                if not _put(out, (indices, ok, pixels, event, pil_futures), stop):
                    return
            _put(out, _DONE, stop)
        except BaseException as e:  # handed to the caller's thread, which raises it
            _put(out, e, stop)

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
        out: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        stop = threading.Event()
        readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="duch-read")
        pil = ThreadPoolExecutor(self.pil_threads, thread_name_prefix="duch-pil")
        decoder = threading.Thread(target=self._decode_loop, args=(out, stop, readers, pil), daemon=True,
                                   name="duch-decode")
        decoder.start()
        try:
            while True:
                msg = out.get()
                if msg is _DONE:
                    return
                if isinstance(msg, BaseException):
                    raise msg
                yield self._assemble(*msg)
        finally:
            stop.set()
            decoder.join()
            readers.shutdown(wait=True, cancel_futures=True)
            pil.shutdown(wait=True, cancel_futures=True)

    def _assemble(self, indices, ok, pixels, event, pil_futures):
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            pixels.record_stream(current)  # made on the decoder's stream, used and freed on this one
        positions, parts, bad = list(ok), [pixels] if pixels is not None else [], []
        slow_ok, slow_px = [], []
        for k, fut in pil_futures:
            _, px, reason = fut.result()
            if px is None:
                bad.append((indices[k], reason))
            else:
                slow_ok.append(k)
                slow_px.append(px[0])
        self.stats["batched"] += len(ok)
        self.stats["pil"] += len(pil_futures)
        if slow_px:
            positions += slow_ok
            parts.append(torch.stack(slow_px).to(self.device))
        if not parts:
            return [], None, bad
        merged = parts[0] if len(parts) == 1 else torch.cat(parts)
        if slow_px and pixels is not None:  # back into dataset order
            order = sorted(range(len(positions)), key=positions.__getitem__)
            merged = merged[torch.tensor(order, device=merged.device)]
            positions = [positions[k] for k in order]
        return [indices[k] for k in positions], merged[:, None], bad


def _read_file(path: str) -> bytearray | None:
    """The file's bytes in a writable buffer (torch wraps it without a copy), in three system calls where
    open().read() makes six or more, each a release and re-take of the GIL; None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        data = bytearray(size)
        got = os.readv(fd, [data]) if size else 0
        while got < size:  # a short read: only if the file shrank or a signal came
            more = os.read(fd, size - got)
            if not more:
                return None
            data[got:got + len(more)] = more
            got += len(more)
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


def _put(out: queue.Queue, msg, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(msg, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
