"""What reproduced and what did not: each claim of the paper, its number beside ours and a verdict, read
from the tables the other notebooks wrote under ``figures/<scale>/`` (notebook 13).

Nothing is computed here but comparisons of committed numbers: every row names the tables it read
(``evidence``), and the artifact's provenance lists their sha256, so it goes stale when one of them
changes.  Verdicts follow the one comparison rule (:data:`spvr_lib.paper.stats.RULE`: the difference with its
95% Welch interval, "better" only where the interval excludes 0) wherever seeds give a spread:

* ``reproduced``: the claim holds in every cell it covers here;
* ``partly reproduced``: in some cells, not all (a difference inside the noise does not hold);
* ``not reproduced``: in none;
* ``different result``: the paper's effect is not seen, and ours points the other way (said so, with both numbers);
* ``undecided (< 2 seeds)``: no spread to judge by (the smoke scale);
* ``... (k of n cells not converged)``: a cell one of whose deciding networks gains more than 0.3 points from the
  last quarter of its budget (read on the budget: trained again with 3/4 of the epochs; the tables' ``converged``
  column) is still judged, and the verdict says how many such cells it rests on;
* ``missing``: a table it needs was not produced (its reason in ``ours``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from spvr_lib.paper import reference, scales, stats
from spvr_lib.store import file_sha256

COLUMNS = ("claim", "paper says", "paper", "ours", "verdict", "evidence")
MODEL_NAMES = {"vgg16": "VGG16", "resnet34": "ResNet34", "resnet50": "ResNet50"}


class _Missing(Exception):
    """A table a claim needs is not under figures/<scale>/."""


def verdict_of(outcomes: Sequence[str], unconverged: int = 0) -> str:
    """One verdict from per-cell outcomes, each "holds", "fails" (a difference inside the noise fails too) or
    "undecided": reproduced when every cell holds, not reproduced when none does, partly otherwise;
    "undecided (< 2 seeds)" when any cell could not be judged, "missing" when there are no cells.
    ``unconverged``: how many of the cells rest on a network not converged on its budget (said, never left out)."""
    if not outcomes:
        return "missing"
    if any(o == "undecided" for o in outcomes):
        verdict = "undecided (< 2 seeds)"
    else:
        held = sum(o == "holds" for o in outcomes)
        verdict = "reproduced" if held == len(outcomes) else "not reproduced" if held == 0 else "partly reproduced"
    return verdict + (f" ({unconverged} of {len(outcomes)} cells not converged)" if unconverged else "")


def layer_count(architecture: str) -> int:
    """Convolution layers of an architecture in the paper's notation (Tables 6-8): VGG's comma list
    ('64, 64, "M", 128') counts its numbers; ResNet's stages ("[64, 64] × 3, [128, 128] × 4") count
    widths per block times blocks."""
    stages = re.findall(r"\[([^\]]*)\]\s*[×x]\s*(\d+)", architecture)
    if stages:
        return sum(len([w for w in body.split(",") if w.strip()]) * int(n) for body, n in stages)
    return len(re.findall(r"(?<![\w\"])\d+(?![\w\"])", architecture))


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{float(x):.{nd}f}"


def _pm(mean: Any, std: Any, nd: int = 2) -> str:
    s = _fmt(mean, nd)
    return s if _fmt(std, nd) == "-" else f"{s} ± {_fmt(std, nd)}"


def _rate(r: float) -> str:
    return f"{100 * float(r):g}%"


def _true(x: Any) -> bool:
    """A boolean cell as read from a CSV (True / "True"; NaN, None and "False" are not)."""
    return str(x).strip().lower() == "true"


def _false(x: Any) -> bool:
    """A boolean cell as read from a CSV that says False (NaN and None, no reading, do not)."""
    return str(x).strip().lower() == "false"


def _outcome(cmp: stats.Comparison, holds_if: str) -> str:
    """A cell's outcome from a comparison: "holds" where its verdict is ``holds_if`` ("X better")."""
    return "undecided" if cmp.diff is None else "holds" if cmp.verdict == holds_if else "fails"


