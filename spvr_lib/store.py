"""Results with provenance: atomic writes, tables, figures and the one run cache.

Every artifact under ``figures/<scale>/`` is written here, together with a
``<stem>.provenance.json`` that records the git commit (and whether the tree was
dirty), the scale, the parameters, the seeds, library versions, the device and the
wall time.  Writes go to a temporary file first and are then renamed, so an
interrupted run never leaves a half-written result.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(os.environ.get("SPVR_ROOT", Path(__file__).resolve().parents[1]))


# --------------------------------------------------------------------------- atomic I/O
def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file; load back with ``torch.load(path, weights_only=True)``."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------- hashing
def canonical_json(obj: Any) -> str:
    """Stable JSON text of ``obj`` (sorted keys, no whitespace): the input of ``run_hash``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def run_hash(obj: Any, n: int = 16) -> str:
    """Hex digest (first ``n`` chars of sha256) of everything that determines a run."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- provenance
def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit of ``root`` and whether its tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "torch-pruning", "numpy", "scipy", "scikit-learn", "pandas",
                 "matplotlib", "papermill"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(), "host": socket.gethostname(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info








# --------------------------------------------------------------------------- the run cache
def cache_dir() -> Path:
    return Path(os.environ.get("SPVR_CACHE", REPO_ROOT / "data" / "runs"))


def cached(key: Mapping[str, Any], compute: Callable[[], Mapping[str, Any]], kind: str = "run",
           refresh: bool = False) -> dict[str, Any]:
    """Return the record stored for ``key``, or run ``compute()`` and store its record.

    ``key`` holds everything that determines the result (spec, data, recipe, seed);
    its hash names ``data/runs/<kind>-<hash>.json``.  A finished run is never recomputed.
    A failure inside ``compute`` is stored too (``{"status": "failed", "error": ...}``) only
    when ``compute`` returns it so; exceptions propagate and nothing is written.
    """
    h = run_hash({"kind": kind, **key})
    path = cache_dir() / f"{kind}-{h}.json"
    if path.exists() and not refresh:
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    record = dict(compute())
    record.setdefault("wall_s", round(time.perf_counter() - t0, 3))
    record["key"] = dict(key)
    record["hash"] = h
    record.setdefault("provenance", {"git": git_state(), "versions": library_versions(),
                                     "device": device_info()})
    atomic_write_json(path, record)
    return json.loads(path.read_text())


def cache_path(key: Mapping[str, Any], kind: str = "run") -> Path:
    """Where ``cached`` keeps the record of ``key`` (for checkpoints beside it use ``.with_suffix``)."""
    return cache_dir() / f"{kind}-{run_hash({'kind': kind, **key})}.json"
