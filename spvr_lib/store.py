"""The one store of spvr_lib: atomic writes, the run cache that knows its code, and provenance.

* Writes go to a temporary file first and are then renamed, so an interrupted run never leaves a
  half-written result.
* :func:`cached` keeps one JSON record per computation under ``data/runs/<kind>-<hash>.json``; the
  hash is that of the computation's inputs (its key).  Like showyourwork's figures, a record also
  carries the fingerprint of the code that computed it: for every spvr_lib function that ran during the
  computation (traced, so the fingerprint is as narrow as the work actually done; the records it reused add
  theirs), a digest of what the function does (:mod:`spvr_lib.fingerprint`).  A record whose code has changed
  since is recomputed, never silently reused; edits to anything it did not run leave it valid.
* :func:`stale_code` names the functions of a fingerprint that changed; ``python -m spvr_lib.reproduce
  --check`` uses it on every artifact under ``figures/<scale>/`` and every record they use.
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
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spvr_lib import fingerprint

def _default_root() -> Path:
    """Where ``data/`` (the run cache, checkpoints, downloaded datasets) lives: the checkout holding this package
    (spvr_lib run from a clone), else, for an installed copy (``pip install .``, site-packages), the user's
    cache directory (``$XDG_CACHE_HOME/spvr_lib``, default ``~/.cache/spvr_lib``): never site-packages."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and not {"site-packages", "dist-packages"} & set(checkout.parts):
        return checkout
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spvr_lib"


# SPVR_ROOT overrides it; the run cache alone moves with SPVR_CACHE (cache_dir)
REPO_ROOT = Path(os.environ.get("SPVR_ROOT") or _default_root())


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


def record_text(obj: Mapping[str, Any]) -> str:
    """A record as JSON text: one top-level field per line, each value compact (sorted keys), so that records
    stay small in git (a training's per-epoch history on one line, not one number per line) and diffs show
    which field moved."""
    fields = [f"{json.dumps(str(k))}: {json.dumps(v, sort_keys=True, separators=(',', ':'), default=_json_default)}"
              for k, v in sorted(obj.items())]
    return "{\n" + ",\n".join(fields) + "\n}\n"


def write_record(path: str | Path, obj: Mapping[str, Any]) -> Path:
    """:func:`record_text` of ``obj`` written atomically to ``path``."""
    return atomic_write_text(path, record_text(obj))


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
def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository root when inside it (records stay valid in another clone), else
    absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(path)


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
    """The run cache's records: ``$SPVR_CACHE``, else ``data/runs`` under :data:`REPO_ROOT` (the checkout, or the
    user's cache directory for an installed copy); checkpoints and pruned networks sit beside it."""
    return Path(os.environ.get("SPVR_CACHE") or REPO_ROOT / "data" / "runs")


class CacheError(ValueError):
    """A cache or provenance file that cannot be read; the message names the file and what to do."""


def read_record(path: str | Path) -> dict[str, Any]:
    """The JSON record at ``path``; an unreadable file raises :class:`CacheError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"cache file {str(path)!r} cannot be read ({type(err).__name__}: {err}); delete it "
                         "and rerun: the computation it held is then done again") from err


# --------------------------------------------------------------------------- the code a computation runs
# function by function: spvr_lib.fingerprint (the tracer, the digests, the lookup of moved functions)
CodeTrace = fingerprint.CodeTrace
CODE_ROOTS = fingerprint.CODE_ROOTS
PACKAGE_ROOT = fingerprint.PACKAGE_ROOT


def source_files(obj: Any) -> set[str]:
    """The methods of ``obj``'s code-root classes (and of the objects it wraps, ``.dataset``): code that may
    run elsewhere (DataLoader workers) than the traced thread; :meth:`CodeTrace.add` takes them."""
    return fingerprint.source_functions(obj)


def stale_code(code: Mapping[str, str] | None) -> list[str]:
    """What changed since fingerprint ``code`` was taken: the functions whose code or read values changed or
    that are gone (``fingerprint.changed_functions``); ``["<no code fingerprint>"]`` when there is none; for a
    fingerprint of the earlier kind ({file: sha256}), the files that changed."""
    if code is None:
        return ["<no code fingerprint>"]
    if fingerprint.is_file_fingerprint(code):
        return [name for name, sha in code.items() if _source_sha(_code_path(name)) != sha]
    return fingerprint.changed_functions(code)


_HASHES: dict[tuple[str, int, int], str] = {}


def _source_sha(path: Path) -> str | None:
    """sha256 of a source file (memoised by path, size and mtime); None if it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def _code_path(name: str) -> Path:
    """The file on disk that a file fingerprint's ``name`` (``spvr_lib/train.py``) stands for."""
    first = Path(name).parts[0] if name else ""
    for root in CODE_ROOTS:
        if root.name == first:
            return root.parent / name
    return Path(name)


