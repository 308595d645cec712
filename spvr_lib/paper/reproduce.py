"""Run the numbered notebooks with papermill: ``python -m spvr_lib.reproduce --scale cpu``.

Each notebook runs in its own process (``papermill``, kernel ``python3`` of this environment,
cwd ``notebooks/``, output logged) under a wall-clock limit; the executed copy goes to
``build/executed/<scale>/``.  The run stops at the first failure with a non-zero exit status
and names the failing cell.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from spvr_lib.paper.provenance import NotebookRun, check_scale, output_dir, stale_artifacts
from spvr_lib import baselines, data, store
from spvr_lib.paper import plan, slurm
from spvr_lib.paper.jobs import EXECUTORS
from spvr_lib.paper.scales import get_scale
from spvr_lib.store import REPO_ROOT, atomic_write_text

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


@dataclass
class NotebookFailure(Exception):
    notebook: str
    reason: str

    def __str__(self) -> str:
        return f"{self.notebook}: {self.reason}"


def find_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR, only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order; ``only`` keeps those whose number or
    name is listed (``["01", "03"]`` or ``["01_ranking_criterion"]``)."""
    found = sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = set(only)
        keep = [p for p in found if p.stem[:2] in wanted or p.stem in wanted]
        missing = wanted - {p.stem[:2] for p in keep} - {p.stem for p in keep}
        if missing:
            raise ValueError(f"--only {sorted(missing)} matches no notebook in {notebooks_dir}; "
                             f"expected numbers among {[p.stem[:2] for p in found]}")
        found = keep
    if not found:
        raise ValueError(f"no numbered notebooks (NN_*.ipynb) in {notebooks_dir}")
    return found


def failing_cell(executed: Path) -> str:
    """Describe the first cell of an executed notebook whose outputs hold an error."""
    try:
        nb = json.loads(executed.read_text())
    except (OSError, json.JSONDecodeError):
        return "(executed notebook not readable)"
    code_idx = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code" or "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            continue   # count code cells as they stand in the source notebook
        code_idx += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                src = "".join(cell.get("source", "")).strip().splitlines()
                first = src[0] if src else ""
                return f"code cell {code_idx} ({first!r}) raised {out.get('ename')}: {out.get('evalue')}"
    return "(no cell error recorded; see the log above)"


