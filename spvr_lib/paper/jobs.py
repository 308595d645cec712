"""Independent cached computations fanned out on an executor: local processes, or Slurm jobs.

A notebook asks for many independent runs (every method, rate and seed of Table 1; lr trials; on-budget
readings); :func:`fill_cache` has the ones missing from the run cache computed elsewhere, where they write
their records, and the notebook then reads every record in order, in its own process (cache hits, so the
provenance of each artifact lists them as usual).  A job that fails is simply left out of the cache: the
notebook's own call computes it again and reports its error.

The executor is ``SPVR_EXECUTOR`` (``python -m spvr_lib.reproduce --executor``):

* ``local`` (default): the standard library's ``concurrent.futures`` process pool, one single-thread process per
  core (on a 2-core CPU the cpu scale's narrow networks train ~1.6x faster as two single-thread processes than as
  one process with two threads: ``python -m spvr_lib.bench train``).  The worker count is the scale's
  ``workers`` (``SPVR_WORKERS`` overrides it); 1 runs nothing here.
* ``slurm``: submitit's Slurm executor (:mod:`spvr_lib.paper.slurm`): the jobs whose records are missing go to
  the cluster as one job array, sized by ``SPVR_SLURM_*``; the run cache must be on a filesystem the jobs share.

Either way a record computed for the notebook counts as computed by it (``store.work_for``), so the run account
(figures/<scale>/reproduce_run.json) is the same.
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import hashlib
import importlib
import multiprocessing
import os
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from spvr_lib import store
from spvr_lib.paper import slurm

EXECUTORS = ("local", "slurm")


def no_training(job: Any) -> tuple[float, float, float]:
    """:attr:`Batch.size` of a job that trains nothing (a pruned network, a ranking's record)."""
    return 0.0, 0.0, 0.0


@dataclass(frozen=True)
class Batch:
    """One batch of a notebook's independent computations, declared once by the notebook's module: the runner fans
    it out (:func:`run`), the plan counts and costs it (``plan.plan``, ``plan.slurm_jobs``).

    ``what``: the plan's words; ``target``: the cached module-level function each job calls; ``jobs``: its argument
    tuples (or keyword dicts); ``size(job)``: (epochs the job trains, its network's share of the base network's
    multiply-accumulates per image, the share of the training images an epoch reads), (0, 0, 0) for a job that
    trains nothing; ``kwargs``: passed to every job; ``cost(job)``: the submission order (longest first);
    ``ident(job)``: what the job computes, where two different argument tuples give the same record (the local
    methods' one architecture trained from scratch): jobs of one ident run once, and the plan counts them once
    across notebooks (default: the arguments themselves)."""

    what: str
    target: Callable[..., Any]
    jobs: tuple[Any, ...]
    size: Callable[[Any], tuple[float, float, float]] = no_training
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    cost: Callable[[Any], Any] | None = None
    ident: Callable[[Any], Any] | None = None

    def key(self, job: Any) -> str:
        """The job's identity as a string (:attr:`ident`, else its arguments), with the target's name."""
        return f"{target_name(self.target)}:" + store.canonical_json(_ident(self.ident(job) if self.ident else job))

    def trainings(self) -> int:
        """How many of the jobs train a network."""
        return sum(self.size(job)[0] > 0 for job in self.jobs)


def run(batches: Sequence[Batch], workers: int, progress: bool = True) -> list[str]:
    """:func:`fill_cache` for ``batches``, those of one target merged into one batch (several models' lr trials
    side by side), in the order each target first appears; each job once.  The tracebacks of the jobs that
    failed."""
    merged: dict[Any, list[Batch]] = {}
    for b in batches:
        merged.setdefault(b.target, []).append(b)
    failures: list[str] = []
    for target, group in merged.items():
        todo: dict[str, Any] = {}
        for b in group:
            for job in b.jobs:
                todo.setdefault(b.key(job), job)
        todo = list(todo.values())
        failures += fill_cache(target, todo, workers, desc=group[0].what.split(":")[0], progress=progress,
                               kwargs=dict(group[0].kwargs), cost=group[0].cost)
    return failures


def _ident(job: Any) -> Any:
    """A job's arguments as JSON can say them (a scale by its name, a state dict by its digest): what tells two jobs
    apart in :func:`run`."""
    if isinstance(job, dict):
        return {k: _ident(v) for k, v in job.items()}
    if isinstance(job, (tuple, list)):
        return [_ident(v) for v in job]
    if hasattr(job, "name") and hasattr(job, "models"):        # a scale
        return f"scale:{job.name}"
    if hasattr(job, "to_dict"):
        return job.to_dict()
    if isinstance(job, Mapping) or hasattr(job, "items"):
        return {str(k): _ident(v) for k, v in job.items()}
    if hasattr(job, "shape") and hasattr(job, "dtype"):        # a tensor (an init state's): by its bytes
        return hashlib.sha256(job.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return job


def executor() -> str:
    """The executor of the fan-out: ``SPVR_EXECUTOR`` (``local`` when unset), one of :data:`EXECUTORS`."""
    name = os.environ.get("SPVR_EXECUTOR") or "local"
    if name not in EXECUTORS:
        raise ValueError(f"SPVR_EXECUTOR={name!r}: expected one of {list(EXECUTORS)}")
    return name


def worker_count(cfg: Any = None) -> int:
    """How many jobs run side by side: with the local executor ``SPVR_WORKERS``, else the scale's ``workers``
    (1 when the scale has none), never more than the machine's cores; with Slurm as many as the cluster runs
    (the array's parallelism), whatever the scale says."""
    if executor() == "slurm":

        return slurm.settings().array_parallelism
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


def target_name(target: Callable[..., Any]) -> str:
    """``module:function`` of a module-level function (what a job names and imports)."""
    return f"{target.__module__}:{target.__name__}"


def call(target: str, args: tuple | dict, kwargs: dict) -> str | None:
    """Run ``module:function(*args, **kwargs)`` (``**args`` when ``args`` is a dict) where the job runs; None on
    success, the traceback otherwise."""
    module, name = target.split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        fn(**args, **kwargs) if isinstance(args, dict) else fn(*args, **kwargs)
        return None
    except Exception:                       # the notebook's own call reports it
        return traceback.format_exc(limit=4)


def job_args(job: tuple | dict) -> tuple | dict:
    return dict(job) if isinstance(job, dict) else tuple(job)


def longest_first(jobs: Sequence[Any], cost: Callable[[Any], Any] | None) -> list[Any]:
    """``jobs`` in the order :func:`fill_cache` submits them: by decreasing ``cost(job)`` (a number or a
    tuple compared in order; stable: equal costs keep their order), so that the longest jobs start first
    and the last to finish is a short one (no worker idles long at the end of a batch); as given when
    ``cost`` is None."""
    if cost is None:
        return list(jobs)
    return sorted(jobs, key=cost, reverse=True)


def missing(target: Callable[..., Any], jobs: Sequence[tuple | dict], kwargs: dict | None = None) -> list[Any]:
    """The jobs whose records are not all in the run cache, in the given order.  Each job runs here with
    computing forbidden (``SPVR_FORBID_COMPUTE=*``): it reads what is cached and stops at the first record it
    would compute (or at an error, which the job, run for real, then reports).  What it reads here is not
    counted as used by this process (``store.records_used``)."""
    name, kw = target_name(target), {**(kwargs or {})}
    saved_env, saved_used = os.environ.get("SPVR_FORBID_COMPUTE"), copy.deepcopy(store._used)
    os.environ["SPVR_FORBID_COMPUTE"] = "*"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # "computed by other code; computing it again": missing
            return [job for job in jobs if call(name, job_args(job), kw) is not None]
    finally:
        if saved_env is None:
            os.environ.pop("SPVR_FORBID_COMPUTE", None)
        else:
            os.environ["SPVR_FORBID_COMPUTE"] = saved_env
        store._used.clear()
        store._used.update(saved_used)


def _init_worker(token: str) -> None:
    """A local worker: one torch thread, its records computed for the notebook (``token``), and it stops when the
    notebook's process dies (concurrent.futures' workers would otherwise finish their job and wait forever)."""
    import threading
    import time

    import torch


    torch.set_num_threads(1)
    store.work_for(token)
    parent = os.getppid()

    def watch() -> None:             # the notebook was stopped: stop too (an unfinished record is not written)
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run_locally(name: str, jobs: list[Any], workers: int, desc: str, progress: bool, kwargs: dict) -> list[str]:
    ctx = multiprocessing.get_context("spawn")      # no fork of a process whose OpenMP threads already run
    failures: list[str] = []
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                initializer=_init_worker, initargs=(store.PROCESS_TOKEN,)) as pool:
        futures = [pool.submit(call, name, job_args(job), kwargs) for job in jobs]
        for fut in tqdm(cf.as_completed(futures), total=len(futures), desc=desc, disable=not progress):
            err = fut.result()
            if err is not None:
                failures.append(err)
    return failures


def fill_cache(target: Callable[..., Any], jobs: Sequence[tuple | dict], workers: int, desc: str = "jobs",
               progress: bool = True, kwargs: dict | None = None,
               cost: Callable[[Any], Any] | None = None) -> list[str]:
    """Run ``target(*job, **kwargs)`` (``target(**job, **kwargs)`` for a dict job; pass ``kwargs={"progress":
    False}`` to silence the jobs' bars) for every job on the :func:`executor` so that their cached records
    exist; results are not returned (read them from the cache).  ``target`` must be a module-level function
    whose arguments pickle.  Locally: in ``workers`` spawned single-thread processes; with ``workers <= 1`` or at
    most one job nothing runs here.  On Slurm: only the jobs :func:`missing` from the cache, as one job array,
    waited for.  ``cost(job)``: the job's relative duration (a number or a tuple); the jobs are submitted
    longest first (:func:`longest_first`), in the given order without it.  Returns the tracebacks of the jobs
    that failed (they are not cached; on Slurm each names its log)."""
    ordered, kw = longest_first(jobs, cost), dict(kwargs or {})
    if not ordered:
        return []
    if executor() == "slurm":

        return slurm.run(target, ordered, kw, desc=desc, progress=progress).failures
    if workers <= 1 or len(jobs) <= 1:
        return []
    return _run_locally(target_name(target), ordered, workers, desc, progress, kw)