def _converged(cell: Any) -> tuple[bool, str]:
    """(whether the cell rests on a network not converged on its budget, the note its description gets) from a
    table's ``converged`` column ("yes", "not converged: ...", "not read", or absent)."""
    text = str(cell) if cell is not None and not (isinstance(cell, float) and math.isnan(cell)) else ""
    if text.startswith("not converged"):
        return True, f" ({text})"
    return False, "" if text in ("", "yes") else f" (convergence {text})"


class _Tables:
    """The CSVs of one figures folder, read once each; remembers which it read (the evidence)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.read = folder, {}

    def __call__(self, stem: str) -> pd.DataFrame:
        path = self.folder / f"{stem}.csv"
        if not path.exists():
            raise _Missing(f"{stem}.csv not produced")
        if stem not in self.read:
            self.read[stem] = pd.read_csv(path)
        return self.read[stem]

    def evidence(self, *stems: str) -> str:
        """The claim's ``evidence``: those of ``stems`` that were read, in order."""
        return ", ".join(s for s in stems if s in self.read)



# --------------------------------------------------------------------------- the claims, one function each
def _worked_example(t: _Tables) -> dict[str, Any]:
    df = t("worked_example")
    same = all(abs(o - p) < 0.005 for o, p in zip(df["L (ours)"], df["L (paper)"]))
    return {"claim": "Section 3.1.1", "paper says": "Eq. 2 scores the three neurons of the worked example L = 1.3, "
            "0.29, 1.5 and ranks them differently from KL",
            "paper": "L = " + ", ".join(_fmt(v) for v in df["L (paper)"]),
            "ours": "L = " + ", ".join(_fmt(v) for v in df["L (ours)"]),
            "verdict": "reproduced" if same else "not reproduced", "evidence": "worked_example"}


def _table5(t: _Tables) -> dict[str, Any]:
    df = t("table5_kendall_tau").set_index("criterion")
    s, k = df.loc["SPvR"], df.loc["KL"]
    cmp = stats.compare_summary(s["tau_mean"], s["tau_std"], s["n_seeds"], k["tau_mean"], k["tau_std"],
                                k["n_seeds"], "SPvR", "KL")
    return {"claim": "Table 5", "paper says": "Eq. 2 ranks the neurons closer to the ground truth than KL "
            "(Kendall tau, Guyon data)",
            "paper": f"SPvR {_fmt(reference.TABLE5_PAPER['SPvR'], 3)}, KL {_fmt(reference.TABLE5_PAPER['KL'], 3)}",
            "ours": f"SPvR {_pm(s['tau_mean'], s['tau_std'], 3)}, KL {_pm(k['tau_mean'], k['tau_std'], 3)} "
                    f"({int(s['n_seeds'])} seeds): {cmp.interval_text()}, {cmp.verdict}",
            "verdict": verdict_of([_outcome(cmp, "SPvR better")]),
            "evidence": "table5_kendall_tau"}


def _compared_cells(rows: pd.DataFrame) -> tuple[list[str], int, list[str]]:
    """Outcomes, the number of cells resting on a network not converged, and descriptions of a table's compared
    rows (columns verdict, SPvR - best, 95% interval, converged)."""
    outcomes, parts, late = [], [], 0
    for _, r in rows.iterrows():
        v = str(r["verdict"])
        outcomes.append("undecided" if v.startswith("n/a") else "holds" if v == "SPvR better" else "fails")
        unconverged, note = _converged(r.get("converged"))
        late += unconverged
        diff = f" (SPvR - {r['best baseline']} {r['95% interval']})" if pd.notna(r.get("95% interval")) else ""
        parts.append(f"{MODEL_NAMES.get(r['model'], r['model'])} {_rate(r['params removed (%)'] / 100)}: {v}{diff}"
                     f"{note}")
    return outcomes, late, parts


def _paper_best(table: dict, cells: Sequence[tuple[str, float]]) -> str:
    """In how many of ``cells`` (model, rate) the paper's ``table`` ({(model, rate, method): {"top1"}}) prints
    SPvR's top-1 as the best of the methods it reports there."""
    best = 0
    for key, rate in cells:
        vals = {m: v["top1"] for (k, r, m), v in table.items() if (k, r) == (key, round(rate, 6)) and m != "base"
                and v.get("top1") is not None}
        best += bool(vals) and vals.get("spvr") == max(vals.values())
    return f"SPvR best in {best} of these {len(cells)} cells"


