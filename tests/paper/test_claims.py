"""Notebook 13: each claim judged from hand-made tables, and the staleness of a table that read others."""
import json

import pandas as pd

from spvr_lib.paper import claims, provenance


def test_layer_count_reads_the_papers_notation():
    assert claims.layer_count('36, 62, "M", 78, 112, "M", 92, 44, 46, "M"') == 7                # Table 6, 98%
    assert claims.layer_count("[60, 60] × 3, [36, 36] × 4, [44, 44] × 3") == 20                  # Table 7, 98%
    assert claims.layer_count("[56, 56, 56] × 3, [88, 88, 88] × 4, [64, 64, 64] × 6") == 39      # Table 8, 95%


def test_verdict_of_per_cell_outcomes():
    assert claims.verdict_of(["holds", "holds"]) == "reproduced"
    assert claims.verdict_of(["holds", "fails"]) == "partly reproduced"
    assert claims.verdict_of(["fails", "fails"]) == "not reproduced"
    assert claims.verdict_of(["holds", "undecided"]) == "undecided (< 2 seeds)"
    assert claims.verdict_of([]) == "missing"
    # a cell resting on a network not converged on its budget is judged, and the verdict says so
    assert claims.verdict_of(["holds", "holds", "fails"], 2) == "partly reproduced (2 of 3 cells not converged)"


def write(folder, stem, rows):
    pd.DataFrame(rows).to_csv(folder / f"{stem}.csv", index=False)


def tau(spvr, kl, n=10):
    return [{"criterion": "SPvR", "tau_mean": spvr, "tau_std": 0.03, "n_seeds": n},
            {"criterion": "KL", "tau_mean": kl, "tau_std": 0.04, "n_seeds": n}]


def mobile(pruned_top1, pruned_params=22_000):
    row = lambda name, top1, params, std: {"model": name, "params": params, "top1": top1, "top1 std": std,  # noqa: E731
                                            "n seeds": 3}
    return [row("MobileNetV3-small", 81.7, 43_794, 0.9), row("MobileNetV3-minimal", 78.0, 28_266, 0.2),
            row("ResNet50-pruned", pruned_top1, pruned_params, 0.5)]


def test_claims_are_judged_by_the_comparison_rule_and_missing_tables_are_named(tmp_path):
    write(tmp_path, "worked_example", {"L (ours)": [1.3, 0.29, 1.5], "L (paper)": [1.3, 0.29, 1.5]})
    write(tmp_path, "table5_kendall_tau", tau(0.80, 0.58))
    write(tmp_path, "table4_mobilenet", mobile(82.0))
    table, inputs = claims.claims_table(tmp_path)
    assert list(table.columns) == list(claims.COLUMNS) and len(table) == len(claims.CLAIMS)
    got = table.set_index(["claim"]).groupby(level=0)["verdict"].apply(list).to_dict()
    assert got["Section 3.1.1"] == ["reproduced"] and got["Table 5"] == ["reproduced"]
    # pruned 82.0 ± 0.5 against small 81.7 ± 0.9: within noise, so on par (holds); against minimal 78.0 ± 0.2:
    # better beyond the noise with fewer parameters (holds)
    assert got["Table 4"] == ["reproduced", "reproduced"]
    assert got["Table 1"] == ["missing"] and got["Section 5.5"] == ["missing"]
    assert "table1_accuracy.csv not produced" in table.set_index("claim").loc["Table 1", "ours"]
    assert set(inputs) == {"worked_example.csv", "table5_kendall_tau.csv", "table4_mobilenet.csv"}
    assert all(len(sha) == 64 for sha in inputs.values())

    write(tmp_path, "table5_kendall_tau", tau(0.60, 0.58))           # a tie inside the noise does not hold
    write(tmp_path, "table4_mobilenet", mobile(78.2, pruned_params=30_000))   # more parameters than minimal
    got = claims.claims_table(tmp_path)[0].set_index("claim").groupby(level=0)["verdict"].apply(list).to_dict()
    assert got["Table 5"] == ["not reproduced"]
    assert got["Table 4"] == ["not reproduced", "not reproduced"]     # below small beyond the noise; more params
    write(tmp_path, "table5_kendall_tau", tau(0.80, 0.58, n=1))      # one seed: no spread to judge by
    got = claims.claims_table(tmp_path)[0].set_index("claim")
    assert got.loc["Table 5", "verdict"] == "undecided (< 2 seeds)"