# who computes: this process's token, or, in a paper.jobs worker, the token of the process it works for (so a
# record a worker computed counts as computed by the notebook that asked for it)
PROCESS_TOKEN = os.urandom(8).hex()
_on_behalf_of: list[str] = []


def work_for(token: str) -> None:
    """Mark records computed from now on in this process as computed by the process whose
    :data:`PROCESS_TOKEN` is ``token`` (``paper.jobs`` workers call it at start)."""
    _on_behalf_of[:] = [token]


_used: dict[str, dict[str, Any]] = {}     # records used at top level by this process: hash -> kind, compute_s, computed
_depth = [0]                               # how many cached computations are open (nested ones are inside their parent)


def records_used() -> dict[str, dict[str, Any]]:
    """Every record this process used at top level (not inside another cached computation): {hash: {"kind",
    "compute_s" (its cost in machine-seconds, :func:`machine_seconds`, measured when it was computed), "computed" (in this
    process, or found in the cache)}}.  The cost of a cold run is the sum of compute_s over the union."""
    return {h: dict(v) for h, v in _used.items()}


def machine_seconds(record: Mapping[str, Any]) -> float | None:
    """What a record cost its machine: its wall time, plus the ``interrupted_s`` of earlier attempts it resumed
    from (:func:`cached`), times the share of the machine's cores it was given (``torch_threads / cpu_count``
    from its provenance, at most 1).  Two single-thread runs side by side on a 2-core machine each cost half
    their wall time; a record without provenance counts its whole wall time."""
    wall = record.get("wall_s")
    if wall is None:
        return None
    wall = float(wall) + float(record.get("interrupted_s") or 0.0)
    dev = (record.get("provenance") or {}).get("device") or {}
    threads, cores = dev.get("torch_threads"), dev.get("cpu_count")
    share = min(1.0, threads / cores) if threads and cores else 1.0
    return round(float(wall) * share, 3)


def _note_use(h: str, kind: str, record: Mapping[str, Any], computed: bool) -> None:
    computed = computed or record.get("computed_by") == PROCESS_TOKEN
    if _depth[0] == 0:
        entry = _used.setdefault(h, {"kind": kind, "compute_s": machine_seconds(record), "computed": computed})
        entry["computed"] = entry["computed"] or computed


# --------------------------------------------------------------------------- the time of unfinished attempts
ATTEMPT_BEAT_S = 30.0            # how often an attempt's elapsed time is written to its ledger
RESUMABLE_KINDS = {"train", "lrtrial"}   # kinds that resume an interrupted attempt (train.fit's checkpoint)


def attempt_ledger(kind: str, h: str) -> Path:
    """The ledger of the attempts at record ``<kind>-<h>``: ``data/runs/attempts/<kind>-<h>.json``, holding
    ``interrupted_s`` (the time of earlier attempts that ended unfinished) and ``current_s`` (the attempt
    under way, written every :data:`ATTEMPT_BEAT_S` seconds and when it ends unfinished)."""
    return cache_dir() / "attempts" / f"{kind}-{h}.json"


class _Heartbeat:
    """Writes an attempt's elapsed time to its ledger every ``ATTEMPT_BEAT_S`` s (a daemon thread), so that a
    run killed at a session's end leaves what it had cost; :meth:`stop` writes it a last time."""

    def __init__(self, path: Path, interrupted_s: float, kind: str, h: str) -> None:
        self.path, self.interrupted_s, self.kind, self.h = path, interrupted_s, kind, h
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat {kind}-{h}")
        self._thread.start()

    def beat(self) -> None:
        atomic_write_json(self.path, {"kind": self.kind, "hash": self.h, "interrupted_s": round(self.interrupted_s, 3),
                                      "current_s": round(time.perf_counter() - self.t0, 3)})

    def _run(self) -> None:
        while not self._stop.wait(ATTEMPT_BEAT_S):
            try:
                self.beat()
            except OSError:           # a full disk must not kill the computation it accounts for
                pass

    def stop(self, finished: bool) -> None:
        self._stop.set()
        self._thread.join()
        if finished:
            self.path.unlink(missing_ok=True)
        else:
            self.beat()