def run_notebook(nb: Path, scale: str, out_dir: Path, timeout_s: float, parameters: dict | None = None,
                 env_extra: Mapping[str, str] | None = None) -> float:
    """Execute one notebook with papermill in a child process (``env_extra`` added to its environment: the
    executor of its trainings, ``paper.jobs``); returns the wall time in seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / nb.name
    params = {"SCALE": scale, **(parameters or {})}
    cmd = [sys.executable, "-m", "papermill", str(nb), str(out), "-k", "python3", "--cwd", str(nb.parent),
           "--log-output", "--no-progress-bar"]
    for k, v in params.items():
        cmd += ["-p", k, str(v)]
    env = {**os.environ, **(env_extra or {})}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # the kernel imports THIS checkout's spvr_lib, even where the venv's editable install points at another one
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise NotebookFailure(nb.name, f"exceeded its wall-clock limit of {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise NotebookFailure(nb.name, failing_cell(out))
    return time.perf_counter() - t0


# docs/results.md is generated from these artifacts (never typed by hand):
# (notebook number, table stem under figures/<scale>/, title, figure stem shown below it or None).
README_RESULTS = [
    ("13", "claims", "What reproduced and what did not: each claim of the paper, its number beside ours", None),
    ("01", "worked_example", "Section 3.1.1: the worked example", None),
    ("01", "table5_kendall_tau", "Table 5: Kendall tau of the neuron rankings against the ground truth (Guyon data)",
     "table5_ranks"),
    ("01", "table5_sensitivity", "Table 5: sensitivity to the choices the paper leaves unstated", None),
    ("02", "grouping_passes", "Section 3.2: forward passes needed per group size", "grouping_heatmap"),
    ("03", "base_models", "Table 1 base rows: the pre-trained networks", None),
    ("03", "base_models_convergence", "Table 1 base rows: have they converged on their budget?", None),
    ("08", "architectures", "Tables 6-8: the architectures SPvR recommends", None),
    ("08", "ranking_speed", "Ranking speed: naive (one pass per group) against fast", None),
    ("04", "table1_accuracy", "Table 1: SPvR against nine baselines at equal parameter budgets",
     "table1_accuracy_vs_removed"),
    ("04", "table1_baselines_sensitivity", "Table 1's baselines: Torch-Pruning's criteria against the original "
     "authors' variants (does the choice move a verdict?)", None),
    ("05", "table2_finetune_vs_scratch", "Table 2: fine-tuning against training from scratch", None),
    ("06", "table3_architecture", "Table 3: every method's architecture trained from scratch", None),
    ("07", "figure1_latency_claims", "Figure 1: inference latency (the claims; all timings in figure1_latency.csv)",
     "figure1_latency"),
    ("09", "figure2_group_size", "Figure 2: group-size ablation", "figure2_group_size"),
    ("10", "table4_mobilenet", "Table 4: pruned ResNet50 against MobileNetV3", None),
    ("10", "table4_convergence", "Table 4: has each network converged on its budget?", None),
    ("11", "segmentation", "Section 5.5: segmentation", None),
    ("11", "segmentation_convergence", "Section 5.5: has the unpruned SegNet converged on its budget?", None),
    ("12", "own_model_summary", "Prune your own model: a torchvision network, parameters against the budget and "
     "latency", "own_model_widths"),
    ("14", "vit_fashion_mnist", "A small ViT on Fashion-MNIST: SPvR against Torch-Pruning's head and neuron pruning at "
     "equal budgets", "vit_accuracy_vs_params"),
]
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
GLANCE_START, GLANCE_END = "<!-- glance:start -->", "<!-- glance:end -->"


def results_markdown(scale: str) -> str:
    """docs/results.md's generated section for ``scale``, built from the committed tables and their provenance."""
    out_dir = REPO_ROOT / "figures" / scale
    parts = [f"Generated by `python -m spvr_lib.reproduce --readme --scale {scale}` from `figures/{scale}/`; "
             "each table's provenance (commit, parameters, seeds, versions, device, wall time) is the "
             "`.provenance.json` beside it.\n"]
    parts.append(run_cost_markdown(scale))
    for nb, stem, title, figure in README_RESULTS:
        md = out_dir / f"{stem}.md"
        prov = out_dir / f"{stem}.provenance.json"
        cmd = f"`make reproduce SCALE={scale} ONLY={nb}`"
        if not md.exists():
            parts.append(f"#### {title}\n\n*Not yet produced at the {scale} scale* (notebook {nb}; {cmd}).\n")
            continue
        meta = json.loads(prov.read_text()) if prov.exists() else {}
        commit = (meta.get("git") or {}).get("commit") or "?"
        dev = meta.get("device") if isinstance(meta.get("device"), dict) else {}
        where = f"{dev.get('cuda_device') or dev.get('machine', '?')}, torch threads: {dev.get('torch_threads', meta.get('threads', '?'))}"
        parts.append(f"#### {title}\n\nNotebook {nb} ({cmd}); commit `{commit[:10]}`, {where}, "
                     f"wall time of the notebook up to this table {meta.get('wall_s', '?')} s "
                     f"(runs found in the cache are not recomputed).\n\n{md.read_text()}")
        if figure and (out_dir / f"{figure}.png").exists():
            parts.append(f"![{title}](../figures/{scale}/{figure}.png)\n")
    return "\n".join(parts)


