"""The house: the method (spvr_lib) never depends on the paper harness (spvr_lib/paper), the public API
imports, and each mechanism exists once, checked on what the code does: every optimizer step of every path that
trains is taken by the one training loop (``train.fit``), every parameter count written is ``count_params`` of
its network, and the numbers quoted from the paper are written only in ``paper/reference.py``."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset

import spvr_lib
from spvr_lib import __main__ as cli
from spvr_lib import models, train
from spvr_lib.paper import base_models, pruned_networks, scales, trained_runs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_worker  # noqa: E402

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


# --------------------------------------------------------------------------- one training loop
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class StepRecorder:
    """Every optimizer step taken while it is installed (torch's global step pre-hook: every optimizer class and
    instance, whoever built it), as (whether ``spvr_lib.train.fit`` is on the call stack, the innermost frame
    outside torch that took it: ``file:line function``)."""

    def __init__(self) -> None:
        self.steps: list[tuple[bool, str]] = []
        self._handle = None

    def _hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        frame, inside, where = sys._getframe(1), False, None
        while frame is not None:
            code = frame.f_code
            if where is None and not code.co_filename.startswith(_TORCH_DIR):
                where = f"{code.co_filename}:{frame.f_lineno} {code.co_name}"
            if code is train.fit.__code__:
                inside = True
                break
            frame = frame.f_back
        self.steps.append((inside, where or "?"))

    def outside(self) -> list[str]:
        """Where each step taken outside ``train.fit`` was taken."""
        return [where for inside, where in self.steps if not inside]

    def __enter__(self) -> "StepRecorder":
        self._handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def test_the_step_recorder_sees_a_step_taken_outside_the_loop():
    """The guard's own check: a hand-written training step is recorded as outside ``train.fit``, a step of
    ``train.fit`` as inside, and nothing is recorded once the recorder is gone."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with StepRecorder() as rec:
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
        data = TensorDataset(torch.randn(8, 3), torch.arange(8) % 2)
        train.fit(model, data, data, train.Recipe(epochs=1, batch_size=4, lr=0.1, augment=False), progress=False)
    assert [inside for inside, _ in rec.steps] == [False, True, True]
    assert rec.outside() == [rec.steps[0][1]] and "test_the_step_recorder_sees" in rec.steps[0][1]
    opt.step()
    assert len(rec.steps) == 3


def _fit_directly(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 4), torch.arange(12) % 3)
    spvr_lib.fit(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), data, data,
                 train.Recipe(epochs=2, batch_size=4, lr=0.1, augment=False), progress=False)


def _train_run(tmp_path, monkeypatch) -> None:
    ddp_worker.install(monkeypatch)                  # a 2-layer MLP on Gaussian blobs stands in for the real ones
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    spec = ddp_worker._preset("tiny", num_classes=3, in_channels=1)
    train.train_run(spec, "blobs", train.Recipe(epochs=2, batch_size=8, lr=0.1), 0, per_class_train=6,
                    per_class_test=3, progress=False, device="cpu")


def _cli_train(tmp_path, monkeypatch) -> None:
    ddp_worker.install(monkeypatch)
    assert cli.main(["train", "--preset", "tiny", "--dataset", "blobs", "--epochs", "2", "--batch-size", "8", "--lr",
                     "0.1", "--per-class-train", "6", "--per-class-test", "3", "--device", "cpu", "--out",
                     str(tmp_path), "--no-progress"]) == 0


def _table5_mlp(tmp_path, monkeypatch) -> None:
    from spvr_lib.paper import ranking_criterion       # Appendix A's MLP, Adam at a constant lr
    ranking_criterion.guyon_run(ranking_criterion.GuyonSetup(n_samples=60, n_features=8, hidden=4, epochs=2), 0)


@pytest.mark.parametrize("path", [_fit_directly, _train_run, _cli_train, _table5_mlp],
                         ids=["spvr_lib.fit", "train.train_run", "cli train", "table5 mlp"])
def test_every_optimizer_step_of_a_training_path_is_taken_by_the_one_loop(path, tmp_path, monkeypatch):
    """One training loop: each public path that trains a network (the method's and the harness's: see also
    :func:`test_every_optimizer_step_of_the_harness_is_taken_by_the_one_loop`) takes all its optimizer steps
    inside ``spvr_lib.train.fit``.  A second loop anywhere (a hand-written ``opt.step()``) fails this by naming
    the file and line of the step.  (``paper.bench`` and ``paper.gpu_check`` time a bare training step on
    purpose: they measure the step and train no network.)"""
    with StepRecorder() as rec:
        path(tmp_path, monkeypatch)
    assert rec.steps, "the path took no optimizer step: the recorder would see nothing"
    assert not rec.outside(), rec.outside()


