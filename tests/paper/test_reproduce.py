"""The papermill runner on tiny notebooks: parameters injected, outputs kept, failures named."""
import json

import nbformat

from spvr_lib.paper import reproduce


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('SCALE = "smoke"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_runner_injects_scale_and_writes_executed_copy(tmp_path, monkeypatch):
    accounts = []          # the run account goes here, not over the committed figures/cpu/reproduce_run.json
    monkeypatch.setattr(reproduce, "write_run_account", lambda scale, walls, *a: accounts.append((scale, dict(walls))))
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    marker = tmp_path / "marker.txt"
    _notebook(nbdir / "01_tiny.ipynb", [f"open({str(marker)!r}, 'w').write(SCALE)"])
    _notebook(nbdir / "02_other.ipynb", ["raise RuntimeError('must not run')"])
    out = tmp_path / "executed"
    rc = reproduce.main(["--scale", "cpu", "--only", "01", "--notebooks", str(nbdir), "--out", str(out),
                         "--timeout", "120"])
    assert rc == 0
    assert marker.read_text() == "cpu"
    executed = json.loads((out / "01_tiny.ipynb").read_text())
    assert any(c.get("metadata", {}).get("tags") == ["injected-parameters"] for c in executed["cells"])
    assert not (out / "02_other.ipynb").exists()
    assert accounts[-1][0] == "cpu" and list(accounts[-1][1]) == ["01_tiny"]


def test_runner_stops_at_failure_and_names_the_cell(tmp_path, capsys):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _notebook(nbdir / "01_fails.ipynb", ["x = 1", "raise ValueError('boom here')"])
    _notebook(nbdir / "02_after.ipynb", [f"open({str(tmp_path / 'ran')!r}, 'w')"])
    rc = reproduce.main(["--scale", "smoke", "--notebooks", str(nbdir), "--out", str(tmp_path / "ex"),
                         "--timeout", "120"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "01_fails.ipynb" in err and "ValueError: boom here" in err and "code cell 3" in err
    assert not (tmp_path / "ran").exists()


def test_runner_rejects_bad_arguments(tmp_path, capsys):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _notebook(nbdir / "01_tiny.ipynb", ["pass"])
    assert reproduce.main(["--scale", "huge", "--notebooks", str(nbdir)]) == 2
    assert "scale='huge'" in capsys.readouterr().err
    assert reproduce.main(["--scale", "smoke", "--only", "07", "--notebooks", str(nbdir)]) == 2
    assert "matches no notebook" in capsys.readouterr().err


def test_wall_clock_limit(tmp_path, capsys):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _notebook(nbdir / "01_slow.ipynb", ["import time; time.sleep(60)"])
    rc = reproduce.main(["--scale", "smoke", "--notebooks", str(nbdir), "--out", str(tmp_path / "ex"),
                         "--timeout", "8"])
    assert rc == 1 and "wall-clock limit of 8 s" in capsys.readouterr().err


def test_plan_prints_every_notebooks_work_and_gpu_hours(capsys):
    from spvr_lib.paper import plan, reproduce, scales

    assert reproduce.main(["--scale", "paper", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours per notebook: 03:" in out and "Total: at least" in out and "ASSUMED" in out
    df = plan.plan(scales.get_scale("paper"))
    assert set(df["notebook"]) == {"03", "04", "05", "06", "09", "10", "11", "14"} and (df["GPU-hours"] >= 0).all()
    r50 = df[(df["model"] == "resnet50") & (df["notebook"] == "04")].set_index("what")
    assert r50.loc["finetune trainings", "trainings"] == 3      # SPvR only: the ImageNet baselines are quoted
    assert r50.loc["pruned networks", "trainings"] == 0 and r50.loc["pruned networks", "jobs"] == 3
    assert df[(df["model"] == "resnet50") & (df["notebook"] == "03")].empty     # published weights: nothing


def test_bench_loader_times_the_loader_alone(capsys):
    from spvr_lib.paper import bench

    assert bench.main(["loader", "--dataset", "tiny-imagenet", "--workers", "0", "--images", "8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["dataset"] == "tiny-imagenet" and record["images"] == 8 and record["workers"]["0"] > 0


def test_check_data_reports_the_scales_datasets(capsys):
    assert reproduce.main(["--check-data", "--scale", "smoke"]) == 0      # Fashion-MNIST is installed for the tests
    assert "ok      fashion-mnist:" in capsys.readouterr().out
    assert reproduce.main(["--check-data", "--scale", "gpu"]) == 2


def test_bench_train_reports_the_loop_against_its_ceiling(capsys):
    from spvr_lib.paper import bench

    assert bench.main(["train", "--model", "vgg16", "--scale", "smoke", "--images", "64", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {"model", "batch_size", "end_to_end_img_s", "ceiling_img_s"} <= set(record)
    assert record["in_memory_path"] and record["end_to_end_img_s"] > 0 and record["ceiling_img_s"] > 0


def test_gpu_check_skips_every_check_without_cuda_and_refuses_bad_arguments(capsys):
    import torch

    from spvr_lib.paper import gpu_check
    if torch.cuda.is_available():
        return                                     # on a GPU machine the checks run for real (make gpu-check)
    assert gpu_check.main([]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [ln["check"] for ln in lines] == [name for name, _ in gpu_check.CHECKS]
    assert all(ln["status"] == "skipped" for ln in lines)
    assert gpu_check.main(["--fast"]) == 2


def test_ranking_speed_is_a_record_retimed_only_on_request(tmp_path, monkeypatch):
    """Notebook 08's timings are kept like the latencies: a rerun on the same kind of machine re-times nothing."""
    from spvr_lib.paper import bench, scales

    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    calls = []
    monkeypatch.setattr(bench, "bench_ranking", lambda key, scale, **kw: calls.append(key) or
                        {"model": key, "naive_s": 2.0, "fast_s": 1.0, "speedup": 2.0, "same_ranking": True,
                         "threads": 1})
    cfg = scales.get_scale("smoke")
    first = bench.ranking_table(cfg, ["vgg16"])
    again = bench.ranking_table(cfg, ["vgg16"])
    assert calls == ["vgg16"] and first.equals(again) and first["speedup"].iloc[0] == 2.0
    monkeypatch.setenv("SPVR_RETIME", "1")
    bench.ranking_table(cfg, ["vgg16"])
    assert calls == ["vgg16", "vgg16"]
