"""SPvR against the baselines: equal budgets, the comparison cache, failures in tables, the comparison rule."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from spvr_lib import baselines, models, train
from spvr_lib.paper import scales
from spvr_lib.paper import base_models
from spvr_lib.paper import latency_vs_accuracy
from spvr_lib.paper import stats
from spvr_lib.paper import accuracy_vs_baselines, architecture_vs_retraining, finetune_vs_scratch, pruned_networks, trained_runs

TINY = scales.Scale(name="smoke", seeds=(0,), models={
    "vgg16": scales.ModelSetup("vgg16_bn", "fashion-mnist", width=1 / 16, epochs=1, batch_size=32, lr=0.05,
                               lr_grid=(0.05,), group_size=2, rates=(0.7,), train_rates=(0.7,), calib_per_class=2,
                               train_subset=4, test_subset=2, augment=False, table3_rate=0.7)})
RATE = 0.7


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One run cache for the module: the tiny base network is trained once (a few seconds).  One torch
    thread: these networks are tiny, and two threads on a busy 2-core machine are many times slower."""
    root = tmp_path_factory.mktemp("cache") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPVR_CACHE", str(root))
        torch.manual_seed(0)
        yield root
    torch.set_num_threads(threads)


def fake_fit(calls):
    """Stands in for train.fit: counts the calls, raises on the ones listed in ``calls["raise_on"]``."""
    def fit(model, train_set, test_set, recipe, seed=0, checkpoint=None, **kwargs):
        calls["n"] += 1
        assert checkpoint.parent == train.checkpoint_dir()     # an interrupted training resumes from here
        if calls["n"] in calls.get("raise_on", ()):
            raise RuntimeError("interrupted on purpose")
        top1 = 50.0 + float(models.count_params(model) % 37)   # a value that depends on the network (not chance)
        return {"top1": top1, "top5": 100.0, "loss": 1.0, "history": [], "epochs": recipe.epochs}
    return fit


def test_every_method_lands_within_the_same_budget_as_spvr(cache, monkeypatch):
    monkeypatch.setattr(pruned_networks, "rcp_samples", lambda cfg: 1)     # one random architecture: fast
    base = base_models.train_base(TINY, "vgg16", progress=False)
    budget = pruned_networks.parameter_budget(base["params"], RATE)
    assert budget == math.floor((1 - RATE) * base["params"])
    spvr = base_models.spvr_pruned(TINY, "vgg16", RATE, progress=False)
    assert spvr["budget"] == budget and spvr["params_after"] <= budget
    for method in pruned_networks.TABLE1_METHODS:
        model, info = pruned_networks.pruned_network(TINY, "vgg16", method, RATE, progress=False)
        assert info["budget"] == budget, method
        if method == "otov2":
            assert model is None and info["status"] == "failed" and "OTOv2" in info["error"]
            continue
        assert info["status"] == "ok", (method, info["error"])
        assert models.count_params(model) == info["params_after"] <= budget, method
        assert info["params_before"] == base["params"]
        # the pruned network classifies a Fashion-MNIST image
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_pruned_baseline_is_cached_and_reloads_identically(cache, monkeypatch):
    first, info = pruned_networks.pruned_network(TINY, "vgg16", "l1", RATE, progress=False)

    def no_pruning(*a, **k):
        raise AssertionError("baselines.prune called although the pruned network is cached")

    monkeypatch.setattr(baselines, "prune", no_pruning)
    again, info2 = pruned_networks.pruned_network(TINY, "vgg16", "l1", RATE, progress=False)
    assert info2 == info
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert [tuple(p.shape) for p in again.parameters()] == [tuple(p.shape) for p in first.parameters()]
    assert torch.equal(first.eval()(x), again.eval()(x))