# --------------------------------------------------------------------------- the harness at a tiny scale
TINY = scales.Scale(name="smoke", seeds=(0,), rcp_samples=1, models={
    "vgg16": scales.ModelSetup("vgg16_bn", "fashion-mnist", width=1 / 16, epochs=1, batch_size=32, lr=0.05,
                               lr_grid=(0.05, 0.1), group_size=2, rates=(0.7,), train_rates=(0.7,), calib_per_class=2,
                               train_subset=4, test_subset=2, augment=False, table3_rate=0.7)})
RATE = 0.7
# baselines whose networks the harness keeps: Torch-Pruning's and the authors' code (two ways to cut a network) and RCP
# (it trains its candidates: one of the training paths).  The other methods write their count by the same lines of
# pruned_networks.pruned_network and baselines.prune; test_tables_1_3 prunes with every one of them.
COUNTED_BASELINES = ("tp_l1", "l1", "rcp")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The harness run once at a tiny scale (VGG16-BN at 1/16 width, 4 Fashion-MNIST images per class, one
    epoch, a two-value lr grid so that the lr searches train), each training path under its own
    :class:`StepRecorder`; its records and networks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict = {"steps": {}}

    def run(name, fn):
        with StepRecorder() as rec:
            value = fn()
        out["steps"][name] = rec
        return value

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPVR_CACHE", str(tmp_path_factory.mktemp("cache") / "runs"))
        torch.manual_seed(0)
        out["base"] = run("base network and its lr search (base_models.train_base)",
                          lambda: base_models.train_base(TINY, "vgg16", progress=False))
        out["spvr trained"] = run("SPvR's network from scratch (trained_runs.trained_accuracy)",
                                  lambda: trained_runs.trained_accuracy(TINY, "vgg16", "spvr", RATE, 0, "scratch",
                                                                        progress=False))
        out["tp_l1 trained"] = run("a baseline fine-tuned, and the fine-tuning lr search",
                                   lambda: trained_runs.trained_accuracy(TINY, "vgg16", "tp_l1", RATE, 0, "finetune",
                                                                         progress=False))
        out["taylor"] = run("NVlabs Taylor pruned while fine-tuned (pruned_networks.taylor_iterative)",
                            lambda: trained_runs.trained_accuracy(TINY, "vgg16", "taylor", RATE, 0, "finetune",
                                                                  progress=False))
        out["networks"] = run("RCP's brief training of its candidates (pruned_networks.pruned_network)",
                              lambda: {m: pruned_networks.pruned_network(TINY, "vgg16", m, RATE, progress=False)
                                       for m in ("rcp", "spvr", *COUNTED_BASELINES)})
        out["base network"] = train.load_weights(out["base"])
        out["spvr pruned"] = base_models.spvr_pruned(TINY, "vgg16", RATE, progress=False)
        yield out
    torch.set_num_threads(threads)


def test_every_optimizer_step_of_the_harness_is_taken_by_the_one_loop(harness):
    """The harness's trainings (base networks, lr searches, pruned networks from scratch and fine-tuned, the
    authors' Taylor pruning while fine-tuning, RCP's candidate selection) step only inside ``train.fit``."""
    assert len(harness["steps"]) == 5
    for name, rec in harness["steps"].items():
        assert rec.steps, f"{name}: no optimizer step recorded"
        assert not rec.outside(), (name, rec.outside())


# --------------------------------------------------------------------------- one parameter counter
def test_every_parameter_count_the_harness_writes_is_count_params_of_its_network(harness):
    """One parameter counter: each count a record holds (the base run's, SPvR's pruning record, every
    method's network at the common budget, the trained comparison runs) is ``models.count_params`` of the
    network it describes, rebuilt from what the harness saved.  A second counter (buffers counted, a shared
    weight counted twice, a stale spec count) fails here."""
    base = harness["base"]
    before = models.count_params(harness["base network"])
    assert base["params"] == before == models.spec_params(base["spec"])
    rec = harness["spvr pruned"]
    assert rec["params_before"] == before
    assert rec["params_after"] == models.count_params(base_models.spvr_model(rec)) <= rec["budget"] < before
    networks = harness["networks"]
    assert set(networks) == {"spvr", *COUNTED_BASELINES}
    for method, (net, info) in networks.items():
        assert info["status"] == "ok", (method, info["error"])
        assert info["params_before"] == before, method
        assert info["params_after"] == models.count_params(net) < before, method
    for key, method in (("spvr trained", "spvr"), ("tp_l1 trained", "tp_l1")):
        run = harness[key]
        assert run["params_before"] == before and run["params"] == networks[method][1]["params_after"], key
    # the authors' Taylor counts its gated network on a meta-device copy (baselines' units): the same count
    assert harness["taylor"]["params_before"] == before


