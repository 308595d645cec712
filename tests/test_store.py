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
    # only the function that ran: alpha's, not beta's (nor anything else of the code root)
    assert list(rec["code"]) == ["mycode.alpha:value"]
    assert store.cached({"x": 1}, lambda: _compute(calls), kind="t")["value"] == 1 and calls == [1]   # reused

    (codebase / "beta.py").write_text("def value():\n    return 20\n")        # code that did not run
    assert store.cached({"x": 1}, lambda: _compute(calls), kind="t")["value"] == 1 and calls == [1]

    (codebase / "alpha.py").write_text("def value():\n    return 2\n")        # the code that ran
    sys.modules.pop("mycode.alpha", None)
    importlib.invalidate_caches()
    from spvr_lib import fingerprint
    fingerprint.forget()
    with pytest.warns(UserWarning, match=r"computed by other code \(changed: mycode.alpha:value\)"):
        rec2 = store.cached({"x": 1}, lambda: _compute(calls), kind="t")
    assert rec2["value"] == 2 and calls == [1, 1]


def test_an_outer_record_inherits_the_code_of_the_records_it_reuses(codebase):
    inner = lambda: store.cached({"inner": 1}, lambda: _compute([]), kind="t")   # noqa: E731
    inner()                                                                   # computed once, then reused
    outer = store.cached({"outer": 1}, lambda: {"v": inner()["value"]}, kind="t")
    assert "mycode.alpha:value" in outer["code"]                               # though alpha did not run now


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
    assert {"spvr_lib.train:fit", "spvr_lib.models.specs:build", "spvr_lib.models.networks:MLP.forward",
            "spvr_lib.devices:resolve_device"} <= set(code)
    # nothing the run never touched: no dataset loaders, no ranking, no paper harness, no unused train.py code
    assert not [f for f in code if f.startswith(("spvr_lib.data", "spvr_lib.paper", "spvr_lib.ranking"))]
    assert "spvr_lib.train:validation_split" not in code and not [f for f in code if f.startswith("spvr_lib.__main__")]


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


# --------------------------------------------------------------------------- the time of unfinished attempts
class Interrupted(Exception):
    pass


def _slow(seconds, seen=None, ledger=None, fail=False):
    import time

    def compute():
        time.sleep(seconds)
        if seen is not None:
            seen.append(json.loads(ledger.read_text()))
        if fail:
            raise Interrupted("killed at the session's end")
        return {"value": 1}
    return compute


def test_an_attempt_writes_its_elapsed_time_while_it_runs_and_drops_it_when_done(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    monkeypatch.setattr(store, "ATTEMPT_BEAT_S", 0.02)
    ledger = store.attempt_ledger("train", store.run_hash({"kind": "train", "x": 1}))
    seen = []
    rec = store.cached({"x": 1}, _slow(0.3, seen, ledger), kind="train")
    assert seen[0]["current_s"] >= 0.1 and seen[0]["interrupted_s"] == 0     # beats during the computation
    assert not ledger.exists() and "interrupted_s" not in rec                  # a first attempt that finished


def test_a_resumed_training_counts_the_time_of_its_interrupted_attempts(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    monkeypatch.setattr(store, "_used", {})
    h = store.run_hash({"kind": "train", "x": 2})
    ledger = store.attempt_ledger("train", h)
    for _ in range(2):                                          # two attempts killed before they finished
        with pytest.raises(Interrupted):
            store.cached({"x": 2}, _slow(0.05, fail=True), kind="train")
    left = json.loads(ledger.read_text())
    assert left["current_s"] >= 0.05 and left["interrupted_s"] >= 0.05        # the last one and the one before
    rec = store.cached({"x": 2}, _slow(0.01), kind="train")
    assert rec["interrupted_s"] == pytest.approx(left["interrupted_s"] + left["current_s"], abs=1e-3)
    assert not ledger.exists()
    dev = rec["provenance"]["device"]
    share = min(1.0, dev["torch_threads"] / dev["cpu_count"])
    assert store.machine_seconds(rec) == pytest.approx((rec["wall_s"] + rec["interrupted_s"]) * share, abs=1e-3)
    assert store.records_used()[h]["compute_s"] == store.machine_seconds(rec)


def test_a_kind_that_starts_again_does_not_count_its_interrupted_attempts(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    with pytest.raises(Interrupted):
        store.cached({"x": 3}, _slow(0.05, fail=True), kind="baseline")
    assert store.attempt_ledger("baseline", store.run_hash({"kind": "baseline", "x": 3})).exists()
    rec = store.cached({"x": 3}, _slow(0.01), kind="baseline")
    assert "interrupted_s" not in rec
    assert store.machine_seconds({"wall_s": 2.0, "interrupted_s": 3.0}) == 5.0      # no provenance: whole wall
