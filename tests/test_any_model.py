"""SPvR on any PyTorch model: the torchvision zoo pruned to exact budgets with layer collapse, the exact
parameter count against the rebuilt network, save/load without pickled code, and the general engine
against the spec engine on spvr_lib's own VGG16."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spvr_lib import models
from spvr_lib.graph import trace_units
from spvr_lib.prune import FILL_BACK, GroupRanking, rank_groups, spvr_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_checks import assert_exact_count_for_random_removals, assert_saved_network_reloads, randomly_ranked  # noqa: E402,E501

torch.set_num_threads(1)

ZOO = ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "densenet121"]
D = 8


def _calib(n: int = 10, size: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 10


_CACHE: dict = {}


def _zoo_model(name: str):
    """A randomly initialised torchvision network (10 classes), its units and a seeded random ranking
    (network_checks.randomly_ranked): what this file tests is grouping, the budget, collapse and the rebuild."""
    return randomly_ranked(name, _calib(), D, _CACHE)


# keep 0.05 thins and collapses, keep 0.5 thins: every network at 0.05, and at 0.5 the four whose thinning is cheap.
# DenseNet121, ConvNeXt-T and VGG16-BN at 0.5 would thin the same units (concat slices, residual streams, plain
# layers) by the same code as at 0.05, for 20-50 s each of budget loop on a 2-core machine.
ZOO_CASES = [(name, 0.05) for name in ZOO] + \
    [(name, 0.5) for name in ZOO if name not in ("densenet121", "convnext_tiny", "vgg16_bn")]


@pytest.mark.parametrize("name, keep", ZOO_CASES)
def test_zoo_exact_budget_and_a_working_network(name, keep, tmp_path):
    model, calib, _, ranking = _zoo_model(name)
    res = spvr_prune(model, calib, keep, group_size=D, ranking=ranking, progress=False,
                     source={"torchvision": name, "kwargs": {"num_classes": 10}})
    before = models.count_params(model)
    assert res.params_before == before
    assert res.params_after == models.count_params(res.model) <= res.budget == int(np.floor(keep * before))
    assert res.budget - res.params_after <= 0.01 * before           # within 1% of the original count
    assert {c["unit"] for c in res.collapsed}.isdisjoint({k["unit"] for k in res.kept_one})
    # thinned: some unit keeps part of its channels (at 0.05 as at 0.5)
    assert any(0 < len(k) < sum(map(len, ranking.groups[u])) for u, k in res.kept.items())
    with torch.no_grad():
        out = res.model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    # saved as a state dict + a JSON plan, rebuilt from the torchvision constructor: the same network
    path = assert_saved_network_reloads(res.model, res.params_after, tmp_path, (2, 3, 64, 64))
    assert torch.load(path, weights_only=True).keys() == res.model.state_dict().keys()


@pytest.mark.parametrize("name, kind", [("resnet18", "branch"), ("vgg16_bn", "layer"), ("densenet121", "concat"),
                                        ("convnext_tiny", "branch"), ("mobilenet_v3_small", "branch")])
def test_a_unit_ranked_last_collapses(name, kind):
    """The unit whose groups all rank last disappears, by the structure's rule; the network still runs."""
    model, calib, g, ranking = _zoo_model(name)
    def without(target, keep_one: bool = False):
        masks = [np.full(u.width, u is target) for u in g.units]
        if keep_one:
            masks[g.units.index(target)][ranking.groups[target.name][0]] = False
        return g.count(masks)

    # a unit of that kind whose collapse saves parameters (collapsing can also add some: the consumer
    # of a removed layer reads the wider input before it)
    target = next(u for u in g.units if u.collapse == kind and without(u) < without(u, keep_one=True))
    scores = {k: (v - 2.0 if k == target.name else v) for k, v in ranking.scores.items()}
    rk = GroupRanking(ranking.groups, scores, D, "spvr", "fast", ranking.n_calib)
    # the budget is the network without the target: only the target's groups go (they rank lowest)
    budget = without(target)
    res = spvr_prune(model, calib, int(budget), group_size=D, ranking=rk, progress=False)
    assert target.name in {c["unit"] for c in res.collapsed}
    gone = {c["unit"]: c for c in res.collapsed}[target.name]
    assert gone["kind"] == kind
    assert target.name not in dict(res.model.named_modules())
    with torch.no_grad():
        assert res.model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_exact_count_equals_the_rebuilt_network_for_random_removals():
    """NetworkGraph.count (the budget loop's counter) == count_params of the built network, collapses included."""
    rng = np.random.default_rng(0)
    for name in ("resnet50", "mobilenet_v3_small", "densenet121"):
        _, _, g, _ = _zoo_model(name)
        assert_exact_count_for_random_removals(g, rng, repeats=2)


def test_residual_sum_channels_are_one_unit():
    """Channels added by a residual sum are pruned together: one unit spans every conv feeding the sum."""
    model, calib, g, _ = _zoo_model("resnet18")
    stream = next(u for u in g.units if "layer1.0.conv2" in u.producers)
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(stream.producers)
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} <= set(stream.consumers)
    assert stream.collapse is None and "several layers" in stream.why_not
    inner = next(u for u in g.units if u.name == "layer1.0.conv1")
    assert inner.collapse == "branch" and set(inner.dead) >= {"layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}


def test_the_output_layer_and_ignored_layers_are_never_pruned():
    model, calib, _, _ = _zoo_model("resnet18")
    g = trace_units(model, calib[0][:1], ignored_layers=("layer1.0.conv1",))
    names = {u.name for u in g.units}
    assert "fc" in g.ignored and "layer1.0.conv1" not in names
    with pytest.raises(ValueError, match="ignored_layers names 'nope'"):
        trace_units(model, calib[0][:1], ignored_layers=("nope",))


def test_inherit_keeps_the_original_weights_of_kept_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10)).eval()
    x, y = _calib(20, 16)
    res = spvr_prune(model, (x, y), 0.6, group_size=2, method="naive", progress=False, inherit=True)
    kept, pruned = res.kept["0"], dict(res.model.named_modules())
    assert len(kept) == pruned["0"].out_channels < 8
    assert torch.equal(pruned["0"].weight, model[0].weight[kept])
    assert torch.equal(pruned["3"].weight, model[3].weight[res.kept["3"]][:, kept])
    fresh = spvr_prune(model, (x, y), 0.6, group_size=2, method="naive", progress=False)
    assert not torch.equal(dict(fresh.model.named_modules())["0"].weight, model[0].weight[fresh.kept["0"]])


