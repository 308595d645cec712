"""Atomic writes, provenance beside every artifact, the run cache, and the README generator."""
import json
import sys

import pandas as pd
import pytest

from spvr_lib.paper import reproduce
from spvr_lib.paper import provenance
from spvr_lib import store


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    store.atomic_write_json(target, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        store.atomic_write_json(target, {"a": Boom()})
    assert json.loads(target.read_text()) == {"a": 1}            # old content intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_run_hash_is_order_independent_and_sensitive():
    assert store.run_hash({"a": 1, "b": [1, 2]}) == store.run_hash({"b": [1, 2], "a": 1})
    assert store.run_hash({"a": 1}) != store.run_hash({"a": 2})


def test_cached_computes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"value": 42}

    a = store.cached({"x": 1}, compute, kind="t")
    b = store.cached({"x": 1}, compute, kind="t")
    c = store.cached({"x": 2}, compute, kind="t")
    assert a["value"] == b["value"] == c["value"] == 42 and len(calls) == 2
    assert a["key"] == {"x": 1} and a["hash"] == store.run_hash({"kind": "t", "x": 1})


def test_notebook_run_writes_artifacts_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    run = provenance.NotebookRun("99_test", "smoke", params={"d": 2}, seeds=[0, 1])
    run.table(pd.DataFrame({"a": [1, 2]}), "t")
    out = tmp_path / "figures" / "smoke"
    assert (out / "t.csv").read_text() == "a\n1\n2\n"
    prov = json.loads((out / "t.provenance.json").read_text())
    assert prov["scale"] == "smoke" and prov["params"] == {"d": 2} and prov["seeds"] == [0, 1]
    assert set(prov["files"]) == {"t.csv", "t.md"} and prov["files"]["t.csv"] == store.file_sha256(out / "t.csv")
    assert {"commit", "dirty"} <= set(prov["git"]) and "torch" in prov["versions"]
    run.table(pd.DataFrame({"a": [1]}), "u", device=["cpu"], threads=1)   # extras never clobber standard fields
    prov = json.loads((out / "u.provenance.json").read_text())
    assert isinstance(prov["device"], dict) and prov["extra"] == {"device": ["cpu"]} and prov["threads"] == 1
    run.close()
    with pytest.raises(ValueError, match="scale='huge'"):
        provenance.NotebookRun("99_test", "huge")


