"""Provenance of every artifact under figures/<scale>/: the NotebookRun that writes tables and figures,
and :func:`stale_artifacts`, which tells which of them the current code would no longer produce."""
from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spvr_lib import fingerprint
from spvr_lib.paper.scales import SCALE_NAMES
from spvr_lib.store import (
    REPO_ROOT,
    CacheError,
    CodeTrace,
    atomic_write_bytes,
    atomic_write_json,
    _json_default,
    device_info,
    file_sha256,
    git_state,
    library_versions,
    read_record,
    records_used,
    stale_code,
)

# Harness modules whose values a notebook reads without running a function of theirs (the paper's numbers,
# the scales): their top-level values are always part of an artifact's code fingerprint.
_ALWAYS = ("spvr_lib.paper.reference", "spvr_lib.paper.scales")


def provenance(scale: str, params: Mapping[str, Any] | None = None, seeds: Any = None,
               wall_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance record written beside every artifact."""
    return {
        "git": git_state(), "scale": scale, "params": dict(params or {}), "seeds": seeds,
        "versions": library_versions(), "device": device_info(),
        "wall_s": None if wall_s is None else round(wall_s, 3),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }


def check_scale(scale: str) -> str:
    if scale not in SCALE_NAMES:
        raise ValueError(f"scale={scale!r} is not one of {SCALE_NAMES}")
    return scale


def output_dir(scale: str) -> Path:
    """``figures/<scale>/``: a run of one scale never writes into another scale's folder."""
    return REPO_ROOT / "figures" / check_scale(scale)


class NotebookRun:
    """Collects one notebook's outputs under ``figures/<scale>/`` with provenance.

    >>> run = NotebookRun("01_ranking_criterion", scale="smoke", params={"d": 4}, seeds=[0, 1])
    >>> run.table(df, "table5_kendall_tau")      # CSV + Markdown + provenance JSON
    >>> run.figure(fig, "table5_ranks")          # PNG + PDF + provenance JSON
    """

    def __init__(self, notebook: str, scale: str, params: Mapping[str, Any] | None = None,
                 seeds: Any = None) -> None:
        self.notebook, self.scale = notebook, check_scale(scale)
        self.params, self.seeds = dict(params or {}), seeds
        self.dir = output_dir(scale)
        self.t0 = time.perf_counter()
        self.git = git_state()          # the code the run started from, not what it is when a file is written
        # every spvr_lib function that runs from here on (and the code of every cached record reused)
        # enters the artifacts' code fingerprint; the trace stays open for the notebook's lifetime
        self.trace = CodeTrace()
        self.trace.start()

    def _provenance(self, files: list[Path], **extra: Any) -> dict[str, Any]:
        rec = provenance(self.scale, self.params, self.seeds, wall_s=time.perf_counter() - self.t0,
                         notebook=self.notebook, files={p.name: file_sha256(p) for p in files})
        rec["git"] = self.git
        always = {f"{mod}:{fingerprint.VALUES}": fingerprint.function_digest(f"{mod}:{fingerprint.VALUES}")
                  for mod in _ALWAYS}
        rec["code"] = dict(sorted({**self.trace.fingerprint(), **always}.items()))
        rec["notebook_sha256"] = notebook_sha256(self.notebook)
        rec["records"] = records_used()           # the cached computations behind it: computed here or found
        clash = {k: v for k, v in extra.items() if k in rec}     # never overwrite the standard fields
        rec.update({k: v for k, v in extra.items() if k not in rec})
        if clash:
            rec["extra"] = clash
        return rec

    def close(self) -> None:
        """Stop recording the code that runs (a notebook's run ends with its kernel; tests call this)."""
        self.trace.stop()

    def table(self, df: Any, name: str, floatfmt: str = ".4g", **extra: Any) -> Path:
        """Write ``df`` (a pandas DataFrame) as ``<name>.csv`` and ``<name>.md``; returns the CSV path."""
        csv = write_if_changed(self.dir / f"{name}.csv", df.to_csv(index=False).encode())
        md = write_if_changed(self.dir / f"{name}.md", (df.to_markdown(index=False, floatfmt=floatfmt) + "\n").encode())
        self._write_provenance(name, [csv, md], extra)
        return csv

    def figure(self, fig: Any, name: str, **extra: Any) -> Path:
        """Save a matplotlib figure as ``<name>.png`` and ``<name>.pdf``; returns the PNG path.  No date or
        software version in either file, so that the same figure is the same bytes."""
        paths = []
        for ext, kw in (("png", {"dpi": 150, "metadata": {"Software": None}}),
                        ("pdf", {"metadata": {"CreationDate": None, "Producer": None, "Creator": None}})):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, bbox_inches="tight", **kw)
            paths.append(write_if_changed(self.dir / f"{name}.{ext}", buf.getvalue()))
        self._write_provenance(name, paths, extra)
        return paths[0]

    def record(self, obj: Any, name: str, **extra: Any) -> Path:
        """Write a JSON result (e.g. a benchmark) as ``<name>.json`` with provenance."""
        path = write_if_changed(self.dir / f"{name}.json",
                                (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())
        self._write_provenance(name, [path], extra)
        return path

    def _write_provenance(self, name: str, files: list[Path], extra: Mapping[str, Any]) -> None:
        """``<name>.provenance.json``, rewritten only where more than the run's time, commit and place moved:
        a warm run that reproduces an artifact leaves both the artifact and its provenance as they were."""
        path = self.dir / f"{name}.provenance.json"
        new = self._provenance(files, **extra)
        lasting = _lasting(new)             # always run: the functions a notebook runs are part of its fingerprint
        try:
            old = _lasting(read_record(path))
        except (CacheError, FileNotFoundError):
            old = None
        if old != lasting:
            atomic_write_json(path, new)


# what a warm rerun changes in a provenance without changing the artifact: when and where it ran, and whether
# each record was computed by that run or found in the cache
_VOLATILE = ("wall_s", "written_at", "git", "device", "versions")


def _lasting(prov: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in prov.items() if k not in _VOLATILE}
    out["records"] = {h: {k: v for k, v in r.items() if k != "computed"} for h, r in (prov.get("records") or {}).items()}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def write_if_changed(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically unless the file already holds exactly these bytes."""
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    return atomic_write_bytes(path, data)


def notebook_sha256(notebook: str, notebooks_dir: Path | None = None) -> str | None:
    """sha256 of the code cells of ``notebooks/<notebook>.ipynb`` (outputs and injected parameters
    excluded: the notebook as committed), or None when there is no such file."""
    import hashlib

    path = (notebooks_dir or REPO_ROOT / "notebooks") / f"{notebook}.ipynb"
    if not path.exists():
        return None
    cells = json.loads(path.read_text())["cells"]
    code = "\n#-cell-\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"
                              and "injected-parameters" not in c.get("metadata", {}).get("tags", []))
    return hashlib.sha256(code.encode()).hexdigest()


def stale_artifacts(scale: str, figures_dir: Path | None = None,
                    notebooks_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every artifact under ``figures/<scale>/`` whose provenance no longer matches the current code.

    An artifact (``<stem>.provenance.json`` and its files) is stale when its provenance has no code
    fingerprint, when a source file of its fingerprint changed or vanished, when its notebook's code
    changed, when a file it lists is missing or differs from its recorded sha256, or when a table it read
    (``inputs`` in its provenance) changed or is stale itself.  Returns one
    ``{"artifact", "reasons"}`` per stale artifact (empty: everything is what the code computes).
    """
    folder = figures_dir or output_dir(scale)
    stale = []
    reads: dict[str, dict[str, str]] = {}          # artifact -> the tables it read (``inputs``)
    for prov_path in sorted(folder.glob("*.provenance.json")):
        stem = prov_path.name[: -len(".provenance.json")]
        reasons: list[str] = []
        try:
            prov = read_record(prov_path)
        except CacheError as err:
            stale.append({"artifact": stem, "reasons": [str(err)]})
            continue
        reads[stem] = prov.get("inputs") or {}
        changed = stale_code(prov.get("code"))
        if changed == ["<no code fingerprint>"]:
            reasons.append("no code fingerprint (written before fingerprints existed)")
        elif changed:
            reasons.append("code changed: " + ", ".join(changed))
        nb = prov.get("notebook")
        if nb and prov.get("notebook_sha256") != notebook_sha256(nb, notebooks_dir):
            reasons.append(f"notebook {nb} changed")
        for name, sha in (prov.get("files") or {}).items():
            f = folder / name
            if not f.exists():
                reasons.append(f"{name} missing")
            elif file_sha256(f) != sha:
                reasons.append(f"{name} differs from its recorded sha256")
        for name, sha in reads[stem].items():       # tables it read (notebook 13)
            f = folder / name
            if not f.exists():
                reasons.append(f"input {name} missing")
            elif file_sha256(f) != sha:
                reasons.append(f"input {name} changed")
        if reasons:
            stale.append({"artifact": stem, "reasons": reasons})
    # an artifact that read a stale one is stale too (its numbers come from outdated tables), transitively
    by_stem = {s["artifact"]: s for s in stale}
    changed = True
    while changed:
        changed = False
        for stem, inputs in reads.items():
            upstream = sorted(n for n in inputs if n.rsplit(".", 1)[0] in by_stem and n.rsplit(".", 1)[0] != stem)
            entry = by_stem.get(stem)
            note = "reads stale " + ", ".join(upstream)
            if upstream and (entry is None or note not in entry["reasons"]):
                entry = by_stem.setdefault(stem, {"artifact": stem, "reasons": []})
                entry["reasons"] = [r for r in entry["reasons"] if not r.startswith("reads stale ")] + [note]
                changed = True
    return sorted(by_stem.values(), key=lambda s: s["artifact"])
