"""Move the run cache and the artifacts' provenance to the narrower function digests (issue 31).

The first function fingerprints counted, for every name a function mentions, the value any imported code-root
module holds under that name: importing ``diagnostics`` into a module whose functions annotate with ``Any`` changed
the digest of every function there, though no line that ran had changed.  The digests now count bare names and
``alias.attr`` pairs only, annotations left out (``spvr_lib.fingerprint._names_read``).

Both rules are functions of today's sources, so a record that is current under the first is current under the
second: its digests are recomputed under the second for the same function ids (where a function moved, in the
module that defines it now) and written in place, its content untouched.  A record stale under both is left as it
is and named.  Outside spvr_lib on purpose: its own functions are not part of any fingerprint.

    python tools/refingerprint.py [paths ...]     # default: data/runs/*.json and figures/*/*.provenance.json
"""
from __future__ import annotations

import ast
import contextlib
import json
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spvr_lib import fingerprint as fp, store  # noqa: E402

_NEW = (fp._names_read, fp._global_tokens)


def _old_names_read(node: ast.AST) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            names.add(sub.attr)
    return names


def _old_global_tokens(mod: str, names: set[str], own_only: bool = False) -> list[str]:
    g = fp._module_globals(mod)
    out = []
    if own_only:
        return [f"{name}={fp._read_value(g[name])}" for name in sorted(names) if name in g]
    modules = {k: v for k, v in g.items() if isinstance(v, types.ModuleType) and getattr(v, "__file__", None)
               and fp._in_roots(str(Path(v.__file__).resolve())) and str(Path(v.__file__).resolve()) not in fp.UNTRACED}
    for name in sorted(names):
        if name in g and not isinstance(g[name], types.ModuleType):
            out.append(f"{name}={fp._read_value(g[name])}")
        for alias, module in sorted(modules.items()):
            if name in vars(module) and not isinstance(vars(module)[name], types.ModuleType):
                out.append(f"{alias}.{name}={fp._read_value(vars(module)[name])}")
    return out


@contextlib.contextmanager
def rule(old: bool):
    fp._names_read, fp._global_tokens = (_old_names_read, _old_global_tokens) if old else _NEW
    fp._DIGESTS.clear()
    try:
        yield
    finally:
        fp._names_read, fp._global_tokens = _NEW
        fp._DIGESTS.clear()


def where(fid: str, digest: str) -> str | None:
    """The module whose ``fid`` has ``digest`` under the current rule (its own, or the one it moved to)."""
    mod, _, qual = fid.partition(":")
    if fp.function_digest(fid) == digest:
        return mod
    return next((m for m in fp._modules_defining(qual) if fp.function_digest(fid, module=m) == digest), None)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    paths = [Path(a) for a in args] or sorted((REPO / "data" / "runs").glob("*.json")) + \
        sorted((REPO / "figures").glob("*/*.provenance.json"))
    counts = {"current": 0, "moved": 0, "stale": 0, "skipped": 0}
    for path in paths:
        rec = json.loads(path.read_text())
        code = rec.get("code")
        if not isinstance(code, dict) or not code or fp.is_file_fingerprint(code):
            counts["skipped"] += 1
            continue
        if not fp.changed_functions(code):
            counts["current"] += 1
            continue
        with rule(old=True):
            modules = {fid: where(fid, d) for fid, d in code.items()}
        if any(m is None for m in modules.values()):
            counts["stale"] += 1
            print(f"stale under both rules: {path.relative_to(REPO)} "
                  f"({', '.join(f for f, m in modules.items() if m is None)[:160]})")
            continue
        new = {fid: fp.function_digest(fid, module=modules[fid]) for fid in code}
        rec["code"] = new
        if path.name.endswith(".provenance.json"):
            store.atomic_write_json(path, rec)
        else:
            store.write_record(path, rec)
        counts["moved"] += 1
    print(counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