def test_a_pruned_baseline_kept_by_description_names_its_weights_and_makes_them_only_when_read(cache, monkeypatch):
    """The committed cache keeps a pruned baseline's description (shapes, digest of the weights), not its weights:
    the training keys need only the digest; the weights are pruned again, checked against it, when read."""
    model, info = pruned_networks.pruned_network(TINY, "vgg16", "l2", RATE, progress=False)
    state = pruned_networks.pruned_state(model)
    digest = train.state_dict_digest(state)
    weights = train.checkpoint_dir().parent / "pruned" / f"baseline-{info['hash']}.pt"
    assert weights.exists() and pruned_networks._description(weights)["state_sha256"] == digest
    weights.unlink()                                                    # as in a fresh clone
    calls = []
    real = baselines.prune
    monkeypatch.setattr(baselines, "prune", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("SPVR_FORBID_COMPUTE", "baseline")              # the record is reused, never recomputed
    again, info2 = pruned_networks.pruned_network(TINY, "vgg16", "l2", RATE, progress=False)
    lazy = pruned_networks.pruned_state(again)
    assert info2 == info and isinstance(lazy, train.WeightsOnDemand) and calls == []
    assert train.state_dict_digest(lazy) == digest and calls == []     # the key needs no weights
    assert models.network_shapes(again) == models.network_shapes(model)
    assert all(torch.equal(lazy[k], v) for k, v in state.items()) and calls == [1] and weights.exists()
    # weights that come out otherwise are refused, naming the file
    bad = train.WeightsOnDemand("0" * 64, lambda: state, "baseline-x.pt")
    with pytest.raises(ValueError, match="baseline-x.pt: the weights made again have digest"):
        dict(bad)


def test_save_and_load_pruned_resnet_round_trip(tmp_path):
    spec = models.preset("resnet18", num_classes=10, in_channels=1, width=1 / 16)
    torch.manual_seed(0)
    base = models.build(spec).eval()
    calib = (torch.randn(8, 1, 32, 32), torch.arange(8) % 10)
    res = baselines.prune("l2", base, calib, keep=0.4, group_size=2, progress=False)
    assert res.status == "ok"
    path = models.save_network(res.model, tmp_path / "net.pt", spec=spec)
    torch.load(path, weights_only=True)                       # readable without unpickling code
    loaded = models.load_network(path).eval()
    assert models.count_params(loaded) == res.params_after < models.count_params(base)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(res.model.eval()(x), loaded(x))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        models.load_network(tmp_path / "missing.pt")


def test_interrupted_comparison_resumes_without_recomputing_finished_runs(cache, monkeypatch):
    calls = {"n": 0, "raise_on": (2,)}
    monkeypatch.setattr(train, "fit", fake_fit(calls))
    methods, seeds = ["l1", "l2", "spvr"], [0, 1]
    first = trained_runs.accuracy_runs(TINY, ["vgg16"], methods, seeds, "finetune", progress=False)
    assert calls["n"] == 6 and len(first) == 6
    failed = first[first["status"] != "ok"]
    assert len(failed) == 1 and "interrupted on purpose" in failed["error"].iloc[0]
    assert failed["status"].iloc[0].startswith("failed: RuntimeError: interrupted on purpose")
    assert (first.loc[first["status"] == "ok", "top1"].notna()).all()

    ok = first[first["status"] == "ok"]              # the runs table says what every network was given
    setup = TINY.model("vgg16")
    assert (ok["epochs"] == setup.epochs).all() and (ok["train images"] == setup.train_subset * 10).all()
    assert (ok["lr"] > 0).all()
    calls.update(n=0, raise_on=())
    second = trained_runs.accuracy_runs(TINY, ["vgg16"], methods, seeds, "finetune", progress=False)
    assert calls["n"] == 1                                   # only the interrupted run is trained again
    assert (second["status"] == "ok").all()
    pd.testing.assert_series_equal(first.loc[first["status"] == "ok", "top1"],
                                   second.loc[first["status"] == "ok", "top1"])
    # SPvR trains from scratch whatever the mode: one record shared by both modes
    calls["n"] = 0
    scratch = trained_runs.accuracy_runs(TINY, ["vgg16"], ["spvr"], seeds, "scratch", progress=False)
    assert calls["n"] == 0 and (scratch["mode"] == "scratch").all()


def test_one_architecture_trained_from_scratch_is_one_run_whichever_method_chose_it(cache, monkeypatch):
    shapes = {m: models.network_shapes(pruned_networks.pruned_network(TINY, "vgg16", m, RATE, progress=False)[0])
              for m in ("l1", "l2", "taylor")}                   # (the base network is trained here)
    calls = {"n": 0}
    monkeypatch.setattr(train, "fit", fake_fit(calls))
    assert shapes["l1"] == shapes["l2"] != shapes["taylor"]      # ℓ1 and ℓ2 thin every layer alike; Taylor does not
    scratch = trained_runs.accuracy_runs(TINY, ["vgg16"], ["l1", "l2", "taylor"], [7], "scratch", progress=False)
    assert calls["n"] == 2 and (scratch["status"] == "ok").all()
    by = scratch.set_index("method")
    assert by.loc["l1", "top1"] == by.loc["l2", "top1"]
    assert trained_runs.training_tag("l1", "scratch") == trained_runs.training_tag("spvr", "scratch") == "scratch"
    calls["n"] = 0                                  # fine-tuned, each starts from its own method's weights
    trained_runs.accuracy_runs(TINY, ["vgg16"], ["l1", "l2"], [7], "finetune", progress=False)
    assert calls["n"] == 2 and trained_runs.training_tag("l1", "finetune") == "l1"


def test_failed_method_appears_in_table1_with_its_reason(cache, monkeypatch):
    monkeypatch.setattr(train, "fit", fake_fit({"n": 0}))
    runs = trained_runs.accuracy_runs(TINY, ["vgg16"], ["tp_l1", "otov2", "spvr"], [0], "finetune", progress=False)
    assert runs.set_index("method").loc["otov2", "error"] == baselines.OTOV2_UNAVAILABLE   # full reason per run
    t = accuracy_vs_baselines.table1(TINY, ["vgg16"], ["tp_l1", "otov2", "spvr"], seeds=[0], runs=runs, progress=False)
    ours = t[(t["source"] == "ours (smoke)") & (t["metric"] == "top1")].iloc[0]
    assert ours["OTOv2"] == "failed: could not prune" and ours["ℓ1"] != "failed: could not prune"
    assert runs.set_index("method").loc["otov2", "status"] == "failed: could not prune"
    assert ours["failures"].startswith("OTOv2: " + baselines.OTOV2_UNAVAILABLE[:100])   # shortened in the table
    assert ours["best baseline"] == "ℓ1" and ours["verdict"] == "n/a (< 2 seeds)"
    paper = t[(t["source"] == "paper") & (t["metric"] == "top1")].iloc[0]
    assert (paper["ℓ1"], paper["OTOv2"], paper["SPvR"], paper["base"]) == ("93.53", "93.20", "94.21", 94.25)
    # top-5 rows too (10 classes); the paper prints no VGG16 top-5
    paper5 = t[(t["source"] == "paper") & (t["metric"] == "top5")].iloc[0]
    assert paper5["SPvR"] == "-"


def _runs(cells):
    """A runs table of hand-made cells: {method: [(top1, status), ...]} (one row per seed)."""
    return pd.DataFrame([{"model": "vgg16", "dataset": "d", "rate": 0.9, "method": m, "seed": s, "mode": "finetune",
                          "top1": v, "top5": None, "params": 10, "budget": 12, "status": st,
                          "error": None if st == "ok" else "x"}
                         for m, runs in cells.items() for s, (v, st) in enumerate(runs)])


def test_comparison_row_names_failed_runs_and_decides_by_welch_on_the_others():
    runs = _runs({"spvr": [(85.0, "ok"), (86.0, "ok"), (87.0, "ok")],
                  "tp_l1": [(10.0, "failed: dead network")] * 3,
                  "curl": [(80.0, "ok"), (10.0, "failed: at chance"), (81.0, "ok")]})
    sub = trained_runs.summarize(runs)
    row = trained_runs._comparison_row(sub, runs, "top1", ["tp_l1", "curl", "spvr"])
    assert row["ℓ1"] == "failed: dead network"                       # never averaged into a mean
    assert row["CURL"] == "80.50 ± 0.71 (80.00 / 81.00); 2 of 3 seeds (1 at chance)"
    assert row["SPvR"] == "86.00 ± 1.00 (85.00 / 86.00 / 87.00)"
    expected = stats.compare([85, 86, 87], [80, 81], "SPvR", "CURL")
    assert row["best baseline"] == "CURL" and row["SPvR - best"] == pytest.approx(5.5)
    assert (row["95% interval"], row["verdict"]) == (expected.interval_text(), expected.verdict)
    by = sub.set_index("method")
    assert by.loc["curl", "failed runs"] == "2 of 3 seeds (1 at chance)" and by.loc["curl", "n_ok"] == 2
    assert by.loc["tp_l1", "status"] == "failed" and np.isnan(by.loc["tp_l1", "top1 mean"])


def test_output_spread_is_zero_for_a_network_whose_stem_is_dead(cache):
    model, _ = pruned_networks.pruned_network(TINY, "vgg16", "tp_l1", RATE, progress=False)
    state = {k: v.clone() for k, v in pruned_networks.pruned_state(model).items()}
    alive = pruned_networks.output_spread(TINY, "vgg16", model, state, progress=False)
    first_bn = next(k for k in state if k.endswith(".running_var")).rsplit(".", 1)[0]
    state[f"{first_bn}.weight"].zero_()                    # gamma 0 and beta < 0: zero after the ReLU, always
    state[f"{first_bn}.bias"].fill_(-0.026)
    assert alive > stats.DEAD_SPREAD and pruned_networks.output_spread(TINY, "vgg16", model, state, progress=False) == 0.0
    assert len(list(cache.glob("spread-*.json"))) >= 2        # cached by the weights' digest


def test_summarize_mean_std_and_partial_failures():
    runs = pd.DataFrame([
        {"model": "vgg16", "dataset": "d", "rate": 0.9, "method": "l1", "seed": s, "mode": "finetune",
         "top1": v, "top5": None, "params": 10, "budget": 12, "status": st, "error": err}
        for s, v, st, err in [(0, 90.0, "ok", None), (1, 92.0, "ok", None), (2, 11.0, "failed: diverged", "boom")]])
    s = trained_runs.summarize(runs).iloc[0]
    assert s["top1 mean"] == 91.0 and s["top1 std"] == pytest.approx(math.sqrt(2))
    assert (s["n_ok"], s["n_runs"], s["status"], s["error"]) == (2, 3, "partial", "boom")
    assert (s["top1 seeds"], s["failed runs"]) == ("90.00 / 92.00", "2 of 3 seeds (1 diverged)")
    assert np.isnan(s["top5 mean"])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="method='l3'"):
        pruned_networks.pruned_network(TINY, "vgg16", "l3", RATE)
    with pytest.raises(ValueError, match="rate=1.5"):
        trained_runs.trained_accuracy(TINY, "vgg16", "l1", 1.5, 0, "finetune")
    with pytest.raises(ValueError, match="mode='warm'"):
        trained_runs.accuracy_runs(TINY, ["vgg16"], ["l1"], [0], "warm")
    with pytest.raises(ValueError, match="mode='warm'"):
        trained_runs.trained_accuracy(TINY, "vgg16", "spvr", RATE, 0, "warm")
    with pytest.raises(ValueError, match="model='vgg19'"):
        trained_runs.trained_accuracy(TINY, "vgg19", "l1", RATE, 0, "finetune")


