"""The fan-out on Slurm (spvr_lib.paper.slurm, submitit's Slurm executor), against a real one-node cluster
(munged, slurmctld, slurmd: slurm_cluster.py starts and stops it): the smoke scale's trainings give the same
records through Slurm as through the local processes, a rerun submits only what is missing, and a job that fails,
is cancelled, times out or is preempted leaves no partial record and is reported with its log.

Without Slurm installed (or without root) the cluster tests skip, saying so; .ci/run installs Slurm and sets
SPVR_REQUIRE_SLURM=1, which turns the skip into a failure.  The other tests need no cluster."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import slurm_cluster
from spvr_lib import store, train
from spvr_lib.paper import base_models, jobs, plan, reproduce, scales, slurm

SMOKE = scales.get_scale("smoke")


def _say(config: pytest.Config, text: str) -> None:
    """Write to the terminal even under pytest -q with captured output (the CI log shows it)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None:
        return
    with capman.global_and_fixture_disabled():
        tr.ensure_newline()
        for line in text.splitlines():
            tr.write_line(line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pytestconfig):
    why = slurm_cluster.unavailable()
    if why:
        if os.environ.get("SPVR_REQUIRE_SLURM") == "1":
            pytest.fail(f"SPVR_REQUIRE_SLURM=1 (set by .ci/run) but {why}")
        pytest.skip(f"{why}: .ci/run installs it and runs these tests against a real slurmctld/slurmd")
    t0 = time.perf_counter()
    c = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(c.conf))
    version = subprocess.run(["slurmctld", "-V"], capture_output=True, text=True).stdout.strip()
    _say(pytestconfig, f"[slurm] {version}: munged, slurmctld and slurmd up on node {c.node!r} in "
                       f"{time.perf_counter() - t0:.1f} s ({c.conf})")
    try:
        yield c
    finally:
        mp.undo()
        c.stop()
        _say(pytestconfig, "[slurm] daemons stopped")


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(store, "_used", {})
    for var in ("SPVR_FORBID_COMPUTE", "SPVR_WORKERS", *slurm.ENV):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield monkeypatch
    torch.set_num_threads(threads)


def _use(monkeypatch, executor: str, cache: Path, **slurm_env: str) -> None:
    monkeypatch.setenv("SPVR_EXECUTOR", executor)
    monkeypatch.setenv("SPVR_CACHE", str(cache))
    for k, v in slurm_env.items():
        monkeypatch.setenv(k, v)


def _from_cache(monkeypatch, fn, *args, **kwargs):
    """``fn``'s record read from the cache: computing anything is an error."""
    monkeypatch.setenv("SPVR_FORBID_COMPUTE", "*")
    try:
        return fn(*args, **kwargs)
    finally:
        monkeypatch.delenv("SPVR_FORBID_COMPUTE")


def _spy(monkeypatch) -> list[slurm.Batch]:
    """Every batch ``slurm.run`` handles from now on."""
    batches, real = [], slurm.run

    def run(*args, **kwargs):
        batches.append(real(*args, **kwargs))
        return batches[-1]
    monkeypatch.setattr(slurm, "run", run)
    return batches


def _signal(job, *signals: str) -> None:
    """What Slurm sends a job at its time limit (USR2) or when it is preempted (TERM, then USR2), as submitit's
    ``job._interrupt`` sends them, but without failing when the job has already ended on the first one (scancel
    then says "Job can not be altered now")."""
    for sig in signals:
        subprocess.run(["scancel", "--signal", sig, job.job_id], capture_output=True)


def _started(job, times: int = 1) -> bool:
    return job.paths.stdout.exists() and job.paths.stdout.read_text().count("spvr job ") >= times