def _spvr_best(t: _Tables, claim: str, says: str, stem: str, row_filter: Callable[[pd.DataFrame], Any],
               paper_table: dict) -> dict[str, Any]:
    """A claim that SPvR is the best method in every top-1 cell of a table with a "verdict" column."""
    df = t(stem)
    ours = df[row_filter(df) & (df["metric"] == "top1")]
    outcomes, late, parts = _compared_cells(ours)
    cells = [(k, r / 100) for k, r in zip(ours["model"], ours["params removed (%)"])]
    return {"claim": claim, "paper says": says, "paper": _paper_best(paper_table, cells),
            "ours": "; ".join(parts), "verdict": verdict_of(outcomes, late), "evidence": t.evidence(stem)}


def _table1(t: _Tables) -> dict[str, Any]:
    return _spvr_best(t, "Table 1", "at equal parameter budgets SPvR's network (trained from scratch) beats every "
                      "baseline (fine-tuned), at every rate", "table1_accuracy",
                      lambda df: df["source"].astype(str).str.startswith("ours"), reference.PAPER_TABLE1)


def _drop_at_90(t: _Tables) -> dict[str, Any]:
    df = t("table1_accuracy_numeric")
    base = t("base_models").set_index("model")["top1"]
    row = df[(df["model"] == "vgg16") & (df["method"] == "spvr") & ((df["rate"] - 0.9).abs() < 1e-9)]
    if row.empty:
        raise _Missing("no SPvR run of VGG16 at 90% in table1_accuracy_numeric.csv")
    r = row.iloc[0]
    drop = float(base["vgg16"]) - float(r["top1 mean"])
    paper = reference.PAPER_TABLE1[("vgg16", 0.0, "base")]["top1"] - reference.PAPER_TABLE1[("vgg16", 0.9, "spvr")]["top1"]
    outcome = "undecided" if int(r["n_ok"]) < 2 else "holds" if drop < 1.0 else "fails"
    shape = ""
    if "classifier inputs" in r and pd.notna(r["classifier inputs"]):
        shape = f"; its classifier sees {int(r['classifier inputs'])} feature(s), narrowest layer {r['narrowest layer']}"
    late, note = False, ""
    cells = t("table1_accuracy")
    cell = cells[(cells["model"] == "vgg16") & (cells["metric"] == "top1") & (cells["params removed (%)"] == 90.0)
                 & cells["source"].astype(str).str.startswith("ours")]
    if len(cell):
        late, note = _converged(cell.iloc[0].get("converged"))
    return {"claim": "Abstract, Table 1", "paper says": "with 90% of VGG16's parameters removed, SPvR's network "
            "loses less than 1 point of top-1",
            "paper": f"{_fmt(reference.PAPER_TABLE1[('vgg16', 0.0, 'base')]['top1'])} → "
                     f"{_fmt(reference.PAPER_TABLE1[('vgg16', 0.9, 'spvr')]['top1'])} ({-paper:+.2f})",
            "ours": f"{_fmt(base['vgg16'])} → {_pm(r['top1 mean'], r['top1 std'])} ({-drop:+.2f}; seeds "
                    f"{r.get('top1 seeds')}){shape}{note}",
            "verdict": verdict_of([outcome], int(late)),
            "evidence": t.evidence("table1_accuracy_numeric", "base_models", "table1_accuracy")}