def claims_at_a_glance(scale: str) -> str:
    """The results at a glance: one line per claim of notebook 13's ``claims.csv`` (its verdict and what the paper
    says), the only sentences about the claims the README holds."""
    path = REPO_ROOT / "figures" / scale / "claims.csv"
    if not path.exists():
        return f"*Notebook 13's claims table is not yet produced at the {scale} scale.*\n"
    df = pd.read_csv(path)
    return "\n".join(f"- **{r['verdict']}**: {r['claim']}, {r['paper says']}." for _, r in df.iterrows()) + "\n"


def run_cost_markdown(scale: str) -> str:
    """What the scale's figures cost, from figures/<scale>/reproduce_run.json: the cold-run cost (``compute_s``,
    every record the figures use, computed or found in the cache) and each notebook's, as Markdown."""
    path = REPO_ROOT / "figures" / scale / "reproduce_run.json"
    if not path.exists():
        return f"*No run account yet* (`figures/{scale}/reproduce_run.json`; `make reproduce SCALE={scale}`).\n"
    acc = json.loads(path.read_text())
    rows = [{"notebook": n["notebook"], "records computed": n["computed"], "records found in the cache": n["cached"],
             "wall s (this run)": n["wall_s"], "compute s (cold run)": n.get("compute_s")}
            for n in acc.get("notebooks", [])]
    return (f"**What these figures cost.** A cold run of the {scale} scale costs {acc['compute_s']:,.0f} seconds of "
            f"one machine ({acc['compute_s'] / 3600:.1f} h; `compute_s` of `figures/{scale}/reproduce_run.json`, "
            f"the sum over every record the figures use of its compute time on this kind of machine, whether "
            f"computed in the run or found in the cache); the run that wrote them (commit "
            f"`{str(acc.get('commit') or '?')[:10]}`, {'cold' if acc.get('cold') else 'resumed from the run cache'}) "
            f"took {acc['total_s']:,.0f} s of wall time. Per notebook, the compute of the records it reads (a record "
            f"read by several notebooks counts in each, once in the total):\n\n"
            + pd.DataFrame(rows).to_markdown(index=False) + "\n")


BASELINES_START, BASELINES_END = "<!-- baselines:start -->", "<!-- baselines:end -->"
PLAN_START, PLAN_END = "<!-- plan:start -->", "<!-- plan:end -->"


def plan_section(scale: str = "paper") -> str:
    """docs/paper-scale.md's plan, from figures/<scale>/<scale>_plan.md and its provenance."""
    md = REPO_ROOT / "figures" / scale / f"{scale}_plan.md"
    if not md.exists():
        return (f"*Not yet written* (`python -m spvr_lib.reproduce --scale {scale} --plan --write`).\n")
    meta = json.loads((md.with_name(f"{scale}_plan.provenance.json")).read_text())
    commit = (meta.get("git") or {}).get("commit") or "?"
    return (f"Generated by `python -m spvr_lib.reproduce --scale {scale} --plan --write` at commit `{commit[:10]}` "
            f"(figures/{scale}/{scale}_plan.csv). GPU-hours assume a sustained "
            f"{meta['params']['assumed_mac_per_s'] / 1e12:.0f} TMAC/s (not measured; a lower bound).\n\n"
            + md.read_text())


def baselines_markdown() -> str:
    """docs/baselines.md's method table (``baselines.method_table``, as in notebook 04)."""
    return pd.DataFrame(baselines.method_table()).to_markdown(index=False) + "\n"