def test_table1_cells_count_only_spvr_better_as_holding(tmp_path):
    rows = [{"model": "vgg16", "metric": "top1", "params removed (%)": 90.0, "source": "ours (cpu)",
             "verdict": "SPvR better"},
            {"model": "vgg16", "metric": "top1", "params removed (%)": 98.0, "source": "ours (cpu)",
             "verdict": "within noise"},
            {"model": "vgg16", "metric": "top1", "params removed (%)": 98.0, "source": "paper", "verdict": None},
            {"model": "vgg16", "metric": "top5", "params removed (%)": 98.0, "source": "ours (cpu)",
             "verdict": "CURL better"}]
    write(tmp_path, "table1_accuracy", rows)
    row = claims.claims_table(tmp_path)[0].set_index("claim").loc["Table 1"]
    assert row["verdict"] == "partly reproduced"
    assert row["ours"] == "VGG16 90%: SPvR better; VGG16 98%: within noise"
    assert row["paper"] == "SPvR best in 2 of these 2 cells"           # the paper's VGG16 rows at 90% and 98%


def test_an_artifact_that_read_a_changed_or_stale_table_is_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    run = provenance.NotebookRun("99_test", "cpu")
    run.table(pd.DataFrame({"a": [1]}), "t")
    folder = tmp_path / "figures" / "cpu"
    run.table(pd.DataFrame({"b": [2]}), "summary", inputs={"t.csv": provenance.file_sha256(folder / "t.csv")})
    run.close()
    assert provenance.stale_artifacts("cpu") == []
    (folder / "t.csv").write_text("a\n5\n")                             # t edited by hand: both are stale
    stale = {s["artifact"]: s["reasons"] for s in provenance.stale_artifacts("cpu")}
    assert stale["t"] == ["t.csv differs from its recorded sha256"]
    assert "input t.csv changed" in stale["summary"] and "reads stale t.csv" in stale["summary"]
    prov = json.loads((folder / "t.provenance.json").read_text())      # t's code changed, its files did not:
    prov["code"] = {"spvr_lib/paper/no_such_file.py": "0" * 64}
    (folder / "t.csv").write_text("a\n1\n")
    (folder / "t.provenance.json").write_text(json.dumps(prov))
    stale = {s["artifact"]: s["reasons"] for s in provenance.stale_artifacts("cpu")}
    assert stale["summary"] == ["reads stale t.csv"]                    # the summary is stale through it


def test_vgg16_at_90_percent_loses_less_than_a_point_only_with_seeds_to_show_it(tmp_path):
    write(tmp_path, "base_models", [{"model": "vgg16", "top1": 88.0}])
    spvr = {"model": "vgg16", "rate": 0.9, "method": "spvr", "top1 mean": 87.5, "top1 std": 0.2, "n_ok": 3,
            "top1 seeds": "87.30 / 87.50 / 87.70", "classifier inputs": 1, "narrowest layer": "features.40: 1"}
    write(tmp_path, "table1_accuracy_numeric", [spvr])
    write(tmp_path, "table1_accuracy", [{"model": "vgg16", "metric": "top1", "params removed (%)": 90.0,
                                         "source": "ours (cpu)", "verdict": "SPvR better",
                                         "converged": "not converged: SPvR gains +0.62"}])
    row = claims.claims_table(tmp_path)[0].set_index("claim").loc["Abstract, Table 1"]
    assert (row["verdict"], row["paper"]) == ("reproduced (1 of 1 cells not converged)", "94.25 → 94.43 (+0.18)")
    assert row["ours"] == ("88.00 → 87.50 ± 0.20 (-0.50; seeds 87.30 / 87.50 / 87.70); its classifier sees 1 "
                           "feature(s), narrowest layer features.40: 1 (not converged: SPvR gains +0.62)")
    write(tmp_path, "table1_accuracy_numeric", [{**spvr, "top1 mean": 86.5}])
    assert claims.claims_table(tmp_path)[0].set_index("claim").loc["Abstract, Table 1", "verdict"].startswith(
        "not reproduced")
    write(tmp_path, "table1_accuracy_numeric", [{**spvr, "n_ok": 1}])
    assert claims.claims_table(tmp_path)[0].set_index("claim").loc["Abstract, Table 1", "verdict"].startswith(
        "undecided (< 2 seeds)")