def _wait_for(predicate, timeout_s: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


# --------------------------------------------------------------------------- against the real cluster
def test_smoke_trainings_through_slurm_equal_the_local_ones(cluster, env, tmp_path, pytestconfig):
    keys = list(SMOKE.models)
    factors = (1, SMOKE.convergence_factor)
    # the base networks of notebook 03 (prepare_bases), side by side in two local processes
    _use(env, "local", tmp_path / "local" / "runs")
    env.setenv("SPVR_WORKERS", "2")                      # the smoke scale has one worker: nothing would fan out
    t0 = time.perf_counter()
    base_models.prepare_bases(SMOKE, keys, progress=False)
    local_s = time.perf_counter() - t0
    local = {(k, f): _from_cache(env, base_models.train_base, SMOKE, k, progress=False, epochs_factor=f)
             for k in keys for f in factors}

    # the same, on Slurm: one job array of the 6 trainings (what the plan says notebook 03 submits)
    _use(env, "slurm", tmp_path / "slurm" / "runs", SPVR_SLURM_LOGS=str(tmp_path / "logs"), SPVR_SLURM_CPUS="1",
         SPVR_SLURM_TIME="30")
    env.setattr(store, "_used", {})
    batches = _spy(env)
    t0 = time.perf_counter()
    base_models.prepare_bases(SMOKE, keys, progress=False)
    slurm_s = time.perf_counter() - t0
    assert [len(b.submitted) for b in batches] == [6] and batches[0].failures == []
    assert len(batches[0].submitted) == plan.slurm_jobs(SMOKE).query("notebook == '03'")["jobs"].sum()
    remote = {(k, f): _from_cache(env, base_models.train_base, SMOKE, k, progress=False, epochs_factor=f)
              for k in keys for f in factors}
    used = store.records_used()

    rows = []
    for key, lrec in local.items():
        rrec = remote[key]
        assert rrec["hash"] == lrec["hash"]
        for field in ("top1", "top5", "loss", "params", "epochs", "history"):
            assert rrec.get(field) == lrec.get(field), (key, field)
        assert train.state_dict_digest(train.load_weights(rrec).state_dict()) == \
            train.state_dict_digest(train.load_weights(lrec).state_dict())
        # computed for this process (the notebook's), as a local worker's record is: the run account counts it
        assert rrec["computed_by"] == store.PROCESS_TOKEN and used[rrec["hash"]]["computed"]
        assert rrec["provenance"]["device"]["torch_threads"] == 1
        rows.append(f"[slurm]   {key[0]:>8} x{key[1]}  top1 {lrec['top1']:6.2f} local == {rrec['top1']:6.2f} slurm, "
                    f"{len(lrec['history'])} epoch(s) of history equal, weights equal ({rrec['hash']})")

    # each array task ran through slurmctld (allocated, completed) and slurmd (the job's own log); the controller
    # logs a completion just after the job's result is written
    array = batches[0].submitted[0].split("_")[0]
    _wait_for(lambda: cluster.log("slurmctld").count(f"_job_complete: JobId={array}_") >= 2 * 6,
              timeout_s=30, what="slurmctld to log every task's completion")
    ctld = cluster.log("slurmctld")
    evidence = []
    for jid, log in zip(batches[0].submitted, batches[0].logs):
        array, task = jid.split("_")
        alloc = re.search(rf".*(?:sched: Allocate|Started) JobId={array}_{task}\(\d+\).*{cluster.node}.*", ctld)
        done = re.search(rf".*_job_complete: JobId={array}_{task}\(\d+\) WEXITSTATUS 0.*", ctld)
        assert alloc and done, (jid, ctld[-3000:])
        text = Path(log).read_text()
        assert "spvr job spvr_lib.paper.base_models:_base_job on" in text and "SLURM_JOB_ID=" in text
        assert "spvr job done" in text
        evidence += [f"[slurm]   slurmctld: {alloc.group(0).strip()}", f"[slurm]   slurmctld: {done.group(0).strip()}"]
    launched = [l.strip() for l in cluster.log("slurmd").splitlines() if "launch task" in l or "Launching batch" in l]
    assert len([l for l in launched if "Launching batch job" in l]) >= 6

    # resumed from the cache: the same command again submits nothing
    batches.clear()
    base_models.prepare_bases(SMOKE, keys, progress=False)
    assert [len(b.submitted) for b in batches] == [0] and batches[0].total == 6

    _say(pytestconfig, "\n".join(
        [f"[slurm] smoke base trainings (notebook 03's batch): 6 in local processes in {local_s:.1f} s, 6 as Slurm "
         f"job array {array} in {slurm_s:.1f} s; the records are equal:"] + rows +
        evidence + [f"[slurm]   slurmd: {l}" for l in launched[:4]] +
        ["[slurm] rerun of the same batch: 0 jobs submitted (all 6 found in the run cache)"]))


def test_failed_cancelled_and_timed_out_jobs_leave_no_record_and_are_reported(cluster, env, tmp_path,
                                                                             pytestconfig):
    runs = tmp_path / "runs"
    _use(env, "slurm", runs)
    # time limit 10 min: submitit counts a job signalled (USR2) that close to its limit as timed out
    cfg = slurm.SlurmSettings(time_min=10, cpus=1, logs=str(tmp_path / "logs"))
    todo = [(SMOKE, "vgg16", 3000), (SMOKE, "vgg16", 3001), (SMOKE, "nonsense", 1), (SMOKE, "resnet34", 1)]
    submitted = slurm.submit(base_models._base_job, todo, cfg=cfg, desc="failures")
    cancel, timeout, bad, good = submitted
    _wait_for(lambda: _started(cancel) and _started(timeout), what="the two long trainings to start")
    time.sleep(1.5)                                          # an epoch or more into their training
    subprocess.run(["scancel", cancel.job_id], check=True)
    _signal(timeout, "USR2")                                 # what Slurm sends before the time limit
    failures = slurm.wait(submitted, ["cancelled", "timed out", "bad key", "good"], progress=False, poll_s=1)

    by_job = {f.split()[2]: f for f in failures}
    assert set(by_job) == {cancel.job_id, timeout.job_id, bad.job_id}          # the good one went on
    assert "ended without a result" in by_job[cancel.job_id]
    assert "timed-out and not checkpointable" in by_job[timeout.job_id]
    assert "ValueError: model='nonsense' is not set up" in by_job[bad.job_id]
    for job in (cancel, timeout, bad):
        log = re.search(r"log: (\S+)", by_job[job.job_id]).group(1)
        assert log == str(job.paths.stderr) and Path(log).exists()
    assert "CANCELLED" in cancel.paths.stderr.read_text()
    assert "ValueError" in bad.paths.stderr.read_text()       # the job's traceback is in its log
    # no partial record: only the good job's; a rerun would submit exactly the three others
    good_rec = _from_cache(env, base_models.train_base, SMOKE, "resnet34", progress=False)
    assert sorted(p.name for p in runs.glob("*.json")) == [f"train-{good_rec['hash']}.json"]
    assert jobs.missing(base_models._base_job, todo) == todo[:3]
    _say(pytestconfig, "[slurm] failures reported with their logs, no record left:\n" +
         "\n".join(f"[slurm]   {f.splitlines()[0]}" for f in failures))


def test_a_preempted_job_is_requeued_and_resumes_to_the_same_record(cluster, env, tmp_path, pytestconfig):
    runs = tmp_path / "slurm" / "runs"
    _use(env, "slurm", runs)
    cfg = slurm.SlurmSettings(time_min=60, cpus=1, logs=str(tmp_path / "logs"))
    job, = slurm.submit(base_models._base_job, [(SMOKE, "vgg16", 40)], cfg=cfg, desc="preempted")
    _wait_for(lambda: _started(job), what="the training to start")
    time.sleep(1.5)
    _signal(job, "TERM", "USR2")                             # preemption (submitit requeues the job)
    _wait_for(lambda: "Requeued job" in job.paths.stdout.read_text(), what="submitit to requeue the job")
    _wait_for(lambda: subprocess.run(["squeue", "-h", "-o", "%T", "-j", job.job_id], capture_output=True,
                                     text=True).stdout.strip() == "PENDING", what="the job to be pending again")
    assert not list(runs.glob("train-*.json"))               # nothing written by the interrupted attempt
    # a requeued job waits ~2 min before it may start again; the test cluster lets it start now
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)
    assert slurm.wait([job], ["preempted"], progress=False, poll_s=1) == []
    assert job.paths.stdout.read_text().count("spvr job ") == 2 + 1      # two starts, one "done"
    resumed = _from_cache(env, base_models.train_base, SMOKE, "vgg16", progress=False, epochs_factor=40)
    assert resumed["interrupted_s"] > 0                      # resumed from its checkpoint, its lost time counted
    env.setenv("SPVR_CACHE", str(tmp_path / "here" / "runs"))
    whole = base_models.train_base(SMOKE, "vgg16", progress=False, epochs_factor=40)
    assert resumed["hash"] == whole["hash"] and resumed["top1"] == whole["top1"]
    assert resumed["history"] == whole["history"]
    _say(pytestconfig, f"[slurm] preempted job {job.job_id}: requeued by submitit, resumed after "
                       f"{resumed['interrupted_s']:.1f} s lost, record equal to an uninterrupted run "
                       f"(top1 {resumed['top1']})")