def _table2(t: _Tables) -> dict[str, Any]:
    df = t("table2_finetune_vs_scratch")
    df = df[df["metric"] == "top1"]
    outcomes, ours, paper, late = [], [], [], 0
    for _, r in df.iterrows():
        v = str(r["verdict"])
        name = MODEL_NAMES.get(r["model"], r["model"])
        label = f"{name} {_fmt(r['params removed (%)'], 0)}% ({r.get('set', 'rule')})"
        if str(r.get("status")) != "ok":
            outcomes.append("fails")
            ours.append(f"{label}: {r.get('error')}")
        elif v.startswith("n/a (no fine-tuning"):        # a network that lost layers: nothing to compare
            ours.append(f"{label}: not compared, its layers collapsed (from scratch only: {r.get('TFS')})")
        else:
            outcomes.append("undecided" if v.startswith("n/a") else "holds" if v == "TFS better" else "fails")
            unconverged, note = _converged(r.get("converged"))
            late += unconverged
            narrow = f"; narrowest layer {r['narrowest layer']}" if pd.notna(r.get("narrowest layer")) else ""
            ours.append(f"{label}: TFS - FT {r['95% interval']} ({v}){narrow}{note}")
    for key in dict.fromkeys(df["model"]):
        p = reference.PAPER_TABLE2[key]
        paper.append(f"{MODEL_NAMES.get(key, key)} {_rate(p['rate'])}: {p['TFS top1'] - p['FT top1']:+.2f}")
    return {"claim": "Table 2", "paper says": "trained from scratch, SPvR's network beats the same network "
            "fine-tuned, for every network (same epochs, learning rates searched per network)",
            "paper": "TFS - FT: " + "; ".join(paper), "ours": "; ".join(ours),
            "verdict": verdict_of(outcomes, late), "evidence": t.evidence("table2_finetune_vs_scratch")}


def _table3(t: _Tables) -> dict[str, Any]:
    return _spvr_best(t, "Table 3", "every method's network trained from scratch: SPvR's architecture is the best",
                      "table3_architecture", lambda df: df["rows"] == "scratch (Table 3)", reference.PAPER_TABLE3)


def _layer_collapse(t: _Tables) -> dict[str, Any]:
    df = t("architectures")
    outcomes, ours, paper = [], [], []
    for key, sub in df.groupby("model", sort=False):
        name = MODEL_NAMES.get(key, key)
        top = sub.loc[sub["rate"].idxmax()]
        base_layers = int(sub.loc[sub["rate"].idxmin(), "layers"])
        arch = reference.PAPER_ARCHITECTURES.get(key, {})
        rate = max(arch) if arch else float(top["rate"])
        p_layers, p_base = (layer_count(arch[rate][1]), layer_count(arch[0.0][1])) if arch else (None, None)
        ours.append(f"{name} at {_rate(top['rate'])}: {int(top['layers'])} of {base_layers} layers")
        paper.append(f"{name} at {_rate(rate)}: {p_layers} of {p_base}" if arch else f"{name}: -")
        outcomes.append("holds" if int(top["layers"]) < base_layers else "fails")
    return {"claim": "Tables 6-8", "paper says": "at the highest rates SPvR removes whole layers (layer collapse) "
            "instead of thinning every layer", "paper": "; ".join(paper), "ours": "; ".join(ours),
            "verdict": verdict_of(outcomes), "evidence": "architectures"}


def _latency_fastest(t: _Tables) -> dict[str, Any]:
    every = t("figure1_latency_claims")
    df = every[every["batch size"] == every["batch size"].min()]
    big = every[every["batch size"] == every["batch size"].max()]
    outcomes, ours = [], []
    for key, sub in df.groupby("model", sort=False):
        cells = sub if key != "vgg16" else sub[sub["params removed (%)"] == sub["params removed (%)"].max()]
        said = [str(v) for v in cells["SPvR fastest"]]
        fastest = [_rate(r / 100) for r, f in zip(cells["params removed (%)"], said) if f == "yes"]
        tied = sum(f.startswith("tied") for f in said)
        outcomes += ["holds" if f == "yes" else "fails" for f in said]
        ours.append(f"{MODEL_NAMES.get(key, key)}: fastest at {len(fastest)} of {len(cells)} rates"
                    + (f" ({', '.join(fastest)})" if fastest else "") + (f", tied at {tied}" if tied else ""))
    return {"claim": "Figure 1", "paper says": "SPvR's networks have the lowest inference latency: VGG16 at 98%, "
            "ResNet34 and ResNet50 at every rate", "paper": "all of these cells (read from the figure)",
            "ours": "; ".join(ours) + f" (batch {int(df['batch size'].min())}, this CPU; faster only where the 95% "
                    "intervals of the medians separate)" + ("" if big.equals(df) else
                    f"; at batch {int(big['batch size'].max())}, where compute dominates: fastest in "
                    f"{int((big['SPvR fastest'].astype(str) == 'yes').sum())} of {len(big)} cells"),
            "verdict": verdict_of(outcomes), "evidence": "figure1_latency_claims"}


