"""``python -m spvr_lib.bench vit``: SPvR pruning a vision transformer, timed, as one JSON object.  The parameter
count it reports is recomputed by hand from the heads and MLP neurons it says were kept."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"model", "config", "weights", "keep", "group_size", "n_calib", "calibration", "params_before",
          "params_after", "budget", "under_budget", "groups", "groups_removed", "heads", "mlp", "collapsed", "ranking",
          "ranking_s", "prune_s", "total_s", "device", "threads", "loadavg"}


def _small_vit_params(heads: dict[str, list[int]], mlp: dict[str, list[int]]) -> int:
    """Parameters of the small ViT (width E = 64, 16-wide heads, 4x4 RGB patches, 65 tokens, 10 classes) with
    ``heads`` / ``mlp`` {name: [before, after]} kept; a branch with 0 left is gone with its LayerNorm."""
    e, hd = 64, 16
    fixed = (3 * 4 * 4 * e + e) + e + 65 * e + 2 * e + (e * 10 + 10)   # patch conv, class token, positions, ln, head
    attn = sum(2 * e + 3 * (hd * h * e + hd * h) + (e * hd * h + e) for _, h in heads.values() if h)
    mlps = sum(2 * e + (e * w + w) + (w * e + e) for _, w in mlp.values() if w)
    return fixed + attn + mlps


def _docs_command() -> list[str]:
    """docs/use.md's ``python -m spvr_lib.bench vit`` command, as argv after ``python``."""
    import re
    import shlex

    found = re.findall(r"^python (-m spvr_lib\.bench vit.*)$", (REPO / "docs" / "use.md").read_text(), re.M)
    assert len(found) == 1, found
    return shlex.split(found[0])


def test_bench_vit_small_json(tmp_path):
    """docs/use.md's command, as written: the small ViT at its defaults (d = 2, 20 calibration images, keep 0.5)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPVR_CACHE": str(tmp_path / "cache")}
    argv = _docs_command()
    assert argv == ["-m", "spvr_lib.bench", "vit", "--compare", "--json"]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert FIELDS <= set(record), FIELDS - set(record)
    assert record["config"] == {"image_size": 32, "patch_size": 4, "num_layers": 4, "num_heads": 4, "hidden_dim": 64,
                                "mlp_dim": 128}
    # the budget, exactly
    assert record["params_before"] == 142_026 == _small_vit_params(
        {n: [4, 4] for n in record["heads"]}, {n: [128, 128] for n in record["mlp"]})
    assert record["budget"] == 71_013 and record["params_after"] <= record["budget"]
    assert record["under_budget"] == record["budget"] - record["params_after"] >= 0
    assert record["params_after"] == _small_vit_params(record["heads"], record["mlp"])
    # units: 4 attentions (4 heads in groups of d = 2) and 4 MLPs (128 neurons in groups of 2)
    d = record["group_size"]
    assert d == 2 and record["n_calib"] == 20 and record["keep"] == 0.5
    assert len(record["heads"]) == len(record["mlp"]) == 4
    assert record["groups"] == 4 * (4 // d + 128 // d) and 0 < record["groups_removed"] < record["groups"]
    assert all(before == 4 and after % d == 0 for before, after in record["heads"].values())
    assert all(before == 128 and after % d == 0 for before, after in record["mlp"].values())
    gone = {n for n, (_, after) in {**record["heads"], **record["mlp"]}.items() if after == 0}
    assert set(record["collapsed"]) == gone
    # the fast path ran, and ranks the groups as the naive path does (to float32 rounding: near-ties may swap)
    assert record["ranking"] == {"requested": "fast", "used": "fast", "why": None}
    compare = record["compare"]
    assert compare["same_ranking"] is True and compare["max_rel_diff"] < 1e-3
    assert compare["speedup"] == pytest.approx(compare["naive_ranking_s"] / record["ranking_s"], rel=0.01)
    assert record["total_s"] == pytest.approx(record["ranking_s"] + record["prune_s"], abs=0.002)
    assert record["ranking_s"] > 0 and record["device"] == "cpu"


def test_bench_vit_torchvision_vit_b_16_config():
    """``--torchvision vit_b_16``: torchvision's builder at the requested size, its configuration as reported,
    and the classifier drawn at random (torchvision zero-initialises it: every importance would be 0)."""
    from spvr_lib.paper.bench import _vit

    model, config = _vit("vit_b_16", 16, 10)
    assert config == {"image_size": 16, "patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768,
                      "mlp_dim": 3072}
    assert model.heads.head.weight.abs().sum() > 0
    assert sum(p.numel() for p in model.parameters()) == 85_656_586          # 86M; 2 tokens at 16 px
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("args, says", [
    (["--image-size", "30"], "image_size=30: expected a multiple of the small ViT's patch size 4"),
    (["--torchvision", "resnet18"], "torchvision='resnet18': expected one of torchvision's ViTs"),
    (["--torchvision", "vit_b_16", "--image-size", "40"], "torchvision='vit_b_16' at image_size=40"),
    (["--calib", "5"], "n_calib=5; expected an integer >= 10"),
    (["--keep", "1.5"], "keep=1.5"),
    (["--group-size", "0"], "group_size=0"),
])
def test_bench_vit_bad_input_exits_2(args, says, capsys):
    from spvr_lib.paper.bench import main

    assert main(["vit", *args, "--json"]) == 2
    captured = capsys.readouterr()
    assert says in captured.err and not captured.out, captured.err
