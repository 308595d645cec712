"""Run the numbered notebooks with papermill: ``python -m spvr_lib.reproduce --scale cpu``.

Each notebook runs in its own process (``papermill``, kernel ``python3`` of this environment,
cwd ``notebooks/``, output logged) under a wall-clock limit; the executed copy goes to
``build/executed/<scale>/``.  The run stops at the first failure with a non-zero exit status
and names the failing cell.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import get_scale
from .results import REPO_ROOT, check_scale

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


def run_notebook(nb: Path, scale: str, out_dir: Path, timeout_s: float, parameters: dict | None = None) -> float:
    """Execute one notebook with papermill in a child process; returns the wall time in seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / nb.name
    params = {"SCALE": scale, **(parameters or {})}
    cmd = [sys.executable, "-m", "papermill", str(nb), str(out), "-k", "python3", "--cwd", str(nb.parent),
           "--log-output", "--no-progress-bar"]
    for k, v in params.items():
        cmd += ["-p", k, str(v)]
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise NotebookFailure(nb.name, f"exceeded its wall-clock limit of {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise NotebookFailure(nb.name, failing_cell(out))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spvr_lib.reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="cpu", help="smoke | cpu | paper (default cpu)")
    ap.add_argument("--only", nargs="*", default=None, help="notebook numbers to run, e.g. --only 01 03")
    ap.add_argument("--timeout", type=float, default=None, help="wall-clock limit per notebook in seconds "
                    "(default: the scale's notebook_timeout_s)")
    ap.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="folder for executed copies (default build/executed/<scale>)")
    args = ap.parse_args(argv)
    try:
        scale = check_scale(args.scale)
        notebooks = find_notebooks(args.notebooks, args.only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    timeout = args.timeout or get_scale(scale).notebook_timeout_s
    out_dir = args.out or REPO_ROOT / "build" / "executed" / scale
    total = time.perf_counter()
    for i, nb in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {nb.name} at scale {scale} (limit {timeout:.0f} s)", flush=True)
        try:
            wall = run_notebook(nb, scale, out_dir, timeout)
        except NotebookFailure as e:
            print(f"FAILED {e}\nexecuted copy: {out_dir / nb.name}", file=sys.stderr, flush=True)
            return 1
        print(f"[{i}/{len(notebooks)}] {nb.name} done in {wall:.1f} s", flush=True)
    print(f"all {len(notebooks)} notebooks done in {time.perf_counter() - total:.1f} s; outputs in figures/{scale}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
