"""Process groups for the distributed tests: spawned gloo workers on the CPU, reused across tests.

A :class:`WorkerPool` starts ``MAX_WORLD_SIZE`` processes (``multiprocessing`` spawn) that join one gloo group
through a fresh file store, and create one subgroup per smaller world size (ranks ``0 .. w-1``): a task for
world size w runs on the default group when w is the pool's size, else on the subgroup (the other workers
skip it), so the library's ``process_group=None`` and explicit-group paths are both exercised while only
``MAX_WORLD_SIZE`` processes import torch. ``pool.run(fn, world_size, *args)`` calls
``fn(rank, world_size, group, *args)`` on every member (``group`` None for the default group) and returns the
members' results in rank order (small picklable values). A task that raises on any rank fails the calling
test with every rank's traceback; a task that does not finish within its timeout (a hang: a rank waiting in a
collective the others never join) kills the pool and fails the test instead of blocking the run; the next
test gets a fresh pool. ``fn`` must be a module-level function of an importable module (the workers import
it by name).
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback

MAX_WORLD_SIZE = 3
STARTUP_TIMEOUT = 180.0     # seconds for every worker to import torch + imbreg_fast and join the group
TASK_TIMEOUT = 120.0        # seconds for one task on every rank
COLLECTIVE_TIMEOUT = 60     # seconds gloo waits in one collective before it raises


def _worker(rank: int, world_size: int, init_file: str, tasks, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
        subgroups = {w: dist.new_group(list(range(w))) for w in range(2, world_size)}
        import imbreg_fast  # noqa: F401  (the compiled extension, loaded once per worker)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, size, args = item
        if rank >= size:
            continue
        group = None if size == world_size else subgroups[size]
        try:
            results.put((rank, True, fn(rank, size, group, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    """``MAX_WORLD_SIZE`` gloo workers; see the module docstring."""

    def __init__(self, world_size: int = MAX_WORLD_SIZE):
        self.world_size = world_size
        self._dir = tempfile.TemporaryDirectory(prefix="imbreg_dist_")
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        init_file = os.path.join(self._dir.name, "store")
        self._procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, self._tasks[r], self._results),
                                   daemon=True) for r in range(world_size)]
        for p in self._procs:
            p.start()
        self.alive = True
        self._collect("startup", world_size, STARTUP_TIMEOUT)

    def _collect(self, name: str, size: int, timeout: float) -> list:
        out, errors = {}, {}
        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < size:
            remaining = deadline - time.monotonic()
            try:
                rank, ok, value = self._results.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                missing = sorted(set(range(size)) - set(out) - set(errors))
                self.kill()
                detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                raise AssertionError(f"{name}: rank(s) {missing} of {size} did not finish within {timeout:.0f} s "
                                     f"(a hang); the pool was killed{detail}") from None
            (out if ok else errors)[rank] = value
        if errors:
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{name} failed on rank(s) {sorted(errors)} of {size}:{detail}")
        return [out[r] for r in range(size)]

    def run(self, fn, world_size: int, *args, timeout: float = TASK_TIMEOUT) -> list:
        """``fn(rank, world_size, group, *args)`` on ranks ``0 .. world_size-1``; their results in rank order."""
        if not self.alive:
            raise RuntimeError("the worker pool was killed")
        if not 2 <= world_size <= self.world_size:
            raise ValueError(f"world_size must be in [2, {self.world_size}], got {world_size}")
        for q in self._tasks:
            q.put((fn, world_size, args))
        return self._collect(f"{fn.__name__} (world size {world_size})", world_size, timeout)

    def kill(self) -> None:
        self.alive = False
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=10)
        self._dir.cleanup()

    def close(self) -> None:
        if not self.alive:
            return
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=30)
        self.kill()


class Pools:
    """The live :class:`WorkerPool`, created on first use and replaced after a kill."""

    def __init__(self):
        self._pool: WorkerPool | None = None

    def run(self, fn, world_size: int, *args, timeout: float = TASK_TIMEOUT) -> list:
        if self._pool is None or not self._pool.alive:
            self._pool = WorkerPool()
        return self._pool.run(fn, world_size, *args, timeout=timeout)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
