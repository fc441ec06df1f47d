"""Per-shard work in this process or on a dask.distributed cluster.

The stages that touch every item (extract, encode-archive) cut their work into one task per output shard. A task
gets a small picklable job (paths, rows, settings), opens its own inputs, writes its own output under a temporary
name and renames it, and returns a small dict; the driver only collects those and writes the manifest. No h5py
object or model crosses a process boundary, so the same job function runs in-process or on any dask worker.

`--scheduler`:
    none          in this process (the default)
    local[:N]     a distributed.LocalCluster of N worker processes, started and closed by duch
    tcp://H:P     a cluster the user already runs (dask-jobqueue, dask-kubernetes, `dask scheduler` + `dask worker`)

A worker that dies mid-task (killed, out of memory) has its task retried on another worker by the scheduler
(`distributed.scheduler.allowed-failures`); outputs are renamed into place only when complete, so a retried shard
is never half-written or duplicated.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from duch.pipeline import DuchError

ADDRESS = re.compile(r"^(tcp|tls|ucx|inproc)://\S+$")


@dataclass(frozen=True)
class SchedulerSpec:
    kind: str  # "none" | "local" | "address"
    workers: int | None = None  # local: worker processes (None: chosen from the machine)
    address: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> SchedulerSpec:
        text = (text or "none").strip()
        if text == "none":
            return cls("none")
        if text == "local":
            return cls("local")
        m = re.fullmatch(r"local:(\d+)", text)
        if m:
            if int(m.group(1)) < 1:
                raise DuchError(f"`scheduler` {text}: a local cluster needs at least 1 worker")
            return cls("local", workers=int(m.group(1)))
        if ADDRESS.match(text):
            return cls("address", address=text)
        raise DuchError(f"`scheduler` {text!r}: use none, local, local:N (N worker processes) or the address "
                        "of a running dask scheduler such as tcp://host:8786")

    def __str__(self) -> str:
        if self.kind == "local":
            return "local" if self.workers is None else f"local:{self.workers}"
        return self.address if self.kind == "address" else "none"


def local_layout(workers: int | None, gpus: int, cores: int) -> tuple[int, int]:
    """(worker processes, torch threads each) for a local cluster: one worker per GPU when the work runs on
    GPUs; on CPUs two cores a worker, whose threads share the cores out so workers never oversubscribe them."""
    if workers is None:
        workers = gpus if gpus else max(1, cores // 2)
    return workers, max(1, cores // workers)


def wants_gpu(device: str) -> int:
    """How many GPUs a run on `device` uses from this machine (0: a CPU run)."""
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def connect(spec: SchedulerSpec, device: str, echo: Callable[[str], None], threads: int | None = None
            ) -> Iterator[Any]:
    """A dask Client for the spec (None for `none`), closed (with a local cluster) on the way out."""
    if spec.kind == "none":
        yield None
        return
    from distributed import Client, LocalCluster

    if spec.kind == "local":
        gpus = wants_gpu(device)
        workers, shared_out = local_layout(spec.workers, gpus, os.cpu_count() or 1)
        threads = threads or shared_out
        limits = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        import dask

        with dask.config.set({"distributed.nanny.pre-spawn-environ": local_cluster_environ()}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   resources={"GPU": 1} if gpus else None, env={**limits, "DUCH_TORCH_THREADS": limits[
                                       "OMP_NUM_THREADS"]}, silence_logs=40)
        client = Client(cluster)
        echo(f"dask: LocalCluster of {workers} worker processes ({threads} threads each"
             f"{', one GPU each' if gpus else ''}); dashboard {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(spec.address, timeout="20s")
    except (OSError, TimeoutError) as e:
        raise DuchError(f"`scheduler` {spec.address}: no dask scheduler answers there ({e}); start one "
                        "(`dask scheduler`, dask-jobqueue, dask-kubernetes) or use `scheduler` local") from None
    try:
        n = len(client.scheduler_info()["workers"])
        echo(f"dask: scheduler {spec.address} with {n} workers; dashboard {client.dashboard_link}")
        yield client
    finally:
        client.close()


def gpu_resources(client) -> dict | None:
    """Tasks ask for one GPU when the cluster's workers advertise GPUs (`--resources GPU=1`), so a worker with
    several threads still runs one encoder at a time per GPU."""
    if client is None:
        return None
    workers = client.scheduler_info()["workers"].values()
    return {"GPU": 1} if workers and all("GPU" in w.get("resources", {}) for w in workers) else None


def run_jobs(client, fn: Callable[[Any], dict], jobs: Sequence[Any], names: Sequence[str],
             on_done: Callable[[Any, dict], None], resources: dict | None = None) -> None:
    """fn(job) for every job, here or on the cluster; on_done(job, result) in the driver as each one finishes.

    A job that raises stops the run: the rest are cancelled and the error is raised here, while every output
    already renamed into place stays for the rerun to keep."""
    if client is None:
        try:
            for job in jobs:
                on_done(job, fn(job))
        finally:
            clear_worker_cache()  # what the jobs cached in this process is not kept past the stage
        return
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    run_token = secrets.token_hex(4)  # keys unique to this run: a long-lived cluster never hands back old results
    futures = client.map(fn, list(jobs), key=[f"duch-{name}-{run_token}" for name in names], pure=False,
                         resources=resources)
    job_of = {f.key: job for f, job in zip(futures, jobs)}
    try:
        for future in as_completed(futures):
            try:
                result = future.result()
            except KilledWorker as e:
                raise DuchError(f"dask: the workers running {future.key.split('-' + run_token)[0]} died repeatedly "
                                f"({e}); out of memory? Finished shards are kept: rerun to resume, with fewer "
                                "workers or more memory each") from None
            except FutureCancelledError:
                raise DuchError("dask: the cluster cancelled the run's tasks (scheduler restarted?); finished "
                                "shards are kept: rerun to resume") from None
            on_done(job_of[future.key], result)
    finally:
        client.cancel([f for f in futures if not f.done()])


# ---------------------------------------------------------------------------------------------- worker side
_CACHE: dict[str, tuple[Any, Any]] = {}


def cached(slot: str, key: Any, load: Callable[[], Any]) -> Any:
    """A worker loads an encoder (or the heads) once and keeps it for its next tasks of the same run; a new key
    in the slot replaces the old value, so a long-lived worker holds one model per slot."""
    held = _CACHE.get(slot)
    if held is None or held[0] != key:
        _CACHE.pop(slot, None)
        _CACHE[slot] = (key, load())
    return _CACHE[slot][1]


def clear_worker_cache() -> None:
    _CACHE.clear()


def in_worker() -> Any:
    """The dask worker running this code, or None in the driver."""
    if "distributed" not in sys.modules:  # a dask worker has it loaded; the driver need not pay its import
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def require_shared(paths: dict[str, str]) -> None:
    """On a dask worker, every path the task needs must be there: a worker without the shared filesystem would
    otherwise read no image (each a 'missing file' reject) or fail deep in a write."""
    worker = in_worker()
    if worker is None:
        return
    for what, path in paths.items():
        if not os.path.exists(path):
            raise DuchError(f"dask worker {worker.address}: {what} {path} is not there; the dataset and the run "
                            "directory must be on storage every worker mounts at the same path (docs/cluster.md)")


def setup_worker(threads: int | None) -> None:
    """On a dask worker: torch threads as asked, or as the local cluster shared the cores out (dask's default is
    one a worker); and glibc's allocator given back its large-allocation behaviour (below)."""
    if in_worker() is None:
        return
    threads = threads or (int(os.environ["DUCH_TORCH_THREADS"]) if "DUCH_TORCH_THREADS" in os.environ else None)
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    _undo_malloc_trim()