def _earlier_attempts_s(path: Path) -> float:
    """The time of the unfinished attempts a ledger records (0 when there is none or it cannot be read)."""
    try:
        ledger = json.loads(path.read_text())
        return float(ledger.get("interrupted_s", 0.0)) + float(ledger.get("current_s", 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def cached(key: Mapping[str, Any], compute: Callable[[], Mapping[str, Any]], kind: str = "run",
           refresh: bool = False) -> dict[str, Any]:
    """Return the record stored for ``key``, or run ``compute()`` and store its record.

    ``key`` holds everything that determines the result (spec, data, recipe, seed); its hash names
    ``data/runs/<kind>-<hash>.json``.  The record carries ``code``, the fingerprint of the spvr_lib
    files whose functions ran in ``compute`` (and in the cached computations it reused): a stored
    record is returned only while every one of those files is unchanged; otherwise it is computed
    again (with a warning naming the changed files).  ``refresh`` recomputes in any case.
    A failure inside ``compute`` is stored only when ``compute`` returns it as a record; exceptions
    propagate and nothing is written.  An unreadable record raises :class:`CacheError`.

    ``SPVR_FORBID_COMPUTE`` (kinds, comma-separated, or ``*``) makes computing a record of those kinds an error:
    a run that must only reuse the cache says so instead of training for hours.

    While ``compute`` runs, its elapsed time goes to :func:`attempt_ledger`; a kind of
    :data:`RESUMABLE_KINDS` (a training, which resumes from its checkpoint) records the time of the earlier,
    interrupted attempts as ``interrupted_s``, which :func:`machine_seconds` adds; any other kind starts again
    and its earlier attempts are not counted.
    """
    h = run_hash({"kind": kind, **key})
    path = cache_dir() / f"{kind}-{h}.json"
    if path.exists() and not refresh:
        record = read_record(path)
        changed = stale_code(record.get("code"))
        if not changed:
            CodeTrace.add(record["code"])
            _note_use(h, kind, record, computed=False)
            return record
        warnings.warn(f"cached {kind} record {path.name} was computed by other code (changed: "
                      f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); computing it again",
                      stacklevel=2)
    forbidden = {k.strip() for k in os.environ.get("SPVR_FORBID_COMPUTE", "").split(",") if k.strip()}
    if kind in forbidden or "*" in forbidden:
        raise CacheError(f"{kind} record {path.name} would be computed, but SPVR_FORBID_COMPUTE="
                         f"{os.environ['SPVR_FORBID_COMPUTE']!r} forbids computing {kind!r} records (a check that "
                         "a run only reuses the cache); unset it to compute")
    ledger = attempt_ledger(kind, h)
    earlier = _earlier_attempts_s(ledger) if kind in RESUMABLE_KINDS else 0.0
    heartbeat = _Heartbeat(ledger, earlier, kind, h)
    finished = False
    t0 = time.perf_counter()
    _depth[0] += 1
    try:
        with CodeTrace() as trace:
            record = dict(compute())
        finished = True
    finally:
        _depth[0] -= 1
        heartbeat.stop(finished)
    record.setdefault("wall_s", round(time.perf_counter() - t0, 3))
    if earlier > 0:
        record["interrupted_s"] = round(earlier, 3)
    record["key"] = dict(key)
    record["hash"] = h
    record["code"] = trace.fingerprint()
    record["computed_by"] = _on_behalf_of[0] if _on_behalf_of else PROCESS_TOKEN
    record.setdefault("provenance", {"git": git_state(), "versions": library_versions(),
                                     "device": device_info()})
    write_record(path, record)
    _note_use(h, kind, record, computed=True)
    return read_record(path)


def cache_path(key: Mapping[str, Any], kind: str = "run") -> Path:
    """Where ``cached`` keeps the record of ``key`` (for checkpoints beside it use ``.with_suffix``)."""
    return cache_dir() / f"{kind}-{run_hash({'kind': kind, **key})}.json"