# --------------------------------------------------------------------------- no cluster needed
def test_executor_and_job_sizes_name_what_is_wrong(monkeypatch, capsys):
    monkeypatch.setenv("SPVR_EXECUTOR", "fast")
    with pytest.raises(ValueError, match=r"SPVR_EXECUTOR='fast': expected one of \['local', 'slurm'\]"):
        jobs.executor()
    monkeypatch.delenv("SPVR_EXECUTOR")
    with pytest.raises(ValueError, match=r"--slurm-cpus='two' \(SPVR_SLURM_CPUS\): expected CPUs per job"):
        slurm.settings({"SPVR_SLURM_CPUS": "two"})
    with pytest.raises(ValueError, match=r"--slurm-gpus=-1 \(SPVR_SLURM_GPUS\): expected GPUs per job, an int >= 0"):
        slurm.SlurmSettings(gpus=-1)
    assert slurm.settings({"SPVR_SLURM_TIME": "90", "SPVR_SLURM_GPUS": "1"}).sbatch() == \
        {"--time": 90, "--cpus-per-task": 1, "--gpus-per-node": 1}
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["--executor", "fast", "--plan"])
    assert exit_.value.code == 2 and "argument --executor: invalid choice: 'fast'" in capsys.readouterr().err
    assert reproduce.main(["--slurm-gpus", "1", "--plan"]) == 2
    assert "--slurm-gpus given with --executor local" in capsys.readouterr().err
    assert reproduce.main(["--executor", "slurm", "--slurm-time", "0", "--plan"]) == 2
    assert "--slurm-time=0 (SPVR_SLURM_TIME): expected minutes, an int >= 1" in capsys.readouterr().err


