"""The cpu scale's protocol: every network of a model gets its base's images and epochs, learning rates are
searched per model and mode on a validation split, convergence is measured, and independent trainings run
side by side with the same results as one after another."""
import os

import pandas as pd
import pytest
import torch

from spvr_lib import data, models, store, train
from spvr_lib.paper import base_models, jobs, pruned_networks, reference, scales, trained_runs

SETUP = scales.ModelSetup("vgg16_bn", "fashion-mnist", width=1 / 16, epochs=2, batch_size=32, lr=0.05,
                          lr_grid=(0.01, 0.05), finetune_lr_grid=(0.002, 0.02), group_size=2, rates=(0.7,),
                          train_rates=(0.7,), calib_per_class=2, train_subset=4, test_subset=2, augment=False,
                          table3_rate=0.7)
TINY = scales.Scale(name="smoke", seeds=(0, 1), models={"vgg16": SETUP})
BEST = {"scratch": 0.01, "finetune": 0.02}      # where the fake training below scores best, per mode


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    monkeypatch.setattr(store, "_used", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "runs"
    torch.set_num_threads(threads)


def fake_fit(log):
    """Stands in for train.fit: records (mode, lr, training images) and scores best at BEST[mode]."""
    def fit(model, train_set, test_set, recipe, seed=0, **kwargs):
        log.append((recipe.mode, recipe.lr, len(train_set), recipe.epochs))
        top1 = 100.0 - 1000 * abs(recipe.lr - BEST[recipe.mode])
        history = [{"epoch": e, "lr": recipe.lr, "train_loss": 1.0 / e, "test_top1": top1}
                   for e in range(1, recipe.epochs + 1)]
        return {"top1": top1, "top5": 100.0, "loss": 1.0, "history": history, "epochs": recipe.epochs}
    return fit


# --------------------------------------------------------------------------- convergence
def test_the_within_run_rise_is_gone():
    """The rise of a cosine schedule within one run is no reading of convergence (it rises however long the run
    is): no function computes it and no table carries it."""
    assert not hasattr(train, "plateau_rise")
    from spvr_lib.paper import convergence, trained_runs
    assert not hasattr(convergence, "plateau_against_base") and not hasattr(convergence, "plateau_table")
    assert "rise over last quarter" not in trained_runs._RUN_COLUMNS
    assert train.last_quarter_start(40) == 30 and train.last_quarter_start(8) == 6 and train.last_quarter_start(2) == 1


def test_eval_every_scores_every_nth_epoch_and_the_ends_of_the_last_quarter():
    r = train.Recipe(epochs=40, batch_size=4, lr=0.1, eval_every=10)
    assert [e for e in range(1, 41) if r.evaluates_after(e)] == [10, 20, 29, 30, 31, 38, 39, 40]
    assert "eval_every" not in train.Recipe(epochs=1, batch_size=4, lr=0.1).to_dict()   # earlier cache keys hold
    assert r.to_dict()["eval_every"] == 10
    with pytest.raises(ValueError, match="eval_every"):
        train.Recipe(epochs=1, batch_size=4, lr=0.1, eval_every=0)
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    ds = torch.utils.data.TensorDataset(x, y)
    out = train.fit(torch.nn.Linear(3, 2), ds, ds, train.Recipe(epochs=12, batch_size=8, lr=0.1, eval_every=5),
                    progress=False)
    assert [h["epoch"] for h in out["history"] if "test_top1" in h] == [5, 8, 9, 10, 11, 12]
    assert out["top1"] == out["history"][-1]["test_top1"]


# --------------------------------------------------------------------------- equal budgets, lr per mode
def test_every_network_gets_the_base_images_and_epochs_and_the_lr_of_its_mode(cache, monkeypatch):
    log = []
    monkeypatch.setattr(train, "fit", fake_fit(log))
    base = base_models.train_base(TINY, "vgg16", progress=False)
    assert base["key"]["recipe"]["lr"] == BEST["scratch"]          # the scratch grid's best, on validation
    assert base_models.scratch_lr(TINY, "vgg16", progress=False)[1] == {0.01: 100.0, 0.05: 60.0}
    lr_ft, scores = pruned_networks.finetune_lr(TINY, "vgg16", progress=False)
    assert lr_ft == BEST["finetune"] and set(scores) == {0.002, 0.02}
    # the searches never saw the test set: they trained on the training images minus the validation split
    n_train = len(data.load_dataset("fashion-mnist", "train", per_class=SETUP.train_subset))
    searches = [entry for entry in log if entry[2] < n_train]
    assert searches and all(n == n_train - 10 for _, _, n, _ in searches)      # 10%: one image per class

    runs = pd.concat([trained_runs.accuracy_runs(TINY, ["vgg16"], ["tp_l1", "spvr"], [0, 1], mode, progress=False)
                      for mode in ("finetune", "scratch")])
    assert (runs["status"] == "ok").all()
    assert (runs["epochs"] == base["key"]["recipe"]["epochs"]).all()
    assert (runs["train images"] == n_train).all() and (runs["test images"] == 20).all()
    assert set(runs.loc[runs["mode"] == "finetune", "lr"]) == {BEST["finetune"]}
    assert set(runs.loc[runs["mode"] == "scratch", "lr"]) == {BEST["scratch"]}
    assert (runs["params"] <= runs["budget"]).all()
    assert ((runs["params removed (%)"] - runs["removed (%)"]).abs() <= 100).all()
    trainings = [entry for entry in log if entry[2] == n_train]
    assert {epochs for *_, epochs in trainings} == {SETUP.epochs}


def test_val_per_class_trials_train_on_the_base_images_and_score_other_training_images(cache, monkeypatch):
    import dataclasses

    from spvr_lib.paper import lr_search

    setup = dataclasses.replace(SETUP, val_per_class=3)
    seen = []

    def fit(model, train_set, test_set, recipe, seed=0, **kwargs):
        seen.append((train_set, test_set))
        return fake_fit([])(model, train_set, test_set, recipe, seed=seed)

    monkeypatch.setattr(train, "fit", fit)
    rec = lr_search.lr_trial(setup, base_models.base_spec(setup), 0.05, progress=False)
    train_part, val_part = seen[0]
    base_images = data.load_dataset("fashion-mnist", "train", per_class=SETUP.train_subset, seed=0)
    assert train_part.indices == base_images.indices        # exactly the images every network of the model gets
    assert len(val_part) == 3 * 10 and not set(val_part.indices) & set(train_part.indices)
    assert torch.bincount(val_part.targets, minlength=10).tolist() == [3] * 10
    assert not val_part.augment                                # scored without augmentation
    assert (rec["train images"], rec["val images"]) == (40, 30)
    assert rec["key"]["val_per_class"] == 3 and "val_fraction" not in rec["key"]
    # the fraction split (val_per_class unset) keeps its earlier cache key
    assert "val_fraction" in lr_search.lr_trial(SETUP, base_models.base_spec(SETUP), 0.05, progress=False)["key"]
    with pytest.raises(ValueError, match="val_per_class=3"):
        lr_search.validation_images(dataclasses.replace(setup, train_subset=None))


def test_an_interrupted_lr_trial_resumes_to_the_same_result_and_counts_its_time(cache, monkeypatch):
    import dataclasses

    from spvr_lib.paper import lr_search

    setup = dataclasses.replace(SETUP, val_per_class=2, epochs=3)
    spec = base_models.base_spec(setup)
    whole = lr_search.lr_trial(setup, spec, 0.05, progress=False)

    class Killed(Exception):
        pass

    real_fit = train.fit

    def fit_killed_after_two_epochs(*args, **kwargs):
        def kill(entry):
            if entry["epoch"] == 2:
                raise Killed()
        return real_fit(*args, **kwargs, on_epoch_end=kill)

    monkeypatch.setenv("SPVR_CACHE", str(cache.parent / "resumed"))
    monkeypatch.setattr(train, "fit", fit_killed_after_two_epochs)
    with pytest.raises(Killed):
        lr_search.lr_trial(setup, spec, 0.05, progress=False)
    checkpoints = list((cache.parent / "checkpoints").glob("lrtrial-*.pt"))
    assert len(checkpoints) == 1                                   # two epochs done, kept for the next attempt
    monkeypatch.setattr(train, "fit", real_fit)
    resumed = lr_search.lr_trial(setup, spec, 0.05, progress=False)
    assert resumed["hash"] == whole["hash"] and resumed["val_top1"] == whole["val_top1"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]
    assert resumed["interrupted_s"] > 0 and "interrupted_s" not in whole
    assert not checkpoints[0].exists()


# --------------------------------------------------------------------------- side by side
def test_side_by_side_trainings_equal_one_after_another(cache, monkeypatch):
    spec = base_models.base_spec(SETUP)
    kw = [dict(spec=spec, dataset="fashion-mnist", recipe=base_models.recipe(SETUP, lr=0.05), seed=s,
               per_class_train=2, per_class_test=1, tag="jobs") for s in (0, 1)]
    failures = jobs.fill_cache(train.train_run, kw, workers=2, progress=False, kwargs={"progress": False})
    assert failures == []
    parallel = [train.train_run(**k, progress=False) for k in kw]          # found in the cache
    used = store.records_used()
    assert all(used[r["hash"]]["computed"] for r in parallel)             # computed for this process, by workers
    assert all(r["provenance"]["device"]["torch_threads"] == 1 for r in parallel)
    assert all(used[r["hash"]]["compute_s"] == store.machine_seconds(r) for r in parallel)

    monkeypatch.setenv("SPVR_CACHE", str(cache.parent / "serial"))
    serial = [train.train_run(**k, progress=False) for k in kw]
    for p, s in zip(parallel, serial):
        assert p["hash"] == s["hash"] and p["top1"] == s["top1"]
        assert [h["train_loss"] for h in p["history"]] == [h["train_loss"] for h in s["history"]]
        wp, ws = train.load_weights(p), train.load_weights(s)
        assert train.state_dict_digest(wp.state_dict()) == train.state_dict_digest(ws.state_dict())


def test_a_failing_job_is_reported_and_not_cached(cache):
    bad = dict(spec={"arch": "nonsense"}, dataset="fashion-mnist", recipe=base_models.recipe(SETUP), seed=0)
    failures = jobs.fill_cache(train.train_run, [bad, bad], workers=2, progress=False)
    assert len(failures) == 2 and all("ValueError" in f for f in failures)
    assert not list(cache.glob("train-*.json")) if cache.exists() else True


def test_worker_count_reads_the_scale_and_the_environment(monkeypatch):
    monkeypatch.delenv("SPVR_WORKERS", raising=False)
    assert jobs.worker_count(TINY) == 1 and jobs.worker_count(scales.get_scale("cpu")) == min(2, os.cpu_count())
    monkeypatch.setenv("SPVR_WORKERS", "1")
    assert jobs.worker_count(scales.get_scale("cpu")) == 1
    monkeypatch.setenv("SPVR_WORKERS", "two")
    with pytest.raises(ValueError, match="SPVR_WORKERS='two'"):
        jobs.worker_count(TINY)


def test_cpu_scale_gives_every_network_of_a_model_one_budget():
    cfg = scales.get_scale("cpu")
    for key, setup in cfg.models.items():
        assert setup.test_subset is None                       # the whole 10,000-image test set
        assert len(cfg.seeds) == 3 and len(setup.compare_rates) >= 2
        assert max(setup.compare_rates) == max(k[1] for k in reference.PAPER_TABLE1 if k[0] == key)
        assert setup.table3_rate in setup.compare_rates        # Table 3's fine-tuned runs are Table 1's
        assert not hasattr(setup, "base_epochs")               # no separate budget for the base network
        assert base_models.recipe(setup).epochs == setup.epochs
        assert models.count_params(models.build(base_models.base_spec(setup))) > 0


def test_same_ranking_ignores_only_swaps_of_groups_equal_to_the_tolerance():
    from spvr_lib.paper.bench import same_ranking

    naive = torch.tensor([1.0, 2.0, 2.00001, 5.0])
    assert same_ranking(naive, naive.clone()) == (True, 0)
    near = torch.tensor([1.0, 2.00001, 2.0, 5.0])       # 2.0 and 2.00001 differ by 5e-6 relative: a near tie
    assert same_ranking(naive, near) == (True, 1)
    far = torch.tensor([2.5, 2.0, 2.00001, 5.0])        # 1.0 now ranks above 2.0: a real disagreement
    assert same_ranking(naive, far)[0] is False
    assert same_ranking(naive, near, rtol=1e-7)[0] is False
    with pytest.raises(ValueError, match="same groups"):
        same_ranking(naive, naive[:2])


def test_amp_table_trains_the_base_with_and_without_bfloat16(cache, monkeypatch):
    import dataclasses

    log = []
    monkeypatch.setattr(train, "fit", fake_fit(log))
    cfg = scales.Scale(name="smoke", seeds=(0,), models={"vgg16": dataclasses.replace(SETUP, amp=True),
                                                          "other": SETUP})
    table = base_models.amp_table(cfg, ["vgg16", "other"])
    assert list(table["model"]) == ["vgg16"]                   # only models that train in bfloat16
    on = base_models.train_base(cfg, "vgg16", progress=False)
    off = base_models.train_base(cfg, "vgg16", progress=False, amp=False)
    assert on["key"]["recipe"]["amp"] is True and off["key"]["recipe"]["amp"] is False and on["hash"] != off["hash"]
    assert table.iloc[0]["top1 bf16"] == on["top1"] and table.iloc[0]["top1 float32"] == off["top1"]


# --------------------------------------------------------------------------- convergence on the budget
def test_short_epochs_leaves_out_the_last_quarter():
    from spvr_lib.paper.convergence import short_epochs

    assert [short_epochs(e) for e in (1, 2, 4, 80, 160, 200)] == [1, 1, 3, 60, 120, 150]
    with pytest.raises(ValueError, match="epochs=0"):
        short_epochs(0)


def test_budget_gain_pairs_the_runs_by_seed():
    from spvr_lib.paper.convergence import budget_gain

    g = budget_gain({0: 80.0, 1: 81.0, 2: 82.0, 7: 50.0}, {0: 80.5, 1: 81.1, 2: 82.3})
    assert g["seeds"] == [0, 1, 2]                              # seed 7 has no full-budget twin
    assert g["gain"] == pytest.approx(0.3)                      # mean of 0.5, 0.1, 0.3
    assert g["gain sd"] == pytest.approx(0.2) and g["gain se"] == pytest.approx(round(0.2 / 3 ** 0.5, 3))
    one = budget_gain({0: 80.0}, {0: 79.5})
    assert one["gain"] == pytest.approx(-0.5) and one["gain sd"] is None and one["gain se"] is None
    with pytest.raises(ValueError, match="at least one seed in both"):
        budget_gain({0: 1.0}, {1: 1.0})


def test_convergence_table_trains_each_seed_at_three_quarters_all_and_twice_the_epochs(cache, monkeypatch):
    import dataclasses

    from spvr_lib.paper import convergence

    log = []

    def fit(model, train_set, test_set, recipe, seed=0, **kwargs):       # top-1 = epochs/10 + seed
        log.append((recipe.epochs, seed, recipe.lr))
        top1 = recipe.epochs / 10 + seed
        history = [{"epoch": e, "lr": recipe.lr, "train_loss": 1.0, "test_top1": e / 10 + seed}
                   for e in range(1, recipe.epochs + 1)]
        return {"top1": top1, "top5": 100.0, "loss": 1.0, "history": history, "epochs": recipe.epochs}

    monkeypatch.setattr(train, "fit", fit)
    cfg = dataclasses.replace(TINY, models={"vgg16": dataclasses.replace(SETUP, epochs=4)}, convergence_factor=2)
    # no shorter run at twice the epochs: 3/4, all and twice the epochs per seed
    assert [(j[1], j[2], j[3]) for j in convergence.budget_jobs(cfg, ["vgg16"])] == \
        [("vgg16", 4, 0), ("vgg16", 3, 0), ("vgg16", 8, 0), ("vgg16", 4, 1), ("vgg16", 3, 1), ("vgg16", 8, 1)]
    table = convergence.convergence_table(cfg, ["vgg16"], progress=False)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["epochs"], row["shorter epochs"], row["seeds"]) == (4, 3, 2)
    assert row["gain of last quarter"] == pytest.approx(0.1) and row["gain se"] == 0
    assert row["top1"] == pytest.approx(0.9) and row["top1 at shorter"] == pytest.approx(0.8)
    assert row["top1 at 2x epochs"] == pytest.approx(1.3)               # (0.8 + 1.8) / 2
    assert row["gain of 2x epochs"] == pytest.approx(0.4) and row["gain of 2x se"] == 0
    assert bool(row["plateau on the budget"]) and not bool(row["plateau at 2x"])   # 0.1 <= 0.3 < 0.4
    # within the run (4 epochs): mean of the last three (0.2, 0.3, 0.4) minus the epochs around epoch 3 that
    # end before them (none), so no reading
    assert "rise within run" not in row
    no_factor = convergence.convergence_table(dataclasses.replace(cfg, convergence_factor=None), ["vgg16"],
                                              progress=False)
    assert not [c for c in no_factor.columns if "2x" in c]
    # the full budgets ARE the base runs (and the longer base runs of base_table)
    assert convergence.base_with_epochs(cfg, "vgg16", 4, 1, progress=False)["hash"] == \
        base_models.train_base(cfg, "vgg16", 1, progress=False)["hash"]
    assert convergence.base_with_epochs(cfg, "vgg16", 8, 0, progress=False)["hash"] == \
        base_models.train_base(cfg, "vgg16", 0, progress=False, epochs_factor=2)["hash"]
    lr = base_models.scratch_lr(cfg, "vgg16", progress=False)[0]
    assert sorted({(e, s) for e, s, r in log if r == lr}) == [(e, s) for e in (3, 4, 8) for s in (0, 1)]
    with pytest.raises(ValueError, match="published weights"):
        convergence.base_with_epochs(dataclasses.replace(cfg, models={"vgg16": dataclasses.replace(
            SETUP, pretrained="IMAGENET1K_V1")}), "vgg16", 4)


def test_jobs_are_submitted_longest_first_and_stably():
    jobs_ = [("a", 1.0), ("b", 3.0), ("c", 1.0), ("d", 2.0)]
    assert jobs.longest_first(jobs_, None) == jobs_
    assert jobs.longest_first(jobs_, lambda j: j[1]) == [("b", 3.0), ("d", 2.0), ("a", 1.0), ("c", 1.0)]


def test_training_cost_orders_the_cpu_trainings_by_epochs_and_kept_parameters():
    cfg = scales.get_scale("cpu")
    keys = list(cfg.models)
    runs = [(k, r) for k in keys for r in cfg.model(k).compare_rates]
    order = jobs.longest_first(runs, lambda j: trained_runs.training_cost(cfg, *j))
    epochs = [cfg.model(k).epochs for k, _ in order]
    assert epochs == sorted(epochs, reverse=True)                  # the longest recipe first
    for k in keys:                                                  # within a model: the larger network first
        rates = [r for kk, r in order if kk == k]
        assert rates == sorted(rates)
    assert trained_runs.training_cost(cfg, keys[0], 0.9) == (cfg.model(keys[0]).epochs, pytest.approx(0.1))