def test_table1_cells_are_judged_by_their_interval_and_unconverged_networks_qualify_them(tmp_path):
    cell = lambda removed, verdict, best, interval, conv: {  # noqa: E731
        "model": "vgg16", "metric": "top1", "params removed (%)": removed, "source": "ours (cpu)",
        "verdict": verdict, "best baseline": best, "95% interval": interval, "converged": conv}
    write(tmp_path, "table1_accuracy", [cell(80.0, "SPvR better", "CURL", "+1.20 [+0.40, +2.00]", "yes"),
                                        cell(90.0, "Taylor better", "Taylor", "-2.00 [-3.10, -0.90]",
                                             "not converged: SPvR gains +0.45"),
                                        cell(98.0, "within noise", "CURL", "+0.30 [-0.80, +1.40]", "yes")])
    row = claims.claims_table(tmp_path)[0].set_index("claim").loc["Table 1"]
    assert row["verdict"] == "partly reproduced (1 of 3 cells not converged)"        # never left out
    assert row["ours"] == ("VGG16 80%: SPvR better (SPvR - CURL +1.20 [+0.40, +2.00]); VGG16 90%: Taylor better "
                           "(SPvR - Taylor -2.00 [-3.10, -0.90]) (not converged: SPvR gains +0.45); VGG16 98%: "
                           "within noise (SPvR - CURL +0.30 [-0.80, +1.40])")
    assert row["evidence"] == "table1_accuracy"


def test_table2_reads_both_sets_and_says_what_each_network_is(tmp_path):
    cell = lambda model, set_, removed, interval, verdict, conv: {  # noqa: E731
        "model": model, "set": set_, "metric": "top1", "params removed (%)": removed, "95% interval": interval,
        "verdict": verdict, "status": "ok", "narrowest layer": "features.3: 2", "converged": conv}
    write(tmp_path, "table2_finetune_vs_scratch", [
        cell("vgg16", "rule", 85.0, "+11.12 [+4.00, +18.24]", "TFS better", "not converged: FT gains +0.90"),
        cell("vgg16", "paper's rate", 60.0, "-0.20 [-0.90, +0.50]", "within noise", "yes")])
    row = claims.claims_table(tmp_path)[0].set_index("claim").loc["Table 2"]
    assert row["verdict"] == "partly reproduced (1 of 2 cells not converged)"
    assert row["ours"] == ("VGG16 85% (rule): TFS - FT +11.12 [+4.00, +18.24] (TFS better); narrowest layer "
                           "features.3: 2 (not converged: FT gains +0.90); VGG16 60% (paper's rate): TFS - FT -0.20 "
                           "[-0.90, +0.50] (within noise); narrowest layer features.3: 2")
    assert row["paper"] == "TFS - FT: VGG16 60%: +0.85"


def test_table3_reads_only_the_scratch_rows(tmp_path):
    write(tmp_path, "table3_architecture", [
        {"model": "vgg16", "metric": "top1", "params removed (%)": 90.0, "rows": "scratch (Table 3)",
         "verdict": "SPvR better", "best baseline": "RCP", "95% interval": "+1.00 [+0.20, +1.80]", "converged": "yes"},
        {"model": "vgg16", "metric": "top1", "params removed (%)": 90.0, "rows": "Table 1 (baselines fine-tuned)",
         "verdict": "RCP better", "best baseline": "RCP", "95% interval": "-1.00 [-1.80, -0.20]", "converged": None}])
    row = claims.claims_table(tmp_path)[0].set_index("claim").loc["Table 3"]
    assert (row["verdict"], row["ours"]) == ("reproduced", "VGG16 90%: SPvR better (SPvR - RCP +1.00 [+0.20, +1.80])")


def test_table4_reads_its_networks_on_their_budget(tmp_path):
    write(tmp_path, "table4_mobilenet", mobile(82.0))
    budget = lambda name, gain: {"model": "resnet50", "name": name, "epochs": 800,  # noqa: E731
                                 "shorter epochs": 600, "gain of last quarter": gain,
                                 "plateau on the budget": gain <= 0.3}
    write(tmp_path, "table4_convergence", [budget("MobileNetV3-small", 0.5), budget("MobileNetV3-minimal", -0.2),
                                           budget("ResNet50-pruned", 0.1)])
    got = claims.claims_table(tmp_path)[0]
    small, minimal = got[got["claim"] == "Table 4"].itertuples(index=False)
    assert small.verdict == "reproduced (1 of 1 cells not converged)"      # judged, and qualified
    assert "within noise (not converged: MobileNetV3-small); ResNet50-pruned gains +0.10" in small.ours
    assert minimal.verdict == "reproduced"                        # both converged on their budget
    assert minimal.evidence == "table4_mobilenet, table4_convergence"