def _latency_curl(t: _Tables) -> dict[str, Any]:
    df = t("figure1_latency_claims")
    df = df[df["batch size"] == df["batch size"].min()]
    slower = [str(s) for s in df["slower than unpruned"].fillna("none")]
    curl = [f"{MODEL_NAMES.get(k, k)} {_rate(r / 100)}" for k, r, s in
            zip(df["model"], df["params removed (%)"], slower) if "CURL" in s.split(", ")]
    others = sum(1 for s in slower for m in s.split(", ") if m not in ("none", "CURL", ""))
    return {"claim": "Figure 1", "paper says": "CURL's networks (irregular widths) are slower than the unpruned "
            "network", "paper": "slower in the figure's cells (read from the figure)",
            "ours": f"CURL slower than unpruned in {len(curl)} of {len(df)} cells"
                    + (f" ({', '.join(curl)})" if curl else "") + f"; other methods' networks slower in {others} "
                    "(method, cell) pairs (slower only where the 95% intervals separate)",
            "verdict": verdict_of(["holds" if "CURL" in s.split(", ") else "fails" for s in slower]),
            "evidence": "figure1_latency_claims"}


def _group_size_robust(t: _Tables) -> dict[str, Any]:
    df = t("figure2_group_size")
    paper_range = {"vgg16": ("top1", 1.0), "resnet34": ("top5", 2.0), "resnet50": ("top5", 1.0)}
    outcomes, ours, paper, late = [], [], [], 0
    for key, sub in df.groupby("model", sort=False):
        metric, p = paper_range.get(key, ("top1", None))
        skipped = [f"d = {int(d)}" for d, st in zip(sub["d"], sub["status"]) if str(st) != "ok"]
        sub = sub[(sub["status"] == "ok") & sub[f"{metric} (fast)"].notna()]
        if len(sub) < 2:
            ours.append(f"{MODEL_NAMES.get(key, key)}: fewer than two d meet the rate"
                        + (f" ({', '.join(skipped)} not compared)" if skipped else ""))
            continue
        hi, lo = sub.loc[sub[f"{metric} (fast)"].idxmax()], sub.loc[sub[f"{metric} (fast)"].idxmin()]
        cmp = stats.compare_summary(hi[f"{metric} (fast)"], hi[f"{metric} std (fast)"], hi["n seeds (fast)"],
                                    lo[f"{metric} (fast)"], lo[f"{metric} std (fast)"], lo["n seeds (fast)"],
                                    f"d = {int(hi['d'])}", f"d = {int(lo['d'])}")
        outcomes.append("undecided" if cmp.diff is None else "holds" if not cmp.decided else "fails")
        gains = [(int(r["d"]), r.get("gain on budget (fast)")) for r in (hi, lo)]
        unconverged = [f"d = {d} gains {g:+.2f}" for d, g in gains
                       if g is not None and pd.notna(g) and float(g) > scales.PLATEAU_POINTS]
        late += bool(unconverged)
        note = f" (not converged: {'; '.join(unconverged)})" if unconverged else ""
        ours.append(f"{MODEL_NAMES.get(key, key)} {metric}: best d {int(hi['d'])} - worst d {int(lo['d'])} = "
                    f"{cmp.interval_text()}, {'beyond noise' if cmp.decided else 'within noise'}{note}"
                    + (f"; {', '.join(skipped)} not compared (misses the rate)" if skipped else ""))
        paper.append(f"{MODEL_NAMES.get(key, key)} {metric}: about {p:g}" if p is not None else "-")
    return {"claim": "Figure 2", "paper says": "SPvR is robust to the group size d (top-1 / top-5 move about "
            "a point across d at 98%)", "paper": "; ".join(paper), "ours": "; ".join(ours),
            "verdict": verdict_of(outcomes, late), "evidence": t.evidence("figure2_group_size")}