def test_table2_picks_the_highest_rate_without_collapse_and_trains_both(cache):
    grid = (0.8, 0.99, 0.98, 0.97, 0.95)         # order does not matter: the highest is tried first
    rate, rec = finetune_vs_scratch.highest_uncollapsed_rate(TINY, "vgg16", grid, progress=False)
    collapsed = {r: base_models.spvr_pruned(TINY, "vgg16", r, progress=False)["collapsed"] for r in grid}
    assert collapsed[0.99] and rate == max(r for r in grid if not collapsed[r]) and not rec["collapsed"]
    t, runs = finetune_vs_scratch.table2(TINY, ["vgg16"], seeds=[0], grid=grid, progress=False, with_runs=True)
    assert list(zip(t["set"], t["metric"])) == [("rule", "top1"), ("rule", "top5"), ("paper's rate", "top1"),
                                                ("paper's rate", "top5")]
    row = t.iloc[0]
    assert row["status"] == "ok" and row["params"] == rec["params_after"]
    assert row["params removed (%)"] == round(100 * rate, 2)
    for lab, mode in (("FT", "finetune"), ("TFS", "scratch")):   # a tiny network may end at chance: then named
        run = runs[(runs["set"] == "rule") & (runs["mode"] == mode)].iloc[0]
        counted = run["status"] == "ok"
        assert row[f"{lab} seeds counted"] == int(counted)
        assert row[lab] == (stats.cell_text([run["top1"]]) if counted else run["status"])
    assert (row["paper FT"], row["paper TFS"]) == (93.40, 94.25)
    assert row["narrowest layer"] and row["classifier inputs"] >= 1      # what the network is, beside its accuracy
    paper_row = t.iloc[2]                                                # the paper's own rate: 60% for VGG16
    assert paper_row["params removed (%)"] == 60.0
    assert paper_row["params"] == base_models.spvr_pruned(TINY, "vgg16", 0.6, progress=False)["params_after"]
    assert set(runs["set"]) == {"rule", "paper's rate"} and len(runs) == 4 and runs["top1"].notna().all()
    every_rate_collapses = finetune_vs_scratch.table2(TINY, ["vgg16"], seeds=[0], grid=(0.99,), progress=False)
    rule = every_rate_collapses.iloc[0]
    assert rule["status"] == "failed" and "collapses a layer at every rate" in rule["error"]
    assert every_rate_collapses.iloc[2]["status"] == "ok"                 # the paper's rate is trained regardless