def test_plan_says_how_many_jobs_of_what_size_without_submitting(monkeypatch, capsys):
    monkeypatch.setattr(slurm, "submit", lambda *a, **k: pytest.fail("--plan submitted a job"))
    assert reproduce.main(["--scale", "cpu", "--executor", "slurm", "--slurm-gpus", "1", "--slurm-time", "120",
                           "--slurm-partition", "gpu", "--plan"]) == 0
    out = capsys.readouterr().out
    total = int(plan.slurm_jobs(scales.get_scale("cpu"))["jobs"].sum())
    assert "Slurm jobs of scale 'cpu'" in out and f"Total: {total} jobs" in out
    assert "--partition=gpu --time=120 --cpus-per-task=1 --gpus-per-node=1" in out
    jobs_ = plan.slurm_jobs(scales.get_scale("cpu")).set_index(["notebook", "model"])["jobs"]
    cpu = scales.get_scale("cpu")
    setup = cpu.model("vgg16")
    # notebook 05: at 2 rates, an lr search per network and mode (5 + 6 trials), fine-tuned and from scratch at
    # every seed and each read on its budget; 09: every scaled d of Figure 2 at every seed, the best and the worst d
    # read on their budget
    n = len(cpu.seeds)
    assert jobs_["05", "vgg16"] == 2 * (len(setup.lr_grid) + len(setup.finetune_lr_grid) + 2 * n * 2)
    assert jobs_["09", "vgg16"] == 3 * n + 2 * n                 # d = 1, 2, 4 (the paper's 2 ... 32 at 1/8 width)
    assert jobs_["04", "vgg16"] > len(setup.compare_rates) * len(cpu.seeds)
    assert reproduce.main(["--scale", "cpu", "--plan"]) == 0
    assert "Slurm jobs" not in capsys.readouterr().out        # only with --executor slurm