def _group_size_time(t: _Tables) -> dict[str, Any]:
    df = t("figure2_group_size")
    outcomes, ours = [], []
    for key, sub in df.groupby("model", sort=False):
        sub = sub[sub["prune s (fast)"].notna()].sort_values("d")
        if len(sub) < 2:
            continue
        first, last = sub.iloc[0], sub.iloc[-1]
        outcomes.append("holds" if last["prune s (fast)"] < first["prune s (fast)"] else "fails")
        ours.append(f"{MODEL_NAMES.get(key, key)}: {_fmt(first['prune s (fast)'], 1)} s at d = {int(first['d'])}, "
                    f"{_fmt(last['prune s (fast)'], 1)} s at d = {int(last['d'])}")
    bound = reference.PAPER_PRUNE_S_AT_D32
    return {"claim": "Figure 2", "paper says": "pruning takes less time as d grows",
            "paper": "at d = 32 under " + ", ".join(f"{_fmt(v, 0)} s ({MODEL_NAMES[k]})" for k, v in bound.items()),
            "ours": "; ".join(ours), "verdict": verdict_of(outcomes), "evidence": "figure2_group_size"}


def _table4(t: _Tables, rival: str) -> dict[str, Any]:
    df = t("table4_mobilenet").set_index("model")
    if "ResNet50-pruned" not in df.index or rival not in df.index:
        raise _Missing(f"table4_mobilenet.csv has no ResNet50-pruned or {rival} row")
    ours_r, them = df.loc["ResNet50-pruned"], df.loc[rival]
    p_ours, p_them = reference.TABLE4_PAPER["ResNet50-pruned"], reference.TABLE4_PAPER[rival]
    cmp = stats.compare_summary(ours_r["top1"], ours_r["top1 std"], ours_r["n seeds"], them["top1"],
                                them["top1 std"], them["n seeds"], "ResNet50-pruned", rival)
    fewer = int(ours_r["params"]) < int(them["params"])
    if rival == "MobileNetV3-small":      # "at par ... with 33% fewer parameters": on par or better
        says = "SPvR's ResNet50, with a third fewer parameters, is on par with MobileNetV3-small"
        outcome = "undecided" if cmp.diff is None else \
            "holds" if fewer and cmp.verdict in ("within noise", "ResNet50-pruned better") else "fails"
    else:                                 # "3.3% better ... with 20% fewer parameters"
        says = "SPvR's ResNet50, with a fifth fewer parameters, beats MobileNetV3-minimal by 3.3 points"
        outcome = "undecided" if cmp.diff is None else \
            "holds" if fewer and cmp.verdict == "ResNet50-pruned better" else "fails"
    pair = ("ResNet50-pruned", rival)
    late, note = False, ""
    if (t.folder / "table4_convergence.csv").exists():
        # the networks read on their budget, as notebook 03 reads the bases
        conv = t("table4_convergence").set_index("name")
        read = [n for n in pair if n in conv.index and pd.notna(conv.loc[n, "plateau on the budget"])]
        unconverged = [n for n in read if _false(conv.loc[n, "plateau on the budget"])]
        late = bool(unconverged)
        note = f" (not converged: {', '.join(unconverged)})" if unconverged else ""
        note += "".join(f"; {n} gains {float(conv.loc[n, 'gain of last quarter']):+.2f} from its last quarter "
                        f"({int(conv.loc[n, 'shorter epochs'])} → {int(conv.loc[n, 'epochs'])} epochs)" for n in read)
    return {"claim": "Table 4", "paper says": says,
            "paper": f"{_fmt(p_ours['paper top1'])} ({p_ours['paper params (M)']}M) vs "
                     f"{_fmt(p_them['paper top1'])} ({p_them['paper params (M)']}M)",
            "ours": f"{_pm(ours_r['top1'], ours_r['top1 std'])} ({int(ours_r['params']):,} params) vs "
                    f"{_pm(them['top1'], them['top1 std'])} ({int(them['params']):,}): "
                    f"{cmp.interval_text()}, {cmp.verdict}{note}",
            "verdict": verdict_of([outcome], int(late)), "evidence": t.evidence("table4_mobilenet", "table4_convergence")}


