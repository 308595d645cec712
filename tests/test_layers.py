"""The house: the method (spvr_lib) never depends on the paper harness (spvr_lib/paper), the public API
imports, and each mechanism exists once."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import spvr_lib

PKG = Path(spvr_lib.__file__).resolve().parent
LAUNCHERS = {"reproduce.py", "bench.py"}       # `python -m spvr_lib.reproduce|bench`: run the harness's CLI


def _method_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "paper" not in p.relative_to(PKG).parts)


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (function bodies included)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = ".".join(rel.parts[:-1] if rel.name != "__init__" else rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_public_api_imports():
    from spvr_lib import PruneResult, count_params, group_importance, inherit_weights, kl_loss, spvr_loss, spvr_prune
    assert callable(spvr_prune) and callable(group_importance) and callable(inherit_weights)
    assert PruneResult.__name__ == "PruneResult" and spvr_loss.__module__ == "spvr_lib.criteria"
    assert kl_loss.__module__ == "spvr_lib.criteria" and count_params.__module__ == "spvr_lib.models.sizes"
    assert all(hasattr(spvr_lib, name) for name in spvr_lib.__all__)


def test_no_method_module_imports_the_paper_harness():
    offenders = {}
    for path in _method_modules():
        if path.name in LAUNCHERS and path.parent == PKG:
            continue
        bad = sorted(m for m in _imported_modules(path) if m == "spvr_lib.paper" or m.startswith("spvr_lib.paper."))
        if bad or re.search(r"spvr_lib\.paper", "\n".join(l for l in path.read_text().splitlines()
                                                           if "import" in l and not l.lstrip().startswith("#"))):
            offenders[str(path.relative_to(PKG))] = bad
    assert not offenders, offenders


def test_importing_the_method_never_loads_the_harness():
    code = ("import sys, spvr_lib, spvr_lib.data, spvr_lib.train, spvr_lib.baselines, spvr_lib.latency, "
            "spvr_lib.__main__, spvr_lib.store, spvr_lib.tasks, spvr_lib.budget, spvr_lib.devices; "
            "print(sorted(m for m in sys.modules if m.startswith('spvr_lib.paper')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _top_level_defs(pattern: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in PKG.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for n in names:
                if re.fullmatch(pattern, n):
                    found.setdefault(n, []).append(str(path.relative_to(PKG)))
    return found


def test_each_mechanism_exists_once():
    once = {"fit": "train.py", "evaluate": "train.py", "train_run": "train.py", "resolve_device": "devices.py",
            "reinitialize": "models/networks.py", "save_network": "models/files.py", "load_network": "models/files.py",
            "cached": "store.py", "count_params": "models/sizes.py", "record_activations": "grouping.py",
            "SCALE_NAMES": "paper/scales.py", "measure_latency": "latency.py"}
    for name, where in once.items():
        assert _top_level_defs(re.escape(name)).get(name) == [where], (name, _top_level_defs(re.escape(name)))
    # no second loop: optimizers are built in train.py only; no other module defines a fit-like loop
    optimizers = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if re.search(r"torch\.optim\.(SGD|Adam)\(", p.read_text())]
    assert optimizers == ["train.py"], optimizers
    assert not {n for n in _top_level_defs(r"(fit|train)_\w+|_train_\w+|\w+_fit") if n not in ("train_run", "train_mlp", "train_base", "train_segnet", "train_pruned",
                                                                        "train_images", "_train_images",
                                                                        # a count: no loop
                                                                        "train_images_of")}
    # a name "METHODS" no longer means three things
    assert "METHODS" not in _top_level_defs(r"METHODS")


def test_every_number_quoted_from_the_paper_lives_in_reference():
    quoted = _top_level_defs(r"(PAPER_\w+|\w+_PAPER(_\w+)?)")
    assert quoted and all(where == ["paper/reference.py"] for where in quoted.values()), quoted


def test_command_lines_run_as_modules():
    """Every ``python -m`` entry point the Makefile and README use starts (a package needs its __main__)."""
    for module, args, expect in (("spvr_lib.data", ["ensure", "fashion-mnist"], "fashion-mnist: "),
                                 ("spvr_lib.reproduce", ["--help"], "--check"),
                                 ("spvr_lib.bench", ["--help"], "ranking"),
                                 ("spvr_lib", ["prune", "--help"], "--keep"),
                                 ("spvr_lib", ["train", "--help"], "--preset")):
        out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
        assert out.returncode == 0 and expect in out.stdout, (module, out.stderr[-500:])