def test_missing_reads_the_cache_without_computing(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    monkeypatch.setattr(store, "_used", {})
    monkeypatch.delenv("SPVR_FORBID_COMPUTE", raising=False)
    todo = [(SMOKE, "vgg16", 1), (SMOKE, "resnet34", 1)]
    assert jobs.missing(base_models._base_job, todo) == todo and not list((tmp_path / "runs").glob("*.json"))
    base_models.train_base(SMOKE, "vgg16", progress=False)
    used = store.records_used()
    assert jobs.missing(base_models._base_job, todo) == todo[1:]
    assert store.records_used() == used and "SPVR_FORBID_COMPUTE" not in os.environ


def test_slurm_without_its_commands_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    monkeypatch.setenv("SPVR_EXECUTOR", "slurm")
    monkeypatch.setattr(shutil, "which", lambda cmd: None)
    with pytest.raises(RuntimeError, match=r"sbatch, squeue, srun not on PATH"):
        jobs.fill_cache(base_models._base_job, [(SMOKE, "vgg16", 1)], jobs.worker_count(SMOKE))
    assert jobs.worker_count(SMOKE) > 1              # on Slurm every batch fans out, whatever the scale's workers


def test_a_quoted_models_spvr_trainings_fan_out_too(monkeypatch):
    """The paper's ImageNet ResNet50 (published weights, baselines quoted) trains SPvR's networks only: they are
    jobs like the others' (on Slurm, not in the submitting process), without an lr search or l1's network."""
    quoted = scales.ModelSetup("resnet50", "fashion-mnist", width=1 / 16, pretrained="weights", quote_baselines=True,
                               lr_grid=(0.01, 0.1), table3_rate=0.8)
    trained = scales.ModelSetup("vgg16_bn", "fashion-mnist", width=1 / 16, lr_grid=(0.01, 0.1), table3_rate=0.7)
    cfg = scales.Scale(name="smoke", models={"r50": quoted, "vgg": trained})
    batches: dict[str, list] = {}
    monkeypatch.setattr(jobs, "worker_count", lambda cfg: 2)
    monkeypatch.setattr(jobs, "fill_cache", lambda target, jobs_, workers, desc="", **kw:
                        batches.setdefault(desc, []).extend(j[1:] for j in jobs_) or [])
    monkeypatch.setattr(base_models, "prepare_bases", lambda cfg, keys, progress=True: batches.setdefault("bases", keys))
    monkeypatch.setattr(base_models, "spvr_ranking", lambda cfg, key, progress=True: None)
    runs = [("r50", 0.8, "spvr", 0), ("r50", 0.8, "l1", 0), ("vgg", 0.7, "l1", 0)]
    from spvr_lib.paper import trained_runs

    trained_runs.prepare_runs(cfg, runs, "finetune", progress=False)
    assert batches["bases"] == ["r50", "vgg"]
    assert batches["pruned networks"] == [("r50", "spvr", 0.8), ("vgg", "l1", 0.7)]      # no l1 of the quoted model
    assert batches["lr search (fine-tune)"] == [("vgg", 0.01), ("vgg", 0.1)]
    assert batches["finetune trainings"] == [("r50", "spvr", 0.8, 0, "finetune"), ("vgg", "l1", 0.7, 0, "finetune")]