def test_the_method_writes_count_params_of_the_network_it_returns():
    """spvr_prune on both engines (a spvr_lib spec and any nn.Module): params_before, params_after and the
    pruned spec's count are ``count_params`` of the networks."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 1, 32, 32), torch.arange(20) % 10
    spec_net = models.build(models.vgg16_bn(num_classes=10, in_channels=1, width=1 / 16)).eval()
    any_net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    for net in (spec_net, any_net):
        res = spvr_lib.spvr_prune(net, (x, y), 0.5, group_size=2, progress=False)
        assert res.params_before == models.count_params(net)
        assert res.params_after == models.count_params(res.model) <= res.budget < res.params_before
        if net is spec_net:                         # the spec engine's count of the pruned spec, without building it
            assert models.spec_params(res.spec) == res.params_after


# --------------------------------------------------------------------------- numbers quoted from the paper
_NUMBER_IN_TEXT = re.compile(r"(?<![\d.])\d+\.\d+(?![\d.])")


def _significant_digits(x: float) -> int:
    mantissa = repr(abs(x)).split("e")[0]
    return len(mantissa.replace(".", "").strip("0"))


def _numbers(obj: object) -> set[float]:
    """Every int or float in a nested structure of dicts (keys too), lists, tuples and sets."""
    if isinstance(obj, bool):
        return set()
    if isinstance(obj, (int, float)):
        return {float(obj)}
    items = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else \
        list(obj) if isinstance(obj, (list, tuple, set, frozenset)) else []
    return set().union(*map(_numbers, items)) if items else set()


def quoted_numbers() -> set[float]:
    """The paper's numbers that are specific enough to recognise anywhere else: every value in
    ``paper/reference.py``'s tables that is not a whole number and has at least three significant digits
    (93.53, 0.861, 33.7, 5.56; not 0.7, 0.95, 1e-3, 0.29, 112).  Whole numbers and one- or two-digit
    values are rates, learning rates, widths and sizes a setup or a test sets for its own reasons; a
    three-digit decimal that equals a value the paper reports is a quotation."""
    from spvr_lib.paper import reference
    values = set().union(*(_numbers(v) for k, v in vars(reference).items() if not k.startswith("__")))
    return {v for v in values if v != int(v) and _significant_digits(v) >= 3}


def numbers_quoted_in(source: str, quoted: set[float]) -> list[tuple[int, str]]:
    """(line, literal) of every number of ``quoted`` that ``source`` (Python) writes: a float constant, or a
    number inside a string that is not a docstring (a label or table cell built from text).  Docstrings cite
    the paper in prose and are left alone."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant):
            continue
        if isinstance(node.value, float) and node.value in quoted:
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node.value, str) and id(node) not in docstrings:
            found += [(node.lineno, m) for m in _NUMBER_IN_TEXT.findall(node.value) if float(m) in quoted]
    return sorted(found)


def _code_cells(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def test_the_quotation_scan_finds_a_number_of_the_paper():
    """The scan's own check: a float the paper reports (Table 1's 93.53), as a constant or inside a label, is
    found; the same number in a docstring, and rates such as 0.7, are not."""
    quoted = quoted_numbers()
    assert {93.53, 0.861, 33.7, 51.2} <= quoted and not {0.7, 0.95, 0.001, 112.0} & quoted
    src = ('"""Table 1 prints 93.53."""\n'
           'def f():\n    """VGG16 at 70%: 93.53."""\n    return 93.53, 0.7, f"paper {94.25:.2f}", "paper: 33.7%"\n')
    assert numbers_quoted_in(src, quoted) == [(4, "33.7"), (4, "93.53"), (4, "94.25")]


def test_every_number_quoted_from_the_paper_lives_in_reference():
    """Numbers the paper reports are written once, in ``spvr_lib/paper/reference.py`` (see
    :func:`quoted_numbers` for the rule): no other module of spvr_lib and no notebook's code writes one;
    markdown cells and docstrings may cite them."""
    quoted = quoted_numbers()
    assert len(quoted) > 100                       # Tables 1-8, Table 5, Section 5.5: the scan has values to find
    offenders = {}
    for path in sorted(PKG.rglob("*.py")):
        if path != PKG / "paper" / "reference.py" and (hits := numbers_quoted_in(path.read_text(), quoted)):
            offenders[str(path.relative_to(PKG))] = hits
    for nb in sorted((PKG.parent / "notebooks").glob("*.ipynb")):
        if hits := numbers_quoted_in(_code_cells(nb), quoted):
            offenders[nb.name] = hits
    assert not offenders, offenders


def test_command_lines_run_as_modules(capsys):
    """Every ``python -m`` entry point the Makefile and README use starts (a package needs its __main__).
    ``python -m spvr_lib`` starts once (with ``prune``); its other command, ``train``, answers in this process
    (the same ``main``, without a second interpreter start)."""
    for module, args, expect in (("spvr_lib.data", ["ensure", "fashion-mnist"], "fashion-mnist: "),
                                 ("spvr_lib.reproduce", ["--help"], "--check"),
                                 ("spvr_lib.bench", ["--help"], "ranking"),
                                 ("spvr_lib", ["prune", "--help"], "--keep")):
        out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
        assert out.returncode == 0 and expect in out.stdout, (module, out.stderr[-500:])
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0 and "--preset" in capsys.readouterr().out