def test_bad_input_is_named():
    model, calib, _, _ = _zoo_model("resnet18")
    with pytest.raises(ValueError, match="ties names 'nope'"):
        spvr_prune(model, calib, 0.5, group_size=D, ranking=_zoo_model("resnet18")[3], ties=[["nope"]], progress=False)
    with pytest.raises(ValueError, match="engine='fast'"):
        spvr_prune(model, calib, 0.5, engine="fast", progress=False)
    with pytest.raises(ValueError, match="calib"):
        spvr_prune(model, (calib[0][:1], calib[1][:1]), 0.5, progress=False)
    res = spvr_prune(model, calib, 0.5, group_size=D, ranking=_zoo_model("resnet18")[3], progress=False)
    with pytest.raises(ValueError, match="source"):
        models.save_network(res.model, "/tmp/never-written.pt")


def test_general_engine_gives_the_spec_engine_architecture_on_vgg16():
    """spvr_lib's own VGG16 through the general engine (Torch-Pruning units, exact count, torch.fx collapse)
    gives the architecture of the spec engine from the same weights and calibration set; where the spec
    engine's first fit falls more than FILL_BACK short of the budget, the general one gives groups back."""
    torch.manual_seed(0)
    spec = models.preset("vgg16_bn", num_classes=10, in_channels=1, width=1 / 16)
    model = models.build(spec).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 32, 32, generator=g), torch.arange(40) % 10
    # each engine ranks once (what spvr_prune does without ``ranking``); the three budgets share its ranking
    ra = rank_groups(model, (x, y), 2, method="naive", progress=False, engine="spec")
    rb = rank_groups(model, (x, y), 2, method="naive", progress=False, engine="graph")
    for keep in (0.5, 0.2, 0.05):
        a = spvr_prune(model, (x, y), keep, group_size=2, method="naive", progress=False, ranking=ra)
        b = spvr_prune(model, (x, y), keep, group_size=2, method="naive", progress=False, engine="graph", ranking=rb)
        assert set(a.kept) == set(b.kept)
        sa, sb = (r.scores.set_index(["layer", "group"]).sort_index() for r in (a, b))
        assert sa["channels"].tolist() == sb["channels"].tolist()                  # Algorithm 1: same groups
        assert sa["importance"].tolist() == pytest.approx(sb["importance"].tolist(), rel=1e-6, abs=1e-9)
        if a.budget - a.params_after <= FILL_BACK * a.params_before:
            assert {k: len(v) for k, v in a.kept.items()} == {k: len(v) for k, v in b.kept.items()}
            assert a.params_after == b.params_after
        else:
            assert a.params_after < b.params_after <= b.budget


def test_general_engine_with_stage_ties_gives_the_spec_engine_architecture_on_resnet50():
    """spvr_lib's own ResNet50 through the general engine, given Appendix B's rule as ties (every conv of a
    stage shrinks with the stage) and the stem left alone as the spec engine does: the same stage widths and
    parameter count as the spec engine, from the same weights and calibration set (rates where no stage
    collapses: a whole stage's removal is a spec rule the general engine does not have); where the spec engine's
    first fit falls more than FILL_BACK short of the budget, the general one may skip that step and end closer."""
    torch.manual_seed(0)
    spec = models.preset("resnet50", num_classes=10, in_channels=1, width=1 / 16, stem="imagenet")
    model = models.build(spec).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 32, 32, generator=g), torch.arange(40) % 10
    ties = [[f"{st['name']}.{b}.conv{k}" for b in range(st["blocks"]) for k in (1, 2, 3)] for st in spec["stages"]]
    # each engine ranks once (what spvr_prune does without ``ranking``); the two budgets share its ranking
    ra = rank_groups(model, (x, y), 2, method="naive", progress=False, engine="spec")
    rb = rank_groups(model, (x, y), 2, method="naive", progress=False, engine="graph", ignored_layers=["conv1"])
    for keep in (0.5, 0.2):
        a = spvr_prune(model, (x, y), keep, group_size=2, method="naive", progress=False, ranking=ra)
        b = spvr_prune(model, (x, y), keep, group_size=2, method="naive", progress=False, engine="graph",
                       ties=ties, ignored_layers=["conv1"], ranking=rb)
        if a.params_after != b.params_after:       # only where the spec's first fit is far under the budget
            assert a.budget - a.params_after > FILL_BACK * a.params_before
            assert a.params_after < b.params_after <= b.budget
            continue
        assert a.params_after == b.params_after <= a.budget
        pruned = dict(b.model.named_modules())
        for st in a.spec["stages"]:
            for blk in range(st["blocks"]):
                for k, w in ((1, st["width"]), (2, st["width"]), (3, 4 * st["width"])):
                    assert pruned[f"{st['name']}.{blk}.conv{k}"].out_channels == w