_MALLOC_TUNED = False


def _undo_malloc_trim() -> None:
    """A dask nanny starts its worker with MALLOC_TRIM_THRESHOLD_=65536, so freed memory goes back to the OS at
    once; setting it also turns off glibc's adaptive mmap threshold, so every activation tensor of a CPU encoder
    is a fresh mmap, zero-filled page by page: tasks ran 1.7x slower on a worker than in a plain process (UCM
    image shard, efficientnet-lite0, 1 thread: 3.4 s vs 2.0 s). Large blocks are kept in the heap again (up to
    512 MB held before trimming), once per worker process. glibc only; elsewhere nothing to undo."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    _MALLOC_TUNED = True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 512 << 20)
    mallopt(m_trim_threshold, 512 << 20)


def local_cluster_environ() -> dict:
    """What dask sets in a local worker's environment before it starts, less MALLOC_TRIM_THRESHOLD_ (see
    _undo_malloc_trim): glibc then keeps its adaptive defaults from the first allocation on."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """This process's torch threads for a block (an in-process run with --threads), restored after. Without a
    count, the cores this process may use (affinity, cgroup quota: device.available_cores) where torch's default,
    the machine's cores, is more: a container limited to 2 cores of 64 runs 2 threads, not 64 fighting for 2. The
    ONNX Runtime encoders take the same count (encoders/onnx_encoders.py)."""
    import torch

    from duch.pipeline.compute.device import available_cores

    before = torch.get_num_threads()
    threads = threads or (available_cores() if before > available_cores() else None)
    if threads and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def can_fork_workers() -> bool:
    """Dask worker processes are daemonic by default and may not start DataLoader worker processes."""
    return not multiprocessing.current_process().daemon


def worker_device(device: str) -> str:
    """The device a task runs on. "auto"/"cuda" on a worker named by an integer (a LocalCluster's) takes GPU
    name % count, one GPU per worker; other workers use the first visible GPU (set CUDA_VISIBLE_DEVICES per
    worker, as dask-cuda does)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        worker = in_worker()
        name = getattr(worker, "name", None)
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            return f"cuda:{int(name) % torch.cuda.device_count()}"
        return "cuda"
    return "cpu" if device == "auto" else device