def test_a_warm_rerun_rewrites_no_artifact_whose_numbers_did_not_move(tmp_path, monkeypatch):
    """The same table and figure written by a second run: the same bytes (no date in the PDF), files and provenance
    left untouched; a changed number rewrites the table and its provenance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    out = tmp_path / "figures" / "smoke"

    def run_once(values):
        run = provenance.NotebookRun("99_test", "smoke", params={"d": 2})
        run.table(pd.DataFrame({"a": values}), "t")
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        run.figure(fig, "f")
        plt.close(fig)
        run.close()
        names = ["t.csv", "t.md", "t.provenance.json", "f.png", "f.pdf", "f.provenance.json"]
        return {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in names}

    first = run_once([1, 2])
    assert b"CreationDate" not in first["f.pdf"][0]
    second = run_once([1, 2])
    assert second == first                                         # same bytes, and not even rewritten
    third = run_once([1, 3])
    assert third["t.csv"][0] != first["t.csv"][0] and third["t.provenance.json"] != first["t.provenance.json"]
    assert third["f.pdf"] == first["f.pdf"] and third["f.provenance.json"][1] == first["f.provenance.json"][1]


def test_check_lists_artifacts_whose_code_or_files_changed(tmp_path, monkeypatch, capsys):
    """``reproduce --check``: an artifact is stale once a source file that ran for it changes."""
    root = tmp_path / "mycode"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "alpha.py").write_text("def rows():\n    return [1, 2]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    store.CODE_ROOTS.append(root)
    try:
        monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
        import mycode.alpha
        run = provenance.NotebookRun("99_test", "cpu")
        run.table(pd.DataFrame({"a": mycode.alpha.rows()}), "t")
        run.table(pd.DataFrame({"b": [3]}), "u")
        run.close()
        prov = json.loads((tmp_path / "figures" / "cpu" / "t.provenance.json").read_text())
        assert "mycode.alpha:rows" in prov["code"] and "spvr_lib.paper.reference:<values>" in prov["code"]
        assert reproduce.main(["--check", "--scale", "cpu"]) == 0
        assert "all 2 artifacts under figures/cpu/ match the current code" in capsys.readouterr().out

        (root / "alpha.py").write_text("def rows():\n    return [1, 2, 3]\n")      # the code behind t and u
        from spvr_lib import fingerprint
        fingerprint.forget()
        (tmp_path / "figures" / "cpu" / "u.csv").write_text("b\n4\n")           # a hand-edited result
        assert reproduce.main(["--check", "--scale", "cpu"]) == 1
        out = capsys.readouterr().out
        assert "stale  t: code changed: mycode.alpha:rows" in out
        assert "u.csv differs from its recorded sha256" in out and "2 of 2 artifacts" in out
        (tmp_path / "figures" / "cpu" / "v.provenance.json").write_text("{")   # unreadable: named, stale
        assert provenance.stale_artifacts("cpu")[-1]["artifact"] == "v"
        assert reproduce.main(["--check", "--scale", "huge"]) == 2
    finally:
        store.CODE_ROOTS.remove(root)
        sys.modules.pop("mycode.alpha", None)
        sys.modules.pop("mycode", None)


def test_readme_section_is_generated_from_artifacts(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "REPO_ROOT", tmp_path)
    (tmp_path / "figures" / "cpu").mkdir(parents=True)
    (tmp_path / "figures" / "cpu" / "table5_kendall_tau.md").write_text("| tau |\n|---|\n| 0.5 |\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reproduce.README_START}\nold\n{reproduce.README_END}\nafter\n")
    assert reproduce.update_readme("cpu", readme)
    text = readme.read_text()
    assert "| 0.5 |" in text and "old" not in text and text.startswith("intro") and text.endswith("after\n")
    assert "*Not yet produced at the cpu scale*" in text          # missing artifacts are shown as missing
    assert not reproduce.update_readme("cpu", readme)              # idempotent
    assert "*No run account yet*" in text                           # no reproduce_run.json: said so
    (tmp_path / "figures" / "cpu" / "reproduce_run.json").write_text(json.dumps({
        "commit": "abcdef0123456789", "scale": "cpu", "cold": False, "total_s": 1234.4, "compute_s": 45000.0,
        "notebooks": [{"notebook": "01_ranking_criterion", "wall_s": 7.3, "computed": 2, "cached": 70,
                       "compute_s": 18.8}]}))
    assert reproduce.update_readme("cpu", readme)
    text = readme.read_text()
    assert ("costs 45,000 seconds of one machine (12.5 h;" in text and "commit `abcdef0123`, resumed from the run "
            "cache) took 1,234 s of wall time" in text)
    assert "| 01_ranking_criterion |                  2 |                           70 |" in text


def test_the_readme_is_a_front_page_and_its_claims_come_from_the_claims_table(tmp_path, monkeypatch):
    """At most 1,500 words; its one sentence per claim is generated from claims.csv (no verdict typed by hand)."""
    text = (reproduce.REPO_ROOT / "README.md").read_text()
    assert len(text.split()) <= 1500
    glance = text.split(reproduce.GLANCE_START, 1)[1].split(reproduce.GLANCE_END, 1)[0]
    assert glance.strip() == reproduce.claims_at_a_glance("cpu").strip()
    for doc in ("use", "reproduce", "protocol", "paper-scale", "baselines", "results", "architecture"):
        assert f"(docs/{doc}.md)" in text and (reproduce.REPO_ROOT / "docs" / f"{doc}.md").exists()
    monkeypatch.setattr(reproduce, "REPO_ROOT", tmp_path)
    (tmp_path / "figures" / "cpu").mkdir(parents=True)
    pd.DataFrame([{"claim": "Table 9", "paper says": "X beats Y", "verdict": "not reproduced"}]).to_csv(
        tmp_path / "figures" / "cpu" / "claims.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{reproduce.GLANCE_START}\n{reproduce.GLANCE_END}\nb\n")
    assert reproduce.update_readme("cpu", readme)
    assert "- **not reproduced**: Table 9, X beats Y." in readme.read_text()


def test_readme_baselines_table_is_what_the_code_says():
    """docs/baselines.md's method table is generated from baselines.METHOD_CARDS: it cannot drift from the code."""
    text = (reproduce.REPO_ROOT / "docs" / "baselines.md").read_text()
    body = text.split(reproduce.BASELINES_START, 1)[1].split(reproduce.BASELINES_END, 1)[0]
    assert body.strip() == reproduce.baselines_markdown().strip()
    assert "Roll920/CURL" in body and "NVlabs/Taylor_pruning" in body and "lmbxmu/HRank" in body