def test_latency_runs_time_every_network_at_its_budget_and_keep_the_timings_as_records(cache, monkeypatch):
    lat = latency_vs_accuracy.latency_runs(TINY, ["vgg16"], ["tp_l1", "otov2", "spvr"], rounds=3, runs_per_round=2, warmup=0,
                               batch_sizes=(1, 3), threads=1, progress=False)
    assert len(lat) == 2 * 4                       # (unpruned + 3 methods) x 2 batch sizes
    ok = lat[lat["status"] == "ok"]
    assert set(ok["method"]) == {"unpruned", "tp_l1", "spvr"} and (ok["threads"] == 1).all()
    assert ((ok["low_ms"] <= ok["median_ms"]) & (ok["median_ms"] <= ok["high_ms"])).all()
    pruned = ok[ok["method"] != "unpruned"]
    assert (pruned["params"] <= pruned["budget"]).all()
    assert (ok.loc[ok["method"] == "unpruned", "params"] > pruned["params"].max()).all()
    assert lat.loc[lat["method"] == "otov2", "error"].str.contains("OTOv2").all()
    # a rerun re-times nothing and gives the same numbers; retime measures afresh
    calls = []
    real = latency_vs_accuracy.latency.measure_interleaved
    monkeypatch.setattr(latency_vs_accuracy.latency, "measure_interleaved", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = latency_vs_accuracy.latency_runs(TINY, ["vgg16"], ["tp_l1", "otov2", "spvr"], rounds=3, runs_per_round=2, warmup=0,
                                 batch_sizes=(1, 3), threads=1, progress=False)
    assert calls == [] and again["median_ms"].equals(lat["median_ms"])
    monkeypatch.setenv("SPVR_RETIME", "1")
    latency_vs_accuracy.latency_runs(TINY, ["vgg16"], ["tp_l1", "spvr"], rounds=3, runs_per_round=2, warmup=0, batch_sizes=(1,),
                         threads=1, progress=False)
    assert calls == [1]


def test_latency_claims_separate_networks_only_where_the_intervals_do():
    rows = [("unpruned", 90, 10.0, 9.5, 10.5), ("spvr", 90, 4.0, 3.9, 4.1), ("tp_l1", 90, 5.0, 4.8, 5.2),
            ("curl", 90, 12.0, 11.0, 13.0),
            ("unpruned", 98, 10.0, 9.0, 11.0), ("spvr", 98, 3.0, 2.5, 3.5), ("tp_l1", 98, 3.2, 3.1, 3.3),
            ("curl", 98, 10.5, 10.2, 11.5), ("otov2", 98, None, None, None)]
    lat = pd.DataFrame([{"model": "vgg16", "method": m, "cell removed (%)": c, "batch_size": 1, "median_ms": ms,
                         "low_ms": lo, "high_ms": hi, "status": "failed" if ms is None else "ok"}
                        for m, c, ms, lo, hi in rows])
    c = latency_vs_accuracy.latency_claims(lat).set_index("params removed (%)")
    assert c.loc[90, "SPvR fastest"] == "yes" and c.loc[90, "slower than unpruned"] == "CURL"
    assert c.loc[90, "SPvR ms"] == "4.000 [3.900, 4.100]" and c.loc[90, "faster than unpruned"] == "SPvR, ℓ1"
    # at 98% SPvR has the lowest median, but its interval overlaps ℓ1's: tied, not fastest; CURL's overlaps the
    # unpruned network's: not slower
    assert c.loc[98, "SPvR fastest"] == "tied with ℓ1" and c.loc[98, "slower than unpruned"] == "none"


def test_spvr_ranks_once_per_base_network_and_prunes_each_rate_from_it(cache, monkeypatch):
    calls = []
    real = base_models.rank_groups
    monkeypatch.setattr(base_models, "rank_groups", lambda *a, **k: calls.append(k.get("device")) or real(*a, **k))
    recs = [base_models.spvr_pruned(TINY, "vgg16", r, group_size=3, progress=False) for r in (0.5, 0.7, 0.9)]
    assert len(calls) == 1 and calls[0] in ("cpu", "cuda")               # one ranking, on the scale's device
    assert [r["params_after"] <= r["budget"] for r in recs] == [True] * 3
    assert recs[0]["params_after"] > recs[1]["params_after"] > recs[2]["params_after"]


def test_the_networks_that_decide_a_cell_are_read_on_their_budget(cache, monkeypatch):
    """SPvR and the best baseline are trained again with 3/4 of their epochs, paired by seed; a gain above 0.3
    points qualifies the verdict ("not converged: ...") instead of deleting it."""
    def fit(model, train_set, test_set, recipe, seed=0, checkpoint=None, **kwargs):
        top1 = 60.0 + recipe.epochs * (1.0 if recipe.mode == "scratch" else 0.1) + seed
        return {"top1": top1, "top5": 99.0, "loss": 1.0, "history": [], "epochs": recipe.epochs}
    monkeypatch.setattr(train, "fit", fit)
    import dataclasses
    cfg = dataclasses.replace(TINY, models={"vgg16": dataclasses.replace(TINY.model("vgg16"), epochs=4)})
    runs = trained_runs.accuracy_runs(cfg, ["vgg16"], ["tp_l1", "spvr"], [0, 1], "finetune", progress=False)
    t = accuracy_vs_baselines.table1(cfg, ["vgg16"], ["tp_l1", "spvr"], seeds=[0, 1], runs=runs, progress=False)
    ours = t[(t["source"] == "ours (smoke)") & (t["metric"] == "top1")].iloc[0]
    # SPvR (from scratch): 64 + seed after 4 epochs, 63 + seed after 3: gains 1.00; ℓ1 (fine-tuned) 0.10
    assert ours["SPvR gain on budget"] == pytest.approx(1.0) and ours["best gain on budget"] == pytest.approx(0.1)
    assert ours["converged"] == "not converged: SPvR gains +1.00"
    assert ours["verdict"] in ("SPvR better", "within noise", "ℓ1 better")      # kept, not deleted
    trained = {(r["key"]["recipe"]["epochs"], r["key"]["tag"]) for r in
               (store_read(p) for p in cache.glob("train-*.json"))}
    assert {(3, "scratch"), (3, "tp_l1")} <= trained


def store_read(path):
    from spvr_lib import store
    return store.read_record(path)


def test_the_sensitivity_table_sets_the_authors_variants_beside_torch_pruning(cache, monkeypatch):
    monkeypatch.setattr(train, "fit", fake_fit({"n": 0}))
    table, runs = accuracy_vs_baselines.baselines_sensitivity(TINY, ["vgg16"], seeds=[0, 1], progress=False)
    assert set(runs["method"]) >= {"tp_l1", "l1", "tp_taylor", "taylor", "spvr", "curl"}
    crit = table.set_index("criterion")
    assert list(crit.index) == ["ℓ1", "ℓ2", "Taylor", "FPGM", "Table 1 verdict"]
    assert crit.loc["ℓ1", "variant"] == "ℓ1 (Li et al.)" and crit.loc["Taylor", "variant"] == "Taylor (NVlabs)"
    assert crit.loc["Table 1 verdict", "verdict"] in ("moved", "unchanged")
    assert accuracy_vs_baselines._kind("ℓ1 (Li et al.) better") == accuracy_vs_baselines._kind("CURL better") == "a baseline better"


def test_table3_lists_each_run_once_and_reads_scratch_cells_on_their_budget(cache, monkeypatch):
    monkeypatch.setattr(train, "fit", fake_fit({"n": 0}))
    table, runs = architecture_vs_retraining.table3(TINY, ["vgg16"], ["tp_l1", "spvr"], seeds=[0, 1], progress=False)
    spvr = runs[runs["method"] == "spvr"]
    assert len(spvr) == 2 and len(runs) == 2 + 2 + 2          # SPvR once; ℓ1 from scratch and fine-tuned
    assert set(table["rows"]) == {"scratch (Table 3)", "Table 1 (baselines fine-tuned)", "scratch - fine-tune",
                                  "paper (Table 3)"}
    scratch = table[(table["rows"] == "scratch (Table 3)") & (table["metric"] == "top1")].iloc[0]
    assert scratch["converged"] == "not read"                 # one epoch: no shorter budget to read


def test_nvlabs_taylor_prunes_while_fine_tuning_within_the_epoch_budget(cache):
    """The authors' Taylor: the base network fine-tuned for the model's epochs with gates on, pruned after the
    epochs of NVlabs's scaled schedule down to the common budget; the record is the pruned network's."""
    import dataclasses
    cfg = dataclasses.replace(TINY, models={"vgg16": dataclasses.replace(TINY.model("vgg16"), epochs=8)})
    assert pruned_networks.taylor_steps(8) == [1, 2] and pruned_networks.taylor_steps(160)[-1] == 40
    assert len(pruned_networks.taylor_steps(160)) == 10 and pruned_networks.taylor_steps(1) == [1]
    rec = trained_runs.trained_accuracy(cfg, "vgg16", "taylor", RATE, 0, "finetune", progress=False)
    assert rec["params"] <= rec["budget"] and rec["epochs"] == 8 and len(rec["history"]) == 8
    assert rec["status"] in ("ok", "failed: at chance") and rec["narrowest layer"]
    raw = pruned_networks.taylor_iterative(cfg, "vgg16", RATE, 0, progress=False)
    assert raw["pruning epochs"] == [1, 2] and raw["params"] == rec["params"]
    assert raw["top1"] == pytest.approx(raw["gated top1"], abs=1e-6)   # removing masked channels changes nothing
    assert not list(train.checkpoint_dir().glob(f"{raw['hash']}*"))


def test_table2_trains_a_collapsed_network_from_scratch_only(cache, monkeypatch):
    from spvr_lib.paper import reference
    monkeypatch.setattr(train, "fit", fake_fit({"n": 0}))
    monkeypatch.setitem(reference.PAPER_TABLE2, "vgg16", {**reference.PAPER_TABLE2["vgg16"], "rate": 0.99})
    assert base_models.spvr_pruned(TINY, "vgg16", 0.99, progress=False)["collapsed"]
    t, runs = finetune_vs_scratch.table2(TINY, ["vgg16"], seeds=[0, 1], grid=(0.8,), progress=False, with_runs=True)
    paper = t[(t["set"] == "paper's rate") & (t["metric"] == "top1")].iloc[0]
    assert paper["status"] == "ok" and paper["FT"].startswith("n/a: layers collapsed")
    assert paper["verdict"] == "n/a (no fine-tuning: layers collapsed)" and paper["TFS seeds counted"] == 2
    assert set(runs.loc[runs["set"] == "paper's rate", "mode"]) == {"scratch"}


def test_nvlabs_taylor_takes_a_step_lost_to_an_interruption_at_the_next_epoch(cache, monkeypatch):
    """The checkpoint of a pruning epoch is written before its step: a run killed in the next epoch resumes (a new
    process: the base weights, the gates, then the checkpoint's masks, which lack that step), and the next
    epoch's end takes the step, so that the budget holds."""
    import dataclasses
    cfg = dataclasses.replace(TINY, models={"vgg16": dataclasses.replace(TINY.model("vgg16"), epochs=12)})
    assert pruned_networks.taylor_steps(12) == [1, 2, 3]
    real_fit = train.fit
    state = {"killed": False, "counts": []}

    def fit(model, train_set, test_set, recipe, seed=0, checkpoint=None, on_epoch_end=None, **kw):
        if on_epoch_end is None:                            # (the base network's own training)
            return real_fit(model, train_set, test_set, recipe, seed=seed, checkpoint=checkpoint, **kw)

        def end(entry):
            on_epoch_end(entry)
            state["counts"].append((entry["epoch"], models.count_params(model)))
            if entry["epoch"] == 3 and not state["killed"]:     # killed in epoch 4: checkpoint 3 lacks step 3
                state["killed"] = True
                raise KeyboardInterrupt
        return real_fit(model, train_set, test_set, recipe, seed=seed, checkpoint=checkpoint, on_epoch_end=end, **kw)

    monkeypatch.setattr(train, "fit", fit)
    with pytest.raises(KeyboardInterrupt):
        pruned_networks.taylor_iterative(cfg, "vgg16", RATE, 0, progress=False)
    rec = pruned_networks.taylor_iterative(cfg, "vgg16", RATE, 0, progress=False)      # resumed from epoch 3's checkpoint
    assert state["killed"] and rec["params"] <= rec["budget"]
    assert [e for e, _ in state["counts"]][:5] == [1, 2, 3, 4, 5]                # epoch 4 ran in the second process


def _spy_fan_out(monkeypatch):
    """Every job ``jobs.fill_cache`` is handed, as ``target:args`` strings (nothing runs there: the callers then
    compute in order, as with one worker)."""
    from spvr_lib import store
    from spvr_lib.paper import jobs

    submitted: list[str] = []

    def fill_cache(target, jobs_, workers, desc="jobs", progress=True, kwargs=None, cost=None):
        submitted.extend(f"{jobs.target_name(target)}:" + store.canonical_json(jobs._ident(j)) for j in jobs_)
        return []
    monkeypatch.setenv("SPVR_WORKERS", "2")
    monkeypatch.setattr(jobs, "fill_cache", fill_cache)
    return submitted


def _declared(batches):
    """{a declared job's ``target:args``: its identity (``jobs.Batch.key``)}."""
    from spvr_lib import store
    from spvr_lib.paper import jobs

    return {f"{jobs.target_name(b.target)}:" + store.canonical_json(jobs._ident(j)): b.key(j)
            for b in batches for j in b.jobs}


def test_what_tables_1_and_3_fan_out_is_what_their_modules_declare(cache, monkeypatch):
    """Issue 32, each table declared once: with two workers, the jobs notebooks 03, 04 and 06 hand the executor
    are the ones their modules' ``declared_jobs`` list (the plan's lists), each computation once: the four local
    methods' one architecture from scratch is submitted once per seed, and every declared computation is
    submitted (a job the runner adds or drops beside its declaration fails this)."""
    monkeypatch.setattr(train, "fit", fake_fit({"n": 0}))
    monkeypatch.setattr(pruned_networks, "rcp_samples", lambda cfg: 1)
    methods, seeds = ["tp_l1", "l1", "hrank", "nisp", "curl", "spvr"], [0, 1]
    submitted = _spy_fan_out(monkeypatch)
    base_models.prepare_bases(TINY, ["vgg16"], progress=False)
    bases = list(submitted)
    runs = trained_runs.accuracy_runs(TINY, ["vgg16"], methods, seeds, "finetune", progress=False)
    t1 = accuracy_vs_baselines.table1(TINY, ["vgg16"], methods, seeds, runs=runs, progress=False)
    _, _ = accuracy_vs_baselines.baselines_sensitivity(TINY, ["vgg16"], seeds, progress=False)
    table1 = submitted[len(bases):]
    best = {RATE: accuracy_vs_baselines._METHOD_OF[t1[t1["source"] == "ours (smoke)"]["best baseline"].iloc[0]]}
    declared = _declared(base_models.declared_jobs(TINY, "vgg16")[:2])
    assert set(bases) == set(declared) and len(bases) == len(declared)
    declared = _declared(accuracy_vs_baselines.declared_jobs(TINY, "vgg16", methods, seeds, best=best))
    assert set(table1) - set(bases) <= set(declared)
    assert {declared[j] for j in table1 if j in declared} == set(declared.values())
    del submitted[:]
    t3, _ = architecture_vs_retraining.table3(TINY, ["vgg16"], methods, seeds, progress=False)
    best3 = accuracy_vs_baselines._METHOD_OF[t3[t3["rows"] == "scratch (Table 3)"]["best baseline"].iloc[0]]
    declared = _declared(architecture_vs_retraining.declared_jobs(TINY, "vgg16", methods, seeds, best=best3))
    table3 = [j for j in submitted if j not in bases]
    assert set(table3) <= set(declared) and {declared[j] for j in table3} == set(declared.values())
    scratch = [j for j in table3 if j.startswith("spvr_lib.paper.trained_runs:trained_accuracy") and '"scratch"' in j]
    assert len(scratch) == len(set(scratch)) == 3 * len(seeds)    # per seed: SPvR, the local methods' one, CURL


def test_what_table2_fans_out_is_what_the_plan_counts(cache, monkeypatch):
    """Issue 32: Table 2's lr trials (two values, per network and mode), trainings and on-budget readings, as its
    runner submits them with two workers, are as many as its declaration gives the plan, which knows neither the
    rule's rate, nor the lrs, nor the seeds that count (placeholders): each kind of job, per target."""
    import dataclasses

    from spvr_lib.paper import jobs

    monkeypatch.setattr(train, "fit", fake_fit({"n": 0}))
    cfg = dataclasses.replace(TINY, models={"vgg16": dataclasses.replace(TINY.model("vgg16"), lr_grid=(0.05, 0.1),
                                                                          epochs=2)})
    seeds, grid = [0, 1], (0.8, 0.7)
    submitted = _spy_fan_out(monkeypatch)
    t = finetune_vs_scratch.table2(cfg, ["vgg16"], seeds=seeds, grid=grid, progress=False)
    assert (t["status"] == "ok").all() and not t["architecture"].isna().any()
    counts: dict[str, int] = {}
    for j in submitted:
        target = ":".join(j.split(":")[:2])
        counts[target] = counts.get(target, 0) + 1
    declared: dict[str, int] = {}
    for b in finetune_vs_scratch.declared_jobs(cfg, "vgg16", seeds):
        target = jobs.target_name(b.target) + (" (on budget)" if b.what.startswith("on-budget") else "")
        declared[target] = declared.get(target, 0) + len(b.jobs)
    # 2 networks x (2 scratch + 2 fine-tuning lr values); 2 networks x 2 modes x 2 seeds, trained and read on budget
    assert declared == {"spvr_lib.paper.finetune_vs_scratch:_table2_trial_job": 8, "spvr_lib.train:train_run": 8,
                        "spvr_lib.train:train_run (on budget)": 8}
    assert counts == {"spvr_lib.paper.finetune_vs_scratch:_table2_trial_job": 8, "spvr_lib.train:train_run": 16}