def test_figure2_robustness_compares_the_best_and_worst_d_that_meet_the_rate(tmp_path):
    def cell(d, top1, status="ok", gain=0.1):
        return {"model": "vgg16", "d": d, "top1 (fast)": top1, "top1 std (fast)": 0.5, "n seeds (fast)": 3,
                "prune s (fast)": 10.0 / d, "status": status, "gain on budget (fast)": gain}
    write(tmp_path, "figure2_group_size", [cell(1, 86.0), cell(2, 85.8, gain=0.6),
                                           cell(4, 70.0, status="not compared: removes 99.69% (the rate 98% ± 1 point)")])
    row = claims.claims_table(tmp_path)[0].set_index(["claim", "paper says"]).xs("Figure 2").iloc[0]
    assert row["verdict"] == "reproduced (1 of 1 cells not converged)"    # d = 4 misses the rate: not compared
    expected = claims.stats.compare_summary(86.0, 0.5, 3, 85.8, 0.5, 3, "a", "b").interval_text()
    assert row["ours"] == (f"VGG16 top1: best d 1 - worst d 2 = {expected}, within noise (not converged: d = 2 gains "
                           "+0.60); d = 4 not compared (misses the rate)")
    write(tmp_path, "figure2_group_size", [cell(1, 86.0), cell(2, 70.0)])
    row = claims.claims_table(tmp_path)[0].set_index(["claim", "paper says"]).xs("Figure 2").iloc[0]
    assert row["verdict"] == "not reproduced"


def test_segmentation_says_when_ours_is_a_different_result(tmp_path):
    def seg(miou, std, seeds):
        return {"dataset": "scenes", "mIoU": miou, "mIoU std": std, "n seeds": 3, "mIoU seeds": seeds}
    write(tmp_path, "segmentation", [seg(66.98, 2.43, "64.2 / 68.2 / 68.5"), seg(69.11, 0.71, "68.5 / 69.9 / 68.9")])
    write(tmp_path, "segmentation_convergence", [{"epochs": 100, "shorter epochs": 75, "gain of last quarter": -0.03,
                                                  "plateau on the budget": True}])
    row = claims.claims_table(tmp_path)[0].set_index("claim").loc["Section 5.5"]
    # the paper loses 4.7 mIoU; our interval of pruned - unpruned lies above -4.7: a different result, said so
    assert row["verdict"] == "different result"
    assert "the paper loses 4.7 points, ours loses none" in row["ours"]
    write(tmp_path, "segmentation", [seg(67.0, 0.5, "-"), seg(62.5, 0.5, "-")])
    assert claims.claims_table(tmp_path)[0].set_index("claim").loc["Section 5.5", "verdict"] == "reproduced"
    write(tmp_path, "segmentation", [seg(67.0, 0.5, "-"), seg(50.0, 0.5, "-")])
    assert claims.claims_table(tmp_path)[0].set_index("claim").loc["Section 5.5", "verdict"] == "not reproduced"


def test_table2_does_not_count_a_network_that_cannot_be_fine_tuned(tmp_path):
    write(tmp_path, "table2_finetune_vs_scratch", [
        {"model": "resnet50", "set": "rule", "metric": "top1", "params removed (%)": 85.0, "status": "ok",
         "95% interval": "+1.00 [+0.20, +1.80]", "verdict": "TFS better", "converged": "yes"},
        {"model": "resnet50", "set": "paper's rate", "metric": "top1", "params removed (%)": 90.0, "status": "ok",
         "95% interval": "n/a", "verdict": "n/a (no fine-tuning: layers collapsed)", "TFS": "85.00 ± 0.10 (...)"}])
    row = claims.claims_table(tmp_path)[0].set_index("claim").loc["Table 2"]
    assert row["verdict"] == "reproduced"
    assert "ResNet50 90% (paper's rate): not compared, its layers collapsed" in row["ours"]


def test_latency_claims_count_only_separated_intervals_and_name_the_compute_bound_batch(tmp_path):
    rows = [{"model": "resnet34", "params removed (%)": r, "batch size": b, "SPvR fastest": f,
             "slower than unpruned": s} for r, b, f, s in [(90.0, 1, "yes", "none"), (98.0, 1, "tied with ℓ1", "CURL"),
                                                          (90.0, 64, "no", "none"), (98.0, 64, "yes", "none")]]
    write(tmp_path, "figure1_latency_claims", rows)
    got = claims.claims_table(tmp_path)[0]
    fastest, curl = got[got["claim"] == "Figure 1"].itertuples(index=False)
    assert fastest.verdict == "partly reproduced"                 # a tie is not "fastest"
    assert fastest.ours == ("ResNet34: fastest at 1 of 2 rates (90%), tied at 1 (batch 1, this CPU; faster only "
                            "where the 95% intervals of the medians separate); at batch 64, where compute dominates: "
                            "fastest in 1 of 2 cells")
    assert curl.verdict == "partly reproduced" and curl.ours.startswith("CURL slower than unpruned in 1 of 2 cells")