def test_run_account_counts_every_record_once_across_notebooks(tmp_path):
    """reproduce_run.json: per notebook computed vs cached records, and the cold-run cost over their union."""
    def prov(name, notebook, records):
        (tmp_path / f"{name}.provenance.json").write_text(json.dumps({"notebook": notebook, "records": records}))

    base = {"kind": "train", "compute_s": 100.0}
    prov("base_models", "03_base_models", {"b": {**base, "computed": True}})
    prov("table1", "04_accuracy", {"b": {**base, "computed": False}, "p": {"kind": "train", "compute_s": 20.0,
                                                                        "computed": True}})
    prov("table1_runs", "04_accuracy", {"b": {**base, "computed": False}})
    acc = reproduce.run_account("cpu", {"03_base_models": 101.5, "04_accuracy": 25.0}, 130.0, cold=True,
                                figures=tmp_path)
    assert acc["compute_s"] == 120.0 and acc["records"] == 2 and acc["cold"] is True and acc["total_s"] == 130.0
    rows = {r["notebook"]: r for r in acc["notebooks"]}
    assert rows["03_base_models"] == {"notebook": "03_base_models", "wall_s": 101.5, "computed": 1, "cached": 0,
                                      "compute_s": 100.0}
    assert (rows["04_accuracy"]["computed"], rows["04_accuracy"]["cached"]) == (1, 1)
    assert set(acc) >= {"commit", "scale", "cold", "total_s", "compute_s", "notebooks"}


def test_records_used_are_top_level_and_marked_computed_or_found(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path))
    monkeypatch.setattr(store, "_used", {})
    whole = {"device": {"torch_threads": 4, "cpu_count": 4}}                              # the whole machine
    inner = lambda: store.cached({"i": 1}, lambda: {"v": 1, "wall_s": 2.0, "provenance": whole}, kind="t")  # noqa: E731
    outer = store.cached({"o": 1}, lambda: {"v": inner()["v"], "wall_s": 5.0, "provenance": whole}, kind="t")
    again = inner()                                            # found, top level now; this process computed it (inside outer)
    used = store.records_used()
    assert used[outer["hash"]] == {"kind": "t", "compute_s": 5.0, "computed": True}
    assert used[again["hash"]] == {"kind": "t", "compute_s": 2.0, "computed": True}
    monkeypatch.setattr(store, "_used", {})
    monkeypatch.setattr(store, "PROCESS_TOKEN", "another-run")    # a later run finds both: computed by someone else
    assert store.cached({"i": 1}, lambda: {"v": 9}, kind="t")["v"] == 1
    assert store.records_used()[again["hash"]] == {"kind": "t", "compute_s": 2.0, "computed": False}


def test_machine_seconds_counts_the_share_of_the_cores_a_record_was_given():
    rec = lambda threads, cores: {"wall_s": 10.0, "provenance": {"device": {"torch_threads": threads,  # noqa: E731
                                                                            "cpu_count": cores}}}
    assert store.machine_seconds(rec(1, 2)) == 5.0       # one of two side-by-side single-thread workers
    assert store.machine_seconds(rec(2, 2)) == 10.0
    assert store.machine_seconds(rec(4, 2)) == 10.0      # oversubscribed: still the whole machine, never more
    assert store.machine_seconds({"wall_s": 3.0}) == 3.0  # no provenance: its whole wall time
    assert store.machine_seconds({}) is None


