"""The fan-out on a Slurm cluster: submitit's Slurm executor (``python -m spvr_lib.reproduce --executor slurm``).

A batch of :func:`spvr_lib.paper.jobs.fill_cache` becomes one job array: only the jobs whose records are missing
from the run cache (``jobs.missing``) are submitted, each array task computes its job and writes its record to the
run cache (which must therefore be on a filesystem the cluster's nodes share, as must the checkout and its
Python), exactly as a local worker does, and the notebook waits for the array.  A job that fails, is cancelled,
times out or is preempted without being requeued leaves no record (records are written atomically, at the end):
it is reported with its log's path, the others go on, and the notebook's own call computes it again; rerunning
the same command submits only what is still missing.  A preempted job is requeued by submitit and resumes from
its training checkpoint.

The jobs' size comes from ``SPVR_SLURM_*`` (set by ``reproduce``'s ``--slurm-*`` options, read by the notebooks'
processes): :class:`SlurmSettings`.
"""
from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from spvr_lib import store
from spvr_lib.paper import jobs as fanout

# environment variable -> (field, CLI option, what is expected)
ENV = {"SPVR_SLURM_PARTITION": ("partition", "--slurm-partition", "a partition name"),
       "SPVR_SLURM_TIME": ("time_min", "--slurm-time", "minutes, an int >= 1"),
       "SPVR_SLURM_CPUS": ("cpus", "--slurm-cpus", "CPUs per job, an int >= 1"),
       "SPVR_SLURM_GPUS": ("gpus", "--slurm-gpus", "GPUs per job, an int >= 0"),
       "SPVR_SLURM_MEM": ("mem", "--slurm-mem", "memory per job in sbatch's form, e.g. 16G"),
       "SPVR_SLURM_LOGS": ("logs", "--slurm-logs", "a folder the cluster's nodes share")}


_CHECKS = {"time_min": lambda v: isinstance(v, int) and v >= 1, "cpus": lambda v: isinstance(v, int) and v >= 1,
           "gpus": lambda v: isinstance(v, int) and v >= 0}


@dataclass(frozen=True)
class SlurmSettings:
    """The size of every job of an array (sbatch's options) and where submitit keeps its files."""

    partition: str | None = None     # --partition (None: the cluster's default)
    time_min: int = 24 * 60          # --time, minutes
    cpus: int = 1                    # --cpus-per-task (also the job's torch threads)
    gpus: int = 0                    # --gpus-per-node
    mem: str | None = None           # --mem (None: the cluster's default)
    logs: str = field(default_factory=lambda: str(store.REPO_ROOT / "build" / "slurm"))   # submitit's folder
    array_parallelism: int = 256     # array tasks running at once (submitit's default)

    def __post_init__(self) -> None:
        for env, (name, option, expected) in ENV.items():
            value = getattr(self, name)
            if not _CHECKS.get(name, lambda v: v is None or bool(str(v)))(value):
                raise ValueError(f"{option}={value!r} ({env}): expected {expected}")
        object.__setattr__(self, "logs", os.path.abspath(self.logs))   # the notebooks run in notebooks/

    def to_env(self) -> dict[str, str]:
        """These settings as the ``SPVR_SLURM_*`` variables that :func:`settings` reads back."""
        return {env: str(getattr(self, name)) for env, (name, _, _) in ENV.items() if getattr(self, name) is not None}

    def sbatch(self) -> dict[str, Any]:
        """sbatch's options of every job (as in the job script, without the array's)."""
        opts = {"--partition": self.partition, "--time": self.time_min, "--cpus-per-task": self.cpus,
                "--gpus-per-node": self.gpus or None, "--mem": self.mem}
        return {k: v for k, v in opts.items() if v is not None}

    def describe(self) -> str:
        """One line: the jobs' size, e.g. ``--cpus-per-task=1 --time=1440 (minutes)``."""
        return " ".join(f"{k}={v}" for k, v in self.sbatch().items()) + " (time in minutes)"


def settings(env: Mapping[str, str] | None = None) -> SlurmSettings:
    """:class:`SlurmSettings` from ``SPVR_SLURM_*`` (``os.environ`` by default); a value that is not what is
    expected raises ValueError naming the variable, its option, the value and what was expected."""
    env = os.environ if env is None else env
    kw: dict[str, Any] = {}
    for var, (name, option, expected) in ENV.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        if name in ("time_min", "cpus", "gpus"):
            try:
                kw[name] = int(raw)
            except ValueError:
                raise ValueError(f"{option}={raw!r} ({var}): expected {expected}") from None
        else:
            kw[name] = raw
    return SlurmSettings(**kw)


