"""``python -m spvr_lib prune`` on networks that are not spvr_lib's own: --torchvision, --model-file, --weights,
--model-kwargs, torchrun, and the README's examples (its first Python example and its ViT command).  (The
--model/--spec paths are tested in test_prune.py.)"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from spvr_lib import models

REPO = Path(__file__).resolve().parents[1]

# a user's network file: a small CNN with a residual block (3 input channels, like most published networks)
MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


    class TinyNet(nn.Module):
        def __init__(self, num_classes=10, in_channels=3):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.block = Block(8)
            self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.down(self.block(self.stem(x)))), 1))


    def build(num_classes=10):
        return TinyNet(num_classes)


    def build_without_arguments():
        return TinyNet(10)


    def build_1000():
        return TinyNet(1000)


    def build_two_channels(num_classes=10):
        return TinyNet(num_classes, in_channels=2)


    def not_a_module(num_classes=10):
        return 42


    def raises(num_classes=10):
        raise RuntimeError("boom in the builder")


    NOT_CALLABLE = 3
''')


def _fashion_mnist_or_skip():
    from spvr_lib import data

    try:
        data.ensure_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not available on this machine")


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    """(the model file, trained-looking weights for its ``build``) in tmp_path; the run cache there too."""
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tinynet.py"
    path.write_text(MODEL_FILE)
    namespace: dict = {}
    exec(compile(MODEL_FILE, str(path), "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["build"](num_classes=10)
    for m in model.modules():                   # BN statistics and scales that differ per channel
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.2, 2.0)
    weights = tmp_path / "tinynet.pt"
    torch.save({"state_dict": model.state_dict()}, weights)       # wrapped, as training scripts often save
    return path, weights


def _run(argv: list[str]) -> int:
    from spvr_lib.__main__ import main

    return main(["prune", *argv, "--no-progress"])


# --------------------------------------------------------------------------- end to end
def test_model_file_end_to_end(tmp_path, user_model, capsys):
    _fashion_mnist_or_skip()
    path, weights = user_model
    out = tmp_path / "out"
    assert _run(["--model-file", f"{path}:build", "--weights", str(weights), "--data", "fashion-mnist",
                 "--keep", "0.5", "--group-size", "2", "--calib-per-class", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "repeated 3 times" in err          # grey Fashion-MNIST, RGB network
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "model.pt.json", "scores.csv", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == {"model_file": f"{path.resolve()}:build", "kwargs": {"num_classes": 10}}
    assert summary["input_channels_repeated"] is True and summary["n_calib"] == 20
    assert summary["params_after"] <= summary["budget"] < summary["params_before"]
    for key in ("collapsed", "kept_one", "architecture_before", "architecture"):
        assert key in summary
    pruned = models.load_network(out / "model.pt")
    assert models.count_params(pruned) == summary["params_after"]
    assert pruned.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == summary["groups"] and {"importance", "removed"} <= set(scores.columns)


def test_torchvision_resnet18_end_to_end(tmp_path, monkeypatch):
    _fashion_mnist_or_skip()
    import torchvision

    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    out = tmp_path / "out"
    assert _run(["--torchvision", "resnet18", "--weights", str(weights), "--data", "fashion-mnist", "--keep", "0.3",
                 "--group-size", "32", "--calib-per-class", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == {"torchvision": "resnet18", "kwargs": {"num_classes": 10}}
    assert summary["params_before"] == models.count_params(torchvision.models.resnet18(num_classes=10))
    assert summary["params_after"] <= summary["budget"] == int(summary["budget"])
    assert summary["architecture"] != summary["architecture_before"]
    pruned = models.load_network(out / "model.pt")
    assert models.count_params(pruned) == summary["params_after"]
    assert pruned.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not (out / "spec.json").exists()          # a spec only for spvr_lib's own networks


def _torchrun() -> Path:
    path = Path(sys.executable).parent / "torchrun"
    if not path.exists():
        found = shutil.which("torchrun")
        if found is None:
            pytest.skip(f"torchrun is not installed (looked in {path.parent} and on PATH)")
        path = Path(found)
    return path


def test_torchrun_ranks_the_same_as_one_process(tmp_path, user_model):
    """Two processes under torchrun (gloo on the CPU) share the ranking: the same importances as one process,
    and rank 0 alone writes the outputs."""
    _fashion_mnist_or_skip()
    torchrun = _torchrun()
    path, weights = user_model
    args = ["prune", "--model-file", f"{path}:build", "--weights", str(weights), "--data", "fashion-mnist",
            "--keep", "0.5", "--group-size", "2", "--calib-per-class", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPVR_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("WORLD_SIZE", None)
    runs = {"dist": [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "spvr_lib"],
            "single": [sys.executable, "-m", "spvr_lib"]}
    for name, cmd in runs.items():
        proc = subprocess.run([*cmd, *args, "--out", str(tmp_path / name)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    dist, single = (pd.read_csv(tmp_path / name / "scores.csv") for name in runs)
    assert len(dist) == len(single) > 0
    assert dist.drop(columns="importance").equals(single.drop(columns="importance"))
    assert dist["importance"].tolist() == pytest.approx(single["importance"].tolist(), rel=1e-5, abs=1e-7)
    s_dist, s_single = (json.loads((tmp_path / name / "summary.json").read_text()) for name in runs)
    assert s_dist["world_size"] == 2 and s_single["world_size"] == 1
    assert (s_dist["params_after"], s_dist["architecture"]) == (s_single["params_after"], s_single["architecture"])


# --------------------------------------------------------------------------- bad input: exit 2, the flag named
BAD = [
    (["--torchvision", "resnet19"], "--torchvision", "resnet18"),                 # suggests valid names
    (["--torchvision", "resnet18", "--checkpoint", "{w}"], "--checkpoint", "--weights"),
    (["--torchvision", "resnet18", "--width", "0.5"], "--width", "--model"),
    (["--torchvision", "resnet18", "--weights", "{d}/missing.pt"], "--weights", "no such file"),
    (["--torchvision", "resnet18", "--weights", "{d}/tensor.pt"], "--weights", "state_dict"),
    (["--torchvision", "resnet18", "--weights", "{w}"], "--weights", "does not fit"),
    (["--model-file", "{d}/missing.py:build"], "--model-file", "no such file"),
    (["--model-file", "{f}"], "--model-file", "FILE.py:FN"),
    (["--model-file", "{f}:nope"], "--model-file", "'nope'"),
    (["--model-file", "{f}:NOT_CALLABLE"], "--model-file", "not callable"),
    (["--model-file", "{f}:not_a_module"], "--model-file", "torch.nn.Module"),
    (["--model-file", "{f}:raises"], "--model-file", "boom in the builder"),
    (["--model-file", "{d}/broken.py:build"], "--model-file", "SyntaxError"),
    (["--model-file", "{f}:build", "--weights", "{d}/resnet_head.pt"], "--weights", "does not fit"),
    (["--model-file", "{f}:build_1000", "--weights", "{d}/w1000.pt"], "--model-file", "[1, 10]"),
    (["--model-file", "{f}:build_two_channels"], "--model-file", "does not accept"),
    (["--model", "vgg16_bn", "--weights", "{w}"], "--weights", "--checkpoint"),
    (["--model", "vgg16_bn"], "--checkpoint", "--model"),
    # --model-kwargs (braces doubled: the arguments go through str.format)
    (["--torchvision", "resnet18", "--model-kwargs", "nope"], "--model-kwargs", "not valid JSON"),
    (["--torchvision", "resnet18", "--model-kwargs", "[32]"], "--model-kwargs", "a JSON list"),
    (["--torchvision", "resnet18", "--model-kwargs", '{{"num_classes": 3}}'], "--model-kwargs", "num_classes"),
    (["--torchvision", "resnet18", "--model-kwargs", '{{"image size": 3}}'], "--model-kwargs", "argument names"),
    (["--torchvision", "resnet18", "--model-kwargs", '{{"image_size": 32}}'], "--torchvision",
     "image_size=32) failed (builder options from --model-kwargs)"),
    (["--model-file", "{f}:build", "--model-kwargs", '{{"depth": 3}}'], "--model-file",
     "build(num_classes=10, depth=3)"),
    (["--model", "vgg16_bn", "--model-kwargs", "{{}}"], "--model-kwargs", "--torchvision/--model-file"),
    (["--torchvision", "vit_b_16"], "--torchvision", 'e.g. --model-kwargs \'{"image_size": 32}\''),  # 224 px
]


@pytest.mark.parametrize("args, flag, says", BAD, ids=[f"{a[0]}-{a[1]}-{a[-1]}" for a, _, _ in BAD])
def test_bad_input_exits_2_naming_the_flag(tmp_path, user_model, capsys, args, flag, says):
    path, weights = user_model
    if "build_1000" in args[1] or "two_channels" in args[1] or args[1] == "vit_b_16":
        _fashion_mnist_or_skip()          # found only by a forward pass on a calibration sample
    (tmp_path / "broken.py").write_text("def build(:\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet_head.pt")
    ns: dict = {}
    exec(MODEL_FILE, ns)
    torch.save(ns["build_1000"]().state_dict(), tmp_path / "w1000.pt")
    argv = [a.format(d=tmp_path, f=path, w=weights) for a in args]
    out = tmp_path / "out"
    assert _run([*argv, "--data", "fashion-mnist", "--keep", "0.5", "--calib-per-class", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert flag in err and says in err, err
    assert not out.exists()


def test_torchvision_and_model_file_are_exclusive(capsys):
    from spvr_lib.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["prune", "--torchvision", "resnet18", "--model-file", "x.py:build", "--data", "fashion-mnist",
              "--keep", "0.5", "--out", "o"])
    assert exc.value.code == 2 and "--model-file" in capsys.readouterr().err


# --------------------------------------------------------------------------- the README's first example
def _readme_first_python() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"```python\n(.*?)```", text, re.S)
    assert found, "README.md has no ```python block"
    return found.group(1)


def test_readme_first_example_names_exist():
    """The first example prunes a torchvision ResNet50 from Python with what spvr_lib exports."""
    import spvr_lib

    code = _readme_first_python()
    assert "torchvision.models.resnet50(num_classes=10)" in code and "source=" in code
    assert "keep=0.3" in code and "save_network" in code and "fit(" in code
    for line in re.findall(r"^from spvr_lib(?:\.(\w+))? import (.+)$", code, re.M):
        module = getattr(spvr_lib, line[0]) if line[0] else spvr_lib
        for name in (n.strip() for n in line[1].split(",")):
            assert hasattr(module, name), f"README imports {name} from spvr_lib{'.' + line[0] if line[0] else ''}"


def test_readme_first_example_runs(tmp_path, monkeypatch):
    """The example itself, on a substitute small setup: a tiny network for the ResNet50, a few Fashion-MNIST
    images for the dataset, and a training loop that only records its call."""
    _fashion_mnist_or_skip()
    import torchvision

    import spvr_lib
    from spvr_lib import data

    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(MODEL_FILE, ns)
    make = lambda num_classes=1000: ns["TinyNet"](num_classes, in_channels=1)   # noqa: E731
    torch.manual_seed(0)
    state = make(10).state_dict()
    real_load_dataset = data.load_dataset
    calls = []
    monkeypatch.setattr(torchvision.models, "resnet50", make)
    monkeypatch.setattr(torch, "load", lambda *a, **k: state)
    monkeypatch.setattr(data, "load_dataset", lambda name, split, **kw: real_load_dataset("fashion-mnist", split, **kw))
    monkeypatch.setattr(spvr_lib, "fit", lambda model, train, test, recipe, **kw: calls.append((model, recipe)))
    exec(compile(_readme_first_python(), "README.md", "exec"), {"__name__": "readme"})
    assert len(calls) == 1 and models.count_params(calls[0][0]) > 0
    assert list(tmp_path.glob("*.pt")) and list(tmp_path.glob("*.pt.json"))


# --------------------------------------------------------------------------- the README's transformer command
def _readme_command(marker: str, doc: str = "README.md") -> list[str]:
    """The ``python -m spvr_lib prune`` command of ``doc`` that contains ``marker``, as argv after ``prune``."""
    import shlex

    text = (REPO / doc).read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if marker in command:
                argv = shlex.split(command.split("#")[0])
                assert argv[:4] == ["python", "-m", "spvr_lib", "prune"], argv
                return argv[4:]
    raise AssertionError(f"{doc} has no bash command containing {marker!r}")


def test_readme_vit_b_16_command_prunes_heads_and_mlps(tmp_path, monkeypatch, capsys):
    """The README's (and docs/use.md's) command on torchvision's vit_b_16 (86M parameters at 32 px through
    --model-kwargs image_size), exactly as written but for its --weights (random ones here) and one calibration
    image per class instead of 50; the ranking takes the fast path."""
    _fashion_mnist_or_skip()
    import torchvision

    argv = _readme_command("--torchvision vit_b_16")
    assert _readme_command("--torchvision vit_b_16", "docs/use.md") == argv         # docs/use.md shows the same
    assert argv[argv.index("--model-kwargs") + 1] == '{"image_size": 32}'
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)                                   # --out is relative
    torch.manual_seed(0)
    original = torchvision.models.vit_b_16(num_classes=10, image_size=32)
    nn.init.normal_(original.heads.head.weight, std=0.2)       # torchvision zero-initialises the classifier
    weights = tmp_path / argv[argv.index("--weights") + 1]
    torch.save(original.state_dict(), weights)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fast ranking cannot run this model")
        assert _run([*argv, "--calib-per-class", "1"]) == 0
    captured = capsys.readouterr()
    out = tmp_path / argv[argv.index("--out") + 1]
    summary = json.loads((out / "summary.json").read_text())
    keep = float(argv[argv.index("--keep") + 1])
    assert summary["source"] == {"torchvision": "vit_b_16", "kwargs": {"num_classes": 10, "image_size": 32}}
    assert summary["params_before"] == models.count_params(original) == 85_658_890
    assert summary["params_after"] <= summary["budget"] == int(keep * summary["params_before"])
    # the ranking took the fast path, and the summary says so
    assert summary["method"] == "fast" and summary["ranking_path"] == "fast"
    assert summary.get("ranking_fallback") is None
    # units: 12 attentions (one group of its 12 heads at d >= 12) and 12 MLPs (3072 neurons in groups of d)
    d = int(argv[argv.index("--group-size") + 1])
    scores = pd.read_csv(out / "scores.csv")
    assert summary["groups"] == len(scores) == 12 * (1 + 3072 // d)
    # what collapsed is reported (summary and stdout) and is gone from the rebuilt network
    collapsed = [c["unit"] for c in summary["collapsed"]]
    assert collapsed and all(re.fullmatch(r"encoder\.layers\.encoder_layer_\d+\.(self_attention|mlp\.0)", u)
                             for u in collapsed)
    assert "collapsed: " + ", ".join(collapsed) in captured.out
    pruned = models.load_network(out / "model.pt")
    assert models.count_params(pruned) == summary["params_after"]
    names = dict(pruned.named_modules())
    units = [f"encoder.layers.encoder_layer_{i}.{part}" for i in range(12) for part in ("self_attention", "mlp.0")]
    assert {u for u in units if u not in names} == set(collapsed)            # collapsed branches are gone
    assert pruned.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