def test_cache_files_are_the_records_used_and_the_weights_a_later_computation_reads(tmp_path, monkeypatch):
    runs = tmp_path / "data" / "runs"
    ckpt, pruned = tmp_path / "data" / "checkpoints", tmp_path / "data" / "pruned"
    for d in (runs, ckpt, pruned):
        d.mkdir(parents=True)
    monkeypatch.setattr(store, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("SPVR_CACHE", str(runs))
    base, seed1, prune, scratch = "a" * 16, "b" * 16, "c" * 16, "d" * 16

    def record(kind, h, **rec):
        store.write_record(runs / f"{kind}-{h}.json", {"hash": h, **rec})

    record("train", base, key={"tag": "base", "seed": 0}, weights=f"data/checkpoints/train-{base}.final.pt")
    record("train", seed1, key={"tag": "base", "seed": 1}, weights=f"data/checkpoints/train-{seed1}.final.pt")
    record("baseline", prune, key={"base": base, "method": "l1"}, status="ok", weights=f"baseline-{prune}.pt")
    record("train", scratch, key={"tag": "scratch"}, weights=f"data/checkpoints/train-{scratch}.final.pt")
    for h in (base, seed1, scratch):
        (ckpt / f"train-{h}.final.pt").write_bytes(b"w")
        (ckpt / f"train-{h}.final.pt.json").write_text("{}")
    (pruned / f"baseline-{prune}.pt").write_bytes(b"p")
    (pruned / f"baseline-{prune}.pt.json").write_text("{}")
    used = {h: {"kind": k} for h, k in ((base, "train"), (seed1, "train"), (prune, "baseline"), (scratch, "train"))}
    got = reproduce.cache_files(used, runs)
    assert got["records"] == sorted([f"runs/train-{base}.json", f"runs/train-{seed1}.json",
                                     f"runs/baseline-{prune}.json", f"runs/train-{scratch}.json"])
    # the base the pruning read, with its description, and the pruned network's description: not its weights,
    # not the weights of trainings read only for their scores (seed 1's base, a scratch training)
    assert got["weights"] == [f"checkpoints/train-{base}.final.pt", f"checkpoints/train-{base}.final.pt.json",
                              f"pruned/baseline-{prune}.pt.json"]
    # a record the artifacts do not use is not in the cache files, nor is what only it reads
    del used[prune]
    assert reproduce.cache_files(used, runs)["weights"] == []


def test_pin_stages_exactly_the_run_account_and_takes_the_rest_of_data_out_of_the_index(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("data/*\n!data/README.md\n")
    runs, ckpt = tmp_path / "data" / "runs", tmp_path / "data" / "checkpoints"
    runs.mkdir(parents=True)
    ckpt.mkdir()
    (tmp_path / "data" / "README.md").write_text("cache\n")
    for mod in (reproduce, store, provenance):
        monkeypatch.setattr(mod, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("SPVR_CACHE", str(runs))
    store.write_record(runs / "lrtrial-a.json", {"lr": 0.1})
    store.write_record(runs / "lrtrial-s.json", {"lr": 0.2})              # a smoke record: another scale's
    (ckpt / "train-b.pt").write_bytes(b"resume")                           # a resume checkpoint
    git("add", "-f", "data/README.md", "data/checkpoints/train-b.pt")      # committed by an earlier pin
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "cache")
    with pytest.raises(FileNotFoundError, match="reproduce_run.json"):
        reproduce.pinned_files("cpu")
    store.atomic_write_json(tmp_path / "figures" / "cpu" / "reproduce_run.json",
                            {"cache": {"records": ["runs/lrtrial-a.json"], "weights": []}})
    assert reproduce.pin_cache("cpu") == 0
    assert git("diff", "--cached", "--name-status").split() == ["D", "data/checkpoints/train-b.pt",
                                                                "A", "data/runs/lrtrial-a.json"]
    assert (ckpt / "train-b.pt").exists()                                  # out of the index, not deleted


def test_the_committed_cache_is_exactly_what_the_cpu_run_account_lists():
    """Every tracked file under data/ (but its README) is one the cpu run account lists, and each listed one is
    tracked: the repository carries the records and the weights later computations read, nothing else."""
    import subprocess

    root = reproduce.REPO_ROOT
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = set(subprocess.run(["git", "ls-files", "data"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.split()) - {"data/README.md"}
    listed = {str(p.relative_to(root)) for p in reproduce.pinned_files("cpu", root / "data" / "runs")}
    assert tracked - listed == set(), f"tracked under data/ but not in the cpu run account: {sorted(tracked - listed)[:5]}"
    assert listed - tracked == set(), f"in the cpu run account but not tracked: {sorted(listed - tracked)[:5]}"