def _replace_between(text: str, start: str, end: str, body: str, where: Path) -> str:
    if start not in text or end not in text:
        raise ValueError(f"{where} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


DOCS = ("README.md", "docs/results.md", "docs/baselines.md", "docs/paper-scale.md")   # the files with generated parts


def _generated(text: str, scale: str, where: Path) -> str:
    """``text`` with every generated part it has markers for filled in: the results section, the claims at a
    glance, the baselines' method table, the paper scale's plan."""
    for start, end, body in ((README_START, README_END, lambda: results_markdown(scale)),
                             (GLANCE_START, GLANCE_END, lambda: claims_at_a_glance(scale)),
                             (BASELINES_START, BASELINES_END, baselines_markdown),
                             (PLAN_START, PLAN_END, plan_section)):
        if start in text:
            text = _replace_between(text, start, end, body(), where)
    return text


def update_readme(scale: str, readme: Path | None = None) -> bool:
    """Fill the generated parts of the README and of docs/ (:data:`DOCS`; ``readme``: that one file only) with
    what the committed artifacts and the code say; returns whether anything changed."""
    paths = [readme] if readme is not None else [REPO_ROOT / p for p in DOCS if (REPO_ROOT / p).exists()]
    changed = False
    for path in paths:
        text = path.read_text()
        new = _generated(text, scale, path)
        if new != text:
            atomic_write_text(path, new)
            changed = True
    return changed


# --------------------------------------------------------------------------- the run cache, committed
# A regeneration spread over several sessions on machines that start from a fresh clone keeps its progress only
# in git.  The committed cache of a scale is what its run account (figures/<scale>/reproduce_run.json) lists: the
# records its artifacts use and the files a later computation reads (cache_files), nothing else: no resume
# checkpoints, no weights read only for their scores, no other scale's records.
_HASH = re.compile(r"\b[0-9a-f]{16}\b")


def cache_files(records: Mapping[str, Mapping[str, Any]], cache: Path | None = None) -> dict[str, list[str]]:
    """The files of the run cache (paths relative to ``data/``) behind ``records`` ({hash: {"kind", ...}}, the
    records a scale's artifacts use): ``records``, each ``runs/<kind>-<hash>.json``; ``weights``, the files a
    later computation reads: the weights (and ``models.save_network`` description) of every record whose hash
    another of these records' key holds (the trained bases that rankings, pruning and fine-tuning start from),
    and the description of every pruned baseline (its architecture and the digest of its weights, which are
    pruned again only when a computation needs them: ``pruned_networks.pruned_network``)."""
    runs = cache or store.cache_dir()
    root = runs.parent
    names = {h: f"{r['kind']}-{h}.json" for h, r in records.items()}
    loaded = {h: store.read_record(runs / n) for h, n in names.items() if (runs / n).exists()}
    referenced = set()
    for rec in loaded.values():
        referenced |= set(_HASH.findall(json.dumps(rec.get("key"), sort_keys=True))) - {rec.get("hash")}
    weights: set[str] = set()
    for h, rec in loaded.items():
        w = rec.get("weights")
        if h in referenced and isinstance(w, str):
            path = Path(w) if Path(w).is_absolute() else store.REPO_ROOT / w
            for f in (path, path.with_name(path.name + ".json")):
                if f.exists():
                    weights.add(str(f.resolve().relative_to(root.resolve())))
        if records[h].get("kind") == "baseline" and rec.get("status") == "ok" and rec.get("weights"):
            desc = root / "pruned" / f"{rec['weights']}.json"
            if desc.exists():
                weights.add(str(desc.relative_to(root)))
    return {"records": sorted(f"runs/{n}" for n in names.values()), "weights": sorted(weights)}


def pinned_files(scale: str = "cpu", cache: Path | None = None) -> list[Path]:
    """The files the scale's run account lists (:func:`cache_files`, kept in figures/<scale>/reproduce_run.json),
    as paths under ``data/``: what ``--pin`` stages and what git should hold under data/."""
    path = output_dir(scale) / "reproduce_run.json"
    if not path.exists():
        raise FileNotFoundError(f"{store.repo_relative(path)} does not exist: run `make reproduce SCALE={scale}` "
                                "first (the run account lists what the scale's figures use)")
    acc = json.loads(path.read_text())
    root = (cache or store.cache_dir()).parent
    return [root / f for f in (acc.get("cache") or {}).get("records", []) + (acc.get("cache") or {}).get("weights", [])]


def _run_account(scale: str) -> dict[str, Any]:
    path = output_dir(scale) / "reproduce_run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def stale_records(scale: str) -> list[tuple[str, list[str]]]:
    """(record, the functions that changed since it was computed) for every record of the scale's run account
    whose code changed (``store.stale_code``: a function it ran, a default or a module value it read); a listed
    record that is missing counts as stale too."""
    out = []
    runs = store.cache_dir()
    for rel in (_run_account(scale).get("cache") or {}).get("records", []):
        path = runs.parent / rel
        if not path.exists():
            out.append((rel, ["<record missing>"]))
            continue
        changed = store.stale_code(store.read_record(path).get("code"))
        if changed:
            out.append((rel, changed))
    return out


def pin_cache(scale: str = "cpu") -> int:
    """Stage exactly :func:`pinned_files` of ``scale`` under data/ for the next commit (``git add -f``) and take
    every other tracked file under data/ out of the index (it stays on disk); prints what it did.  Returns git's
    exit status."""
    data_dir = store.cache_dir().parent
    files = pinned_files(scale)
    missing = [f for f in files if not f.exists()]
    if missing:
        print(f"error: {len(missing)} files the run account lists are missing, e.g. {missing[0]}", file=sys.stderr)
        return 1
    keep = {str(f.resolve()) for f in files} | {str((data_dir / "README.md").resolve())}
    tracked = subprocess.run(["git", "ls-files", "-z", "--", str(data_dir)], cwd=REPO_ROOT, capture_output=True,
                             text=True).stdout.split("\0")
    drop = [t for t in tracked if t and str((REPO_ROOT / t).resolve()) not in keep]
    rc = 0
    for i in range(0, len(drop), 200):
        rc = rc or subprocess.run(["git", "rm", "-q", "--cached", "--", *drop[i:i + 200]], cwd=REPO_ROOT).returncode
    names = [str(f) for f in files]
    for i in range(0, len(names), 200):
        rc = rc or subprocess.run(["git", "add", "-f", "--", *names[i:i + 200]], cwd=REPO_ROOT).returncode
    size = sum(f.stat().st_size for f in files)
    print(f"staged {len(files)} cache files of the {scale} scale ({size / 2**20:.1f} MiB) under "
          f"{store.repo_relative(data_dir)}/; took {len(drop)} other files out of the index")
    return rc


def run_account(scale: str, walls: dict[str, float], total_s: float, cold: bool,
                figures: Path | None = None) -> dict[str, Any]:
    """What a ``make reproduce`` cost: per notebook its wall time (this run) and the cached computations behind
    its artifacts, computed in this run or found in the cache (from the artifacts' provenance), and
    ``compute_s``, the cost of a COLD run: the sum of the compute times of every record the scale's artifacts
    use, each once, whether computed now or in an earlier run (so it holds when a regeneration is spread
    over several runs)."""
    folder = figures or output_dir(scale)
    per_notebook: dict[str, dict[str, dict[str, Any]]] = {}
    for prov_path in folder.glob("*.provenance.json"):
        try:
            prov = json.loads(prov_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        per_notebook.setdefault(prov.get("notebook") or "?", {}).update(prov.get("records") or {})
    union: dict[str, float] = {}
    records: dict[str, dict[str, Any]] = {}
    rows = []
    for nb in sorted(set(per_notebook) | set(walls)):
        recs = per_notebook.get(nb, {})
        for h, r in recs.items():
            union[h] = float(r.get("compute_s") or 0.0)
            records[h] = r
        rows.append({"notebook": nb, "wall_s": round(walls[nb], 1) if nb in walls else None,
                     "computed": sum(1 for r in recs.values() if r.get("computed")),
                     "cached": sum(1 for r in recs.values() if not r.get("computed")),
                     "compute_s": round(sum(float(r.get("compute_s") or 0.0) for r in recs.values()), 1)})
    return {"commit": store.git_state().get("commit"), "scale": scale, "cold": cold, "total_s": round(total_s, 1),
            "compute_s": round(sum(union.values()), 1), "records": len(union), "notebooks": rows,
            "cache": cache_files(records)}


def write_run_account(scale: str, walls: dict[str, float], total_s: float, cold: bool) -> Path:
    """:func:`run_account` written atomically to figures/<scale>/reproduce_run.json."""
    return store.atomic_write_json(output_dir(scale) / "reproduce_run.json",
                                   run_account(scale, walls, total_s, cold))


_SLURM_DEFAULTS = {"partition": "the cluster's default", "mem": "the cluster's default", "logs": "build/slurm"}


def executor_choice(args: argparse.Namespace) -> tuple[str, slurm.SlurmSettings]:
    """The executor (``--executor``, else ``$SPVR_EXECUTOR``, else local) and the Slurm jobs' size (the
    ``--slurm-*`` options over ``$SPVR_SLURM_*``); ValueError naming the option when a value is not what is
    expected, or when a ``--slurm-*`` option is given without ``--executor slurm``."""
    executor = args.executor or os.environ.get("SPVR_EXECUTOR") or "local"
    if executor not in EXECUTORS:
        raise ValueError(f"SPVR_EXECUTOR={executor!r}: expected one of {list(EXECUTORS)} (or pass --executor)")
    given = {name: getattr(args, option[2:].replace("-", "_")) for name, option, _ in slurm.ENV.values()}
    given = {k: v for k, v in given.items() if v is not None}
    if given and executor != "slurm":
        options = [o for n, o, _ in slurm.ENV.values() if n in given]
        raise ValueError(f"{', '.join(options)} given with --executor {executor}: the --slurm-* options size the jobs "
                         "of --executor slurm")
    return executor, (dataclasses.replace(slurm.settings(), **given) if executor == "slurm" else slurm.SlurmSettings())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spvr_lib.reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="cpu", help="smoke | cpu | paper (default cpu)")
    ap.add_argument("--only", nargs="*", default=None, help="notebook numbers to run, e.g. --only 01 03")
    ap.add_argument("--timeout", type=float, default=None, help="wall-clock limit per notebook in seconds "
                    "(default: the scale's notebook_timeout_s)")
    ap.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="folder for executed copies (default build/executed/<scale>)")
    ap.add_argument("--readme", action="store_true", help="only regenerate the generated parts of README.md and docs/ from "
                    "figures/<scale>/ (no notebook runs)")
    ap.add_argument("--plan", action="store_true", help="only print what each notebook will compute at the scale "
                    "and its estimated GPU-hours (work counted exactly, throughput assumed; see spvr_lib.paper.plan)")
    ap.add_argument("--write", action="store_true", help="with --plan: also write figures/<scale>/<scale>_plan.csv/.md "
                    "with provenance and refresh the README's plan section")
    ap.add_argument("--check-data", action="store_true", help="only check that every dataset the scale reads is "
                    "in place (python -m spvr_lib.data check for each); exit 1 when one is missing")
    ap.add_argument("--pin", action="store_true", help="only stage the scale's run cache for a commit: exactly the "
                    "records and weights figures/<scale>/reproduce_run.json lists (git add -f), every other file "
                    "under data/ out of the index")
    ap.add_argument("--check", action="store_true", help="only list the artifacts under figures/<scale>/ whose "
                    "provenance no longer matches the current code; exit 1 when any is stale")
    ap.add_argument("--retime", action="store_true", help="time the networks afresh (notebooks 07, 10, 12) instead "
                    "of reading the latency records of this kind of machine")
    ap.add_argument("--executor", choices=EXECUTORS, default=None, help="where the independent trainings run: "
                    "local (processes on this machine, one per core; the default) or slurm (submitit job arrays "
                    "from this machine; the checkout and the run cache on a filesystem the nodes share)")
    for env, (name, option, expected) in slurm.ENV.items():
        ap.add_argument(option, type=int if name in ("time_min", "cpus", "gpus") else str, default=None,
                        metavar=env.removeprefix("SPVR_SLURM_"),
                        help=f"with --executor slurm: {expected} (default: ${env}, else "
                        f"{_SLURM_DEFAULTS.get(name, getattr(slurm.SlurmSettings(), name))})")
    args = ap.parse_args(argv)
    try:
        executor, slurm_cfg = executor_choice(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.pin:
        try:
            return pin_cache(check_scale(args.scale))
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.plan or args.check_data or args.check:
        try:
            scale = check_scale(args.scale)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.plan:
        print(plan.plan_markdown(get_scale(scale)))
        if executor == "slurm":
            print("\n" + plan.slurm_markdown(get_scale(scale), slurm_cfg))
        if args.write:
            run = NotebookRun("reproduce --plan", scale, params={"assumed_mac_per_s": plan.ASSUMED_MAC_PER_S})
            run.table(plan.plan(get_scale(scale)), f"{scale}_plan", floatfmt=".3g")
            run.close()
            update_readme("cpu")
        return 0
    if args.check_data:
        return 1 if data.check_datasets(get_scale(scale).datasets()) else 0
    if args.check:
        stale = stale_artifacts(scale)
        total = len(list(output_dir(scale).glob("*.provenance.json")))
        for item in stale:
            print(f"stale  {item['artifact']}: {'; '.join(item['reasons'])}")
        print(f"{len(stale)} of {total} artifacts under figures/{scale}/ are stale" if stale else
              f"all {total} artifacts under figures/{scale}/ match the current code")
        records = stale_records(scale)
        for name, changed in records:
            print(f"stale record  {name}: changed {', '.join(changed)}")
        n = len((_run_account(scale).get("cache") or {}).get("records", []))
        print(f"{len(records)} of the {n} records the run account lists were computed by other code" if records else
              f"all {n} records the run account lists match the current code")
        return 1 if stale or records else 0
    if args.readme:
        changed = update_readme(check_scale(args.scale))
        print("README.md and docs/ " + ("updated" if changed else "already up to date"))
        return 0
    try:
        scale = check_scale(args.scale)
        notebooks = find_notebooks(args.notebooks, args.only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    timeout = args.timeout or get_scale(scale).notebook_timeout_s
    if scale == "paper":                       # days of GPU time: fail now, not in notebook 04, if data is missing
        missing = data.check_datasets(get_scale(scale).datasets())
        if missing:
            print(f"error: the paper scale needs {', '.join(missing)} under data/ (docs/paper-scale.md)",
                  file=sys.stderr)
            return 1
    if executor == "slurm":
        try:
            slurm.check_client()
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    # the notebooks' processes read the executor from the environment (paper.jobs)
    env_extra = {"SPVR_EXECUTOR": executor, **(slurm_cfg.to_env() if executor == "slurm" else {}),
                 **({"SPVR_RETIME": "1"} if args.retime else {})}
    out_dir = args.out or REPO_ROOT / "build" / "executed" / scale
    total = time.perf_counter()
    cold = not any(store.cache_dir().glob("*.json"))
    walls: dict[str, float] = {}
    for i, nb in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {nb.name} at scale {scale} (limit {timeout:.0f} s"
              f"{'; trainings on Slurm: ' + slurm_cfg.describe() if executor == 'slurm' else ''})", flush=True)
        try:
            wall = run_notebook(nb, scale, out_dir, timeout, env_extra=env_extra)
        except NotebookFailure as e:
            print(f"FAILED {e}\nexecuted copy: {out_dir / nb.name}", file=sys.stderr, flush=True)
            write_run_account(scale, walls, time.perf_counter() - total, cold)
            return 1
        walls[nb.stem] = wall
        write_run_account(scale, walls, time.perf_counter() - total, cold)
        print(f"[{i}/{len(notebooks)}] {nb.name} done in {wall:.1f} s", flush=True)
    print(f"all {len(notebooks)} notebooks done in {time.perf_counter() - total:.1f} s; outputs in figures/{scale}/")
    if scale == "cpu" and args.notebooks == NOTEBOOKS_DIR:   # the README shows the committed cpu results
        update_readme(scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
