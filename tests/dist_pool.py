"""Two CPU worker processes with a gloo process group, started once and given jobs by name.

Rendezvous goes through a FileStore in a temporary folder; every wait has a timeout, so a hung
collective fails the test instead of hanging the suite."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from datetime import timedelta
from typing import Any

WORLD = 2
INIT_TIMEOUT_S = 60
JOB_TIMEOUT_S = 120


def _worker(rank: int, store_path: str, jobs: Any, results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=INIT_TIMEOUT_S))
    while True:
        job = jobs.get()
        if job is None:
            break
        module, name, kwargs = job
        try:
            out = getattr(importlib.import_module(module), name)(**kwargs)
            results.put((rank, True, out))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    """``pool.run("dist_jobs", "train", **kwargs)`` runs the job on both ranks; returns
    ``[result of rank 0, result of rank 1]`` or raises with the workers' tracebacks."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory()
        store = os.path.join(self._dir.name, "store")
        self._jobs = [ctx.Queue() for _ in range(WORLD)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(r, store, self._jobs[r], self._results), daemon=True) for r in range(WORLD)]
        for p in self._procs:
            p.start()

    def run(self, module: str, job: str, **kwargs: Any) -> list[Any]:
        for q in self._jobs:
            q.put((module, job, kwargs))
        out: dict[int, Any] = {}
        errors = []
        for _ in range(WORLD):
            try:
                rank, ok, value = self._results.get(timeout=JOB_TIMEOUT_S)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{job}: a worker did not answer within {JOB_TIMEOUT_S} s (hung collective?)") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise AssertionError(f"{job} failed:\n" + "\n".join(errors))
        return [out[r] for r in range(WORLD)]

    def close(self) -> None:
        for q in self._jobs:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()
