"""Independent cached computations spread over the cores: one process per core, one torch thread each.

On a 2-core CPU the cpu scale's narrow networks train ~1.6x faster as two single-thread processes than as
one process with two threads (``python -m spvr_lib.bench train --model M --scale cpu --json`` prints both).
A notebook asks for many independent runs (every method, rate and seed of Table 1); :func:`fill_cache`
computes the ones missing from the run cache in worker processes, which write their records there; the
notebook then reads every record in order, in its own process (cache hits, so the provenance of each
artifact lists them as usual).  A job that fails in a worker is simply left out of the cache: the
notebook's own call computes it again and reports its error.

The worker count is the scale's ``workers`` (``SPVR_WORKERS`` overrides it); 1 runs nothing here.
"""
from __future__ import annotations

import concurrent.futures as cf
import importlib
import multiprocessing
import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from spvr_lib import store


def worker_count(cfg: Any = None) -> int:
    """How many worker processes run independent jobs: ``SPVR_WORKERS``, else the scale's ``workers``
    (1 when the scale has none), never more than the machine's cores."""
    env = os.environ.get("SPVR_WORKERS")
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"SPVR_WORKERS={env!r}: expected an int >= 1") from None
        if n < 1:
            raise ValueError(f"SPVR_WORKERS={env!r}: expected an int >= 1")
    else:
        n = int(getattr(cfg, "workers", 1) or 1)
    return max(1, min(n, os.cpu_count() or 1))


def _init_worker(token: str) -> None:
    import threading
    import time

    import torch

    from spvr_lib import store

    torch.set_num_threads(1)
    store.work_for(token)
    parent = os.getppid()

    def watch() -> None:             # the notebook was stopped: stop too (an unfinished record is not written)
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _call(target: str, args: tuple | dict, kwargs: dict) -> str | None:
    """Run ``module:function(*args, **kwargs)`` (``**args`` when ``args`` is a dict) in a worker; None on
    success, the traceback otherwise."""
    module, name = target.split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        fn(**args, **kwargs) if isinstance(args, dict) else fn(*args, **kwargs)
        return None
    except Exception:                       # the notebook's own call reports it
        return traceback.format_exc(limit=4)


def longest_first(jobs: Sequence[Any], cost: Callable[[Any], Any] | None) -> list[Any]:
    """``jobs`` in the order :func:`fill_cache` submits them: by decreasing ``cost(job)`` (a number or a
    tuple compared in order; stable: equal costs keep their order), so that the longest jobs start first
    and the last to finish is a short one (no worker idles long at the end of a batch); as given when
    ``cost`` is None."""
    if cost is None:
        return list(jobs)
    return sorted(jobs, key=cost, reverse=True)


def fill_cache(target: Callable[..., Any], jobs: Sequence[tuple | dict], workers: int, desc: str = "jobs",
               progress: bool = True, kwargs: dict | None = None,
               cost: Callable[[Any], Any] | None = None) -> list[str]:
    """Run ``target(*job, **kwargs)`` (``target(**job, **kwargs)`` for a dict job; pass ``kwargs={"progress":
    False}`` to silence the workers' bars) for every job in ``workers`` spawned processes (one torch thread
    each) so that their cached records exist; results are not returned (read them from the cache).
    ``target`` must be a module-level function whose arguments pickle.  With ``workers <= 1`` or at most
    one job, nothing runs here.  ``cost(job)``: the job's relative duration (a number or a tuple); the jobs
    are submitted longest first (:func:`longest_first`), in the given order without it.  Returns the
    tracebacks of the jobs that failed (they are not cached)."""
    if workers <= 1 or len(jobs) <= 1:
        return []
    name = f"{target.__module__}:{target.__name__}"
    ctx = multiprocessing.get_context("spawn")      # no fork of a process whose OpenMP threads already run
    failures: list[str] = []
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                initializer=_init_worker, initargs=(store.PROCESS_TOKEN,)) as pool:
        futures = [pool.submit(_call, name, dict(job) if isinstance(job, dict) else tuple(job), dict(kwargs or {}))
                   for job in longest_first(jobs, cost)]
        for fut in tqdm(cf.as_completed(futures), total=len(futures), desc=desc, disable=not progress):
            err = fut.result()
            if err is not None:
                failures.append(err)
    return failures