def _segmentation(t: _Tables) -> dict[str, Any]:
    """The paper loses a few points of mean IoU by pruning; "reproduced" where our loss's interval holds the
    paper's loss, "different result" where ours loses less than that (the interval lies above it: pruning costs
    nothing here), "not reproduced" where ours loses more."""
    df = t("segmentation")
    if len(df) < 2:
        raise _Missing("segmentation.csv has no pruned SegNet row")
    base, pruned = df.iloc[0], df.iloc[1]
    paper = reference.SEGMENTATION_PAPER_MIOU
    paper_loss = paper["base"] - paper["pruned"]
    cmp = stats.compare_summary(pruned["mIoU"], pruned["mIoU std"], pruned["n seeds"], base["mIoU"], base["mIoU std"],
                                base["n seeds"], "pruned", "unpruned")
    if cmp.diff is None:
        verdict = "undecided (< 2 seeds)"
    elif cmp.low <= -paper_loss <= cmp.high:
        verdict = "reproduced"
    elif cmp.low > -paper_loss:
        verdict = "different result"
    else:
        verdict = "not reproduced"
    late, note = False, ""
    if (t.folder / "segmentation_convergence.csv").exists():
        conv = t("segmentation_convergence").iloc[0]
        if pd.isna(conv["gain of last quarter"]):
            note += f"; the unpruned SegNet has no shorter budget to read ({int(conv['epochs'])} epoch)"
        else:
            late = _false(conv["plateau on the budget"])
            note += (f"; the unpruned SegNet gains {float(conv['gain of last quarter']):+.2f} from its last quarter "
                     f"({int(conv['shorter epochs'])} → {int(conv['epochs'])} epochs)")
    seeds = f" (seeds {base.get('mIoU seeds')} → {pruned.get('mIoU seeds')})" if "mIoU seeds" in df else ""
    if verdict == "different result":
        note = (f"; the paper loses {paper_loss:.1f} points, ours loses none: pruning costs nothing measurable "
                "here") + note
    return {"claim": "Section 5.5", "paper says": f"a SegNet with 80% of its parameters removed by SPvR loses a "
            f"few points of mean IoU ({paper_loss:.1f})",
            "paper": f"{_fmt(paper['base'], 1)} → {_fmt(paper['pruned'], 1)} (CityScapes)",
            "ours": f"{_pm(base['mIoU'], base['mIoU std'])} → {_pm(pruned['mIoU'], pruned['mIoU std'])}{seeds}: "
                    f"pruned - unpruned {cmp.interval_text()}, {cmp.verdict}; {base['dataset']}{note}",
            "verdict": verdict + (" (not converged)" if late else ""),
            "evidence": t.evidence("segmentation", "segmentation_convergence")}


CLAIMS: tuple[tuple[str, str, Callable[[_Tables], dict[str, Any]]], ...] = (
    ("Section 3.1.1", "the worked example", _worked_example),
    ("Table 5", "Eq. 2 against KL", _table5),
    ("Table 1", "SPvR against nine baselines", _table1),
    ("Abstract, Table 1", "VGG16 at 90%", _drop_at_90),
    ("Table 2", "from scratch against fine-tuning", _table2),
    ("Table 3", "architectures trained from scratch", _table3),
    ("Tables 6-8", "layer collapse", _layer_collapse),
    ("Figure 1", "SPvR's latency", _latency_fastest),
    ("Figure 1", "CURL's latency", _latency_curl),
    ("Figure 2", "robust to d", _group_size_robust),
    ("Figure 2", "pruning time against d", _group_size_time),
    ("Table 4", "against MobileNetV3-small", lambda t: _table4(t, "MobileNetV3-small")),
    ("Table 4", "against MobileNetV3-minimal", lambda t: _table4(t, "MobileNetV3-minimal")),
    ("Section 5.5", "segmentation", _segmentation),
)


def claims_table(figures_dir: str | Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Every claim of :data:`CLAIMS` judged on the tables under ``figures_dir``.

    Returns (one row per claim with :data:`COLUMNS`, {CSV file name: sha256} of every table read).  A
    claim whose table is missing gets the verdict "missing" and the reason in ``ours``.
    """
    folder = Path(figures_dir)
    tables = _Tables(folder)
    rows = []
    for claim, what, judge in CLAIMS:
        try:
            rows.append(judge(tables))
        except _Missing as e:
            rows.append({"claim": claim, "paper says": what, "paper": "-", "ours": f"missing: {e}",
                         "verdict": "missing", "evidence": "-"})
    inputs = {f"{stem}.csv": file_sha256(folder / f"{stem}.csv") for stem in sorted(tables.read)}
    return pd.DataFrame(rows, columns=list(COLUMNS)), inputs
