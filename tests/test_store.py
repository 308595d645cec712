"""The run cache knows its code: records carry the fingerprint of the files whose functions ran, and a
record whose code changed is recomputed; unreadable files name themselves and what to do."""
import importlib
import json
import sys

import pytest
import torch

from spvr_lib import models, store


@pytest.fixture
def codebase(tmp_path, monkeypatch):
    """A code root of its own ("mycode/") holding two modules, and a cache folder."""
    root = tmp_path / "mycode"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "alpha.py").write_text("def value():\n    return 1\n")
    (root / "beta.py").write_text("def value():\n    return 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    store.CODE_ROOTS.append(root)           # the same list the tracer reads
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    for name in ("mycode", "mycode.alpha", "mycode.beta"):
        sys.modules.pop(name, None)
    yield root
    store.CODE_ROOTS.remove(root)
    for name in ("mycode", "mycode.alpha", "mycode.beta"):
        sys.modules.pop(name, None)


def _compute(calls):
    import mycode.alpha
    calls.append(1)
    return {"value": mycode.alpha.value()}


def test_record_carries_the_code_that_ran_and_is_recomputed_when_it_changes(codebase):
    calls = []
    rec = store.cached({"x": 1}, lambda: _compute(calls), kind="t")
    assert rec["value"] == 1 and calls == [1]
    # only the module whose function ran: alpha, not beta (nor any other file of the code root)
    assert list(rec["code"]) == ["mycode/alpha.py"]
    assert store.cached({"x": 1}, lambda: _compute(calls), kind="t")["value"] == 1 and calls == [1]   # reused

    (codebase / "beta.py").write_text("def value():\n    return 20\n")        # code that did not run
    assert store.cached({"x": 1}, lambda: _compute(calls), kind="t")["value"] == 1 and calls == [1]

    (codebase / "alpha.py").write_text("def value():\n    return 2\n")        # the code that ran
    sys.modules.pop("mycode.alpha", None)
    importlib.invalidate_caches()
    with pytest.warns(UserWarning, match=r"computed by other code \(changed: mycode/alpha.py\)"):
        rec2 = store.cached({"x": 1}, lambda: _compute(calls), kind="t")
    assert rec2["value"] == 2 and calls == [1, 1]


def test_an_outer_record_inherits_the_code_of_the_records_it_reuses(codebase):
    inner = lambda: store.cached({"inner": 1}, lambda: _compute([]), kind="t")   # noqa: E731
    inner()                                                                   # computed once, then reused
    outer = store.cached({"outer": 1}, lambda: {"v": inner()["value"]}, kind="t")
    assert "mycode/alpha.py" in outer["code"]                                  # though alpha did not run now


def test_record_without_fingerprint_is_recomputed(codebase):
    path = store.cache_path({"x": 2}, kind="t")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"value": "old", "key": {"x": 2}}))
    with pytest.warns(UserWarning, match="no code fingerprint"):
        assert store.cached({"x": 2}, lambda: {"value": "new"}, kind="t")["value"] == "new"


def test_unreadable_cache_file_names_the_file_and_what_to_do(codebase):
    path = store.cache_path({"x": 3}, kind="t")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"value": 1,')                                           # cut short
    with pytest.raises(store.CacheError, match=rf"{path.name}.*delete it and rerun"):
        store.cached({"x": 3}, lambda: {"value": 1}, kind="t")


def test_a_training_run_fingerprints_the_method_files_it_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    spec = {"arch": "mlp", "in_features": 4, "hidden": [3], "num_classes": 2}

    def compute():
        from spvr_lib import train
        torch.manual_seed(0)
        x, y = torch.randn(16, 4), torch.arange(16) % 2
        samples = torch.utils.data.TensorDataset(x, y)
        out = train.fit(models.build(spec), samples, samples, train.Recipe(epochs=1, batch_size=8, lr=0.1),
                        progress=False, device="cpu")
        return {"top1": out["top1"]}

    code = store.cached({"spec": spec}, compute, kind="t")["code"]
    assert {"spvr_lib/train.py", "spvr_lib/models.py", "spvr_lib/tasks.py", "spvr_lib/devices.py"} <= set(code)
    # nothing the run never touched: no dataset loaders, no ranking, no paper harness
    assert not [f for f in code if f.startswith(("spvr_lib/data/", "spvr_lib/paper/")) or f == "spvr_lib/ranking.py"]


def test_save_and_load_network_round_trip(tmp_path):
    spec = models.preset("resnet18", num_classes=10, in_channels=1, width=1 / 16)
    torch.manual_seed(0)
    net = models.build(spec).eval()
    path = models.save_network(net, tmp_path / "net.pt")
    assert set(torch.load(path, weights_only=True)) == set(net.state_dict())
    assert json.loads((tmp_path / "net.pt.json").read_text())["spec"] == spec
    again = models.load_network(path).eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(net(x), again(x)) and again.spec == spec
    (tmp_path / "net.pt.json").write_text("{")
    with pytest.raises(ValueError, match="net.pt.json.*not valid JSON"):
        models.load_network(path)
    with pytest.raises(FileNotFoundError, match="other.pt"):
        models.load_network(tmp_path / "other.pt")
