"""Channel shuffles in the graph engine (spvr_lib.channel_shuffle): torchvision's ShuffleNetV2 prunes to exact
budgets.  Torch-Pruning traces a copy in which every shuffle (view, transpose, view) is a stand-in layer; the
channels a shuffle moves (every block's output, the concatenated stream) are kept whole, the widths that never
meet a shuffle (each branch's inner width, the stem, conv5) are units, and the real network is counted and
rebuilt.  A shuffle in a network torch.fx cannot trace is refused by name."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle

from spvr_lib import models
from spvr_lib.channel_shuffle import find_shuffles, shuffle_free
from spvr_lib.graph import trace_graph, trace_units
from spvr_lib.prune import network_units, rank_groups, spvr_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_checks import (assert_exact_count_for_random_removals, assert_same_scores,  # noqa: E402
                            assert_saved_network_reloads)

torch.set_num_threads(1)

D = 2
SIZE = 32
SOURCE = {"torchvision": "shufflenet_v2_x0_5", "kwargs": {"num_classes": 10}}
_CACHE: dict = {}


def _calib(n: int = 10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.arange(n) % 10


def _shufflenet() -> nn.Module:
    """shufflenet_v2_x0_5 (10 classes), randomly initialised, its BatchNorm statistics taken from random images
    (with torchvision's initialisation the activations of an untrained ShuffleNet vanish by stage 3, and masking
    would change nothing measurable)."""
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(64, 3, SIZE, SIZE))
    return model.eval()


def _ranked():
    """The model, calibration set, units and SPvR ranking (naive: see test_fast_ranking_equals_naive)."""
    if not _CACHE:
        model, calib = _shufflenet(), _calib()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = network_units(model, calib[0])
            ranking = rank_groups(model, calib, D, method="naive", progress=False)
        _CACHE.update(model=model, calib=calib, g=g, ranking=ranking)
    return _CACHE["model"], _CACHE["calib"], _CACHE["g"], _CACHE["ranking"]


def _blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "InvertedResidual"]


def test_units_are_the_widths_no_shuffle_moves():
    """Every block's channel shuffle is found; the units are each branch2's inner width (its first 1x1 conv, the
    depthwise conv, the last 1x1 conv's input), the stem and conv5; the layers whose outputs a shuffle moves are
    listed in ``fixed`` with the reason, and no unit prunes them."""
    model, (x, _), g, _ = _ranked()
    blocks = _blocks(model)
    assert len(blocks) == 16
    assert [s.module for s in g.shuffles] == blocks and all(s.kind == "InvertedResidual" for s in g.shuffles)
    by_name = {u.name: u for u in g.units}
    assert set(by_name) == {"conv1.0", "conv5.0"} | {f"{b}.branch2.3" for b in blocks}
    for b in blocks:
        u = by_name[f"{b}.branch2.3"]
        assert set(u.producers) == {f"{b}.branch2.{i}" for i in (0, 1, 3, 4)} and u.consumers == (f"{b}.branch2.5",)
        assert u.width == model.get_submodule(f"{b}.branch2.0").out_channels and u.collapse is None
    stem = by_name["conv1.0"]                           # the stem feeds stage2.0's branch1 (depthwise) and branch2
    assert "stage2.0.branch1.0" in stem.producers
    assert set(stem.consumers) == {"stage2.0.branch1.2", "stage2.0.branch2.0"}
    assert by_name["conv5.0"].consumers == ("fc",)
    stride2 = [b for b in blocks if b.endswith(".0")]
    expected = {f"{b}.branch2.5" for b in blocks} | {f"{b}.branch1.2" for b in stride2} | \
        {"stage3.0.branch1.0", "stage4.0.branch1.0"}
    assert set(g.fixed) == expected
    block = "stage3.4"
    assert g.fixed[f"{block}.branch2.5"] == (f"its output channels pass through the channel shuffle in module "
                                            f"'{block}' (InvertedResidual), a permutation of channels that "
                                            "Torch-Pruning cannot follow: kept whole")
    assert not {p for u in g.units for p in u.producers} & expected
    # the copy Torch-Pruning traces computes what the model computes (each stand-in is the shuffle's permutation)
    gm = trace_graph(model)
    with torch.no_grad():
        assert torch.allclose(shuffle_free(gm, find_shuffles(gm, x[:1]))(x), model(x), atol=1e-5)


def test_a_shufflenet_is_noted_once():
    """The first trace of a model with shuffles warns what is kept whole and why; later ones stay quiet."""
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.warns(UserWarning, match=r"model \(ShuffleNetV2\) has 16 channel shuffle\(s\) \(the first in module "
                                         r"'stage2\.0' \(InvertedResidual\)\): the channels they move, the outputs "
                                         r"of 21 conv/linear layers .* are not pruned"):
        trace_units(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace_units(model, x)


def test_exact_count_equals_the_rebuilt_network_for_random_removals():
    assert_exact_count_for_random_removals(_ranked()[2], np.random.default_rng(0), repeats=3)


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_shufflenet_prunes_to_an_exact_budget(keep, tmp_path):
    """Both budgets are reached within 1% by the inner widths, the stem and conv5 alone: a unit that empties keeps
    one group (nothing collapses, a block's output width never changes)."""
    model, calib, g, ranking = _ranked()
    before = models.count_params(model)
    res = spvr_prune(model, calib, keep, group_size=D, ranking=ranking, progress=False, source=SOURCE)
    assert res.params_after == models.count_params(res.model) <= res.budget == int(np.floor(keep * before))
    assert res.budget - res.params_after <= 0.01 * before
    assert not res.collapsed and all(len(k) >= D for k in res.kept.values())
    original, pruned = dict(model.named_modules()), dict(res.model.named_modules())
    for name in g.fixed:                                # what a shuffle moves is kept whole
        assert pruned[name].out_channels == original[name].out_channels
    thinned = [u.name for u in g.units if len(res.kept[u.name]) < u.width]
    assert len(thinned) >= (len(g.units) // 2 if keep == 0.1 else 1)
    if keep == 0.1:
        assert res.kept_one                            # some units went down to their last group
    with torch.no_grad():
        assert res.model.eval()(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)
    path = assert_saved_network_reloads(res.model, res.params_after, tmp_path, (2, 3, SIZE, SIZE))
    assert models.load_network(path).spvr_description["source"] == SOURCE


def test_inherited_network_equals_the_masked_original():
    """inherit=True: the pruned ShuffleNet computes what the original computes with the removed channels zeroed
    at every place their units live (the shuffles untouched)."""
    model, calib, g, ranking = _ranked()
    x = calib[0]
    res = spvr_prune(model, calib, 0.5, group_size=D, ranking=ranking, progress=False, inherit=True)
    modules = dict(model.named_modules())
    hooks = []
    for u in g.units:
        gone = sorted(set(range(u.width)) - set(res.kept[u.name]))
        for s in u.sites if gone else ():
            pos = torch.tensor([i for c in gone for i in s.index[c]])
            if s.where == "output":
                hooks.append(modules[s.module].register_forward_hook(
                    lambda _m, _i, o, p=pos, d=s.dim: o.index_fill(d, p, 0)))
            else:
                hooks.append(modules[s.module].register_forward_pre_hook(
                    lambda _m, i, p=pos, d=s.dim: (i[0].index_fill(d, p, 0), *i[1:])))
    try:
        with torch.no_grad():
            masked = model(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        full, got = model(x), res.model.eval()(x)
    assert (full - masked).abs().max() > 0.1                    # the masks matter
    assert torch.allclose(got, masked, atol=1e-4)


def test_fast_ranking_equals_naive():
    """The fast path through the blocks' chunk (a split's halves re-run as the masked variants) and concatenation
    gives the naive path's scores to float32 rounding, in the same order."""
    model, calib, _, naive = _ranked()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)                # no fallback to the naive path
        fast = rank_groups(model, calib, D, method="fast", progress=False)
    assert fast.groups == naive.groups
    assert_same_scores(naive.scores, fast.scores)


class _Block(nn.Module):
    """conv -> channel shuffle, behind Python control flow on a tensor value (torch.fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        return channel_shuffle(y, 2) if y.sum() > -1e9 else y


def test_a_shuffle_torch_fx_cannot_trace_is_refused_by_name():
    """Without a torch.fx trace the shuffle cannot be hidden, and Torch-Pruning would map its channels as if
    unmoved: a ValueError naming the calls, the module, the reason and what to do, never a wrong network."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Block(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    with pytest.raises(ValueError, match=r"model \(Sequential\) has a channel shuffle \('view', 'transpose', "
                                         r"'contiguous', 'view'\) in module '1' \(_Block\), a permutation of channels "
                                         r"that Torch-Pruning's DependencyGraph cannot follow") as err:
        spvr_prune(model, (torch.randn(10, 3, 8, 8), torch.arange(10)), 0.5, progress=False)
    msg = str(err.value)
    assert "torch.fx cannot trace this model (TraceError" in msg and "make the model traceable by torch.fx" in msg


def test_nn_channel_shuffle_is_hidden_too():
    """The same mechanism for ``nn.ChannelShuffle``: the conv before it is kept whole, the one after is a unit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ChannelShuffle(2), nn.Conv2d(8, 6, 1),
                          nn.ReLU(), nn.Conv2d(6, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = trace_units(model, torch.randn(1, 3, 8, 8))
    assert [s.kind for s in g.shuffles] == ["ChannelShuffle"] and set(g.fixed) == {"0"}
    assert {u.name for u in g.units} == {"3", "5"}
    assert_exact_count_for_random_removals(g, np.random.default_rng(0), repeats=2)