@dataclass
class Batch:
    """What :func:`run` did: how many jobs it was given, the Slurm ids of those it submitted (the missing ones),
    and the failures, each naming its job and log."""

    desc: str
    total: int
    submitted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)     # the submitted jobs' stdout logs


def _job(target: str, args: tuple | dict, kwargs: dict, token: str, threads: int) -> str | None:
    """One array task, on a node: ``threads`` torch threads (its CPUs), its records computed for the notebook's
    process (``token``), then ``jobs.call``: None on success, the traceback otherwise."""
    import torch

    torch.set_num_threads(threads)
    store.work_for(token)
    print(f"spvr job {target} on {os.uname().nodename} (SLURM_JOB_ID={os.environ.get('SLURM_JOB_ID')}, "
          f"array task {os.environ.get('SLURM_ARRAY_TASK_ID')}, {threads} thread(s))", flush=True)
    err = fanout.call(target, args, kwargs)
    if err is None:
        print("spvr job done", flush=True)
    else:
        print(f"spvr job failed:\n{err}", file=sys.stderr, flush=True)
    return err


def check_client() -> None:
    """Raise RuntimeError unless Slurm's client commands (sbatch, squeue, srun) are on PATH."""
    missing = [c for c in ("sbatch", "squeue", "srun") if shutil.which(c) is None]
    if missing:
        raise RuntimeError(f"--executor slurm (SPVR_EXECUTOR=slurm): {', '.join(missing)} not on PATH; expected to "
                           "run on a machine that submits Slurm jobs (a login node), or use --executor local")


def executor(cfg: SlurmSettings, desc: str = "jobs") -> Any:
    """submitit's Slurm executor sized by ``cfg`` (the job name ``spvr-<desc>``)."""
    import submitit

    check_client()
    ex = submitit.SlurmExecutor(folder=cfg.logs)
    params: dict[str, Any] = {"job_name": f"spvr-{desc}".replace(" ", "_")[:60], "time": cfg.time_min,
                              "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": cfg.cpus,
                              "array_parallelism": cfg.array_parallelism,
                              "setup": [f"export OMP_NUM_THREADS={cfg.cpus}"]}
    params.update({k: v for k, v in (("partition", cfg.partition), ("mem", cfg.mem),
                                     ("gpus_per_node", cfg.gpus or None)) if v is not None})
    ex.update_parameters(**params)
    return ex


def queued(user: str | None = None) -> set[str] | None:
    """The ids of ``user``'s jobs Slurm still holds pending or running (array tasks one by one, ``123_4``);
    None when ``squeue`` cannot say."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-u", user or getpass.getuser()],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.split()) if out.returncode == 0 else None


def _outcome(job: Any) -> tuple[str, str] | None:
    """None when ``job`` (finished, with a result) computed its record; else (why, the traceback)."""
    exc = job.exception()
    err = str(exc).strip() if exc is not None else job.result()
    if err is None:
        return None
    return (err.strip().splitlines()[-1] if err.strip() else type(exc).__name__), err


def _state(job_id: str) -> str:
    """The job's state by ``sacct`` (the cluster's accounting), or "unknown" where it keeps none."""
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    states = out.stdout.split()
    return states[-1] if out.returncode == 0 and states else "unknown"


def wait(submitted: Sequence[Any], names: Sequence[str], desc: str = "jobs", progress: bool = True,
         poll_s: float = 2.0) -> list[str]:
    """Wait for every job of ``submitted`` (submitit jobs; ``names[i]`` says what job i computes); returns one
    failure per job that did not compute its record: "Slurm job <id> (<what>) failed: <why>" with its log's path
    (and the traceback), also printed as it happens.  A job is over when its result is written (looked for every
    ``poll_s``), or when Slurm no longer holds it in two ``squeue`` answers in a row (asked every ``poll_s`` at
    first, then less often, at most every minute, to spare the controller): cancelled, timed out or killed with its
    node, it leaves no result (nor a record)."""
    pending = dict(zip([j.job_id for j in submitted], zip(submitted, names)))
    absent: dict[str, int] = {}
    failures: list[str] = []
    t0, asked, live = time.monotonic(), float("-inf"), None
    with tqdm(total=len(pending), desc=f"{desc} (Slurm)", disable=not progress) as bar:
        while pending:
            now = time.monotonic()
            fresh = now - asked >= min(60.0, max(poll_s, (now - t0) / 10))
            if fresh:
                live, asked = queued(), now
            for jid, (job, what) in list(pending.items()):
                failed: tuple[str, str] | None
                if job.paths.result_pickle.exists():
                    failed = _outcome(job)
                elif not fresh:
                    continue
                elif live is not None and jid in live:
                    absent.pop(jid, None)            # still (or again, requeued) held by Slurm
                    continue
                elif live is not None or job.done():  # no squeue answer: submitit's own check (sacct)
                    absent[jid] = absent.get(jid, 0) + 1
                    if absent[jid] < 2 and live is not None:
                        continue                     # a result may still be on its way (a slow shared disk)
                    failed = (f"ended without a result (Slurm state: {_state(jid)}): cancelled, timed out, "
                              "preempted and not requeued, or its node failed", "")
                else:
                    continue
                del pending[jid]
                bar.update(1)
                if failed is not None:
                    msg = f"Slurm job {jid} ({what}) failed: {failed[0]}\n  log: {job.paths.stderr}"
                    print(msg, file=sys.stderr, flush=True)
                    failures.append(f"{msg}\n{failed[1]}".rstrip())
            if pending:
                time.sleep(poll_s)
    return failures


def submit(target: Callable[..., Any], jobs: Sequence[tuple | dict], kwargs: dict | None = None,
           cfg: SlurmSettings | None = None, desc: str = "jobs") -> list[Any]:
    """Submit ``target(*job, **kwargs)`` for every job of ``jobs`` (in order) as one job array (a single job for
    one) sized by ``cfg`` (default :func:`settings`); the submitit jobs."""
    cfg = cfg or settings()
    name, n = fanout.target_name(target), len(jobs)
    return executor(cfg, desc).map_array(_job, [name] * n, [fanout.job_args(j) for j in jobs],
                                         [dict(kwargs or {})] * n, [store.PROCESS_TOKEN] * n, [cfg.cpus] * n)


def run(target: Callable[..., Any], jobs: Sequence[tuple | dict], kwargs: dict | None = None, desc: str = "jobs",
        progress: bool = True, cfg: SlurmSettings | None = None, poll_s: float = 2.0) -> Batch:
    """Submit the jobs of ``jobs`` (``target(*job, **kwargs)``, in the given order) whose records are missing from
    the run cache (``jobs.missing``) as one Slurm job array sized by ``cfg`` (default :func:`settings`), wait for
    them and report each failure with its log (:func:`wait`).  Interrupted while waiting (the notebook stopped),
    it cancels the jobs Slurm still holds."""
    cfg = cfg or settings()
    todo = fanout.missing(target, jobs, kwargs)
    batch = Batch(desc, len(jobs))
    if not todo:
        print(f"{desc}: all {len(jobs)} jobs found in the run cache; nothing submitted to Slurm", flush=True)
        return batch
    submitted = submit(target, todo, kwargs, cfg, desc)
    batch.submitted = [j.job_id for j in submitted]
    batch.logs = [str(j.paths.stdout) for j in submitted]
    print(f"{desc}: {len(todo)} of {len(jobs)} jobs missing from the run cache, submitted to Slurm as "
          f"{'job array' if len(todo) > 1 else 'job'} {batch.submitted[0].split('_')[0]} ({cfg.describe()}; "
          f"logs: {cfg.logs})", flush=True)
    names = [f"{fanout.target_name(target)}{_short(j)}" for j in todo]
    try:
        batch.failures = wait(submitted, names, desc, progress, poll_s)
    except BaseException:
        live = queued() or set()
        for job in submitted:
            if job.job_id in live:
                job.cancel(check=False)
        raise
    return batch


def _short(job: tuple | dict, width: int = 120) -> str:
    """A job's arguments in a few words (the scale by its name)."""
    def one(v: Any) -> str:
        return f"<scale {v.name}>" if hasattr(v, "models") and hasattr(v, "name") else repr(v)
    text = ", ".join(f"{k}={one(v)}" for k, v in job.items()) if isinstance(job, dict) else ", ".join(map(one, job))
    return f"({text[:width]}{'...' if len(text) > width else ''})"


__all__ = ["Batch", "ENV", "SlurmSettings", "check_client", "executor", "queued", "run", "settings", "submit", "wait"]
