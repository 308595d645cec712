"""unit_importance (Section 3.1, Eq. 2 by masking at sites): the general fast path equals the naive one
on a hand-made network with known values, on spvr_lib's networks and on torchvision models whose
sites come from Torch-Pruning's dependency graph; site validation; the distributed split."""
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from spvr_lib import models
from spvr_lib.ranking import MaskSite, group_importance, unit_importance

torch.set_num_threads(1)


def _assert_same(naive: dict, fast: dict, rtol: float = 1e-4) -> None:
    assert list(naive) == list(fast)
    a = torch.cat([naive[k] for k in naive])
    b = torch.cat([fast[k] for k in fast])
    assert a.dtype == b.dtype == torch.float64
    rel = ((a - b).abs() / a.abs().clamp_min(1e-9)).max().item()     # scores below 1e-9: float64 noise
    assert rel <= rtol, rel
    assert torch.equal(torch.argsort(a, stable=True), torch.argsort(b, stable=True))


def _both(model, x, units, **kw):
    naive = unit_importance(model, x, units, method="naive", progress=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # no silent fallback to naive
        fast = unit_importance(model, x, units, method="fast", progress=False, **kw)
    return naive, fast


def _ident(width: int) -> tuple[tuple[int, ...], ...]:
    return tuple((c,) for c in range(width))


# --------------------------------------------------------------------------- a network with known values
def _two_conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()).double().eval()
    with torch.no_grad():
        net[2].weight[:, 1] = 0               # channel 1 of the hidden layer feeds nothing
    return net


@pytest.mark.parametrize("criterion", ["spvr", "kl"])
def test_dead_channel_scores_exactly_zero(criterion):
    net = _two_conv_net()
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    units = {"hidden": ([MaskSite("1", "output", 1, _ident(4))], [[0], [1], [2, 3], [1, 3]])}
    naive, fast = _both(net, x, units, criterion=criterion)
    assert naive["hidden"][1].item() == 0.0 and fast["hidden"][1].item() == 0.0
    _assert_same(naive, fast)
    with torch.no_grad():                     # group [1, 3] == group [3] alone, by hand
        h = torch.relu(net[0](x))
        p = torch.softmax(net[2:](h), 1)
        h[:, 3] = 0
        pm = torch.softmax(net[2:](h), 1)
    from spvr_lib.criteria import CRITERIA
    assert fast["hidden"][3].item() == pytest.approx(CRITERIA[criterion](p, pm[None])[0].item(), rel=1e-10)


def test_input_and_output_sites_agree():
    """Zeroing conv2's input == zeroing the ReLU's output; two sites at once == the later one alone."""
    net = _two_conv_net()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    groups = [[0], [2], [0, 3]]
    out = {"u": ([MaskSite("1", "output", 1, _ident(4))], groups)}
    inp = {"u": ([MaskSite("2", "input", 1, _ident(4))], groups)}
    both = {"u": ([MaskSite("0", "output", 1, _ident(4)), MaskSite("2", "input", 1, _ident(4))], groups)}
    n_out, f_out = _both(net, x, out)
    n_in, f_in = _both(net, x, inp)
    _, f_both = _both(net, x, both)
    for got in (n_in, f_in, f_out, f_both):
        assert torch.allclose(got["u"], n_out["u"], rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- spvr_lib's networks
def _randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("preset, kw, shape", [
    ("vgg16_bn", {}, (1, 32, 32)),
    ("resnet34", {"stem": "imagenet"}, (1, 32, 32)),
    ("resnet50", {}, (1, 16, 16)),
    ("mlp", {}, None),
])
def test_fast_equals_naive_spvr_networks(preset, kw, shape):
    if preset == "mlp":
        spec = {"arch": "mlp", "in_features": 12, "hidden": [10, 8, 6], "num_classes": 4}
        shape = (12,)
    else:
        spec = models.preset(preset, num_classes=10, in_channels=1, width=1 / 16, **kw)
    torch.manual_seed(0)
    model = _randomized(models.build(spec).double())
    x = torch.randn(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    groups = {}
    for layer in models.prunable_layers(model, spec):
        gs = [list(range(i, min(i + 2, layer.width))) for i in range(0, layer.width, 2)]
        groups[layer.name] = [gs[0], gs[-1]]
    naive = group_importance(model, x, groups, method="naive", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = group_importance(model, x, groups, method="fast", progress=False)
    _assert_same(naive, fast)


# --------------------------------------------------------------------------- torchvision, sites from Torch-Pruning
def _dg_units(model: nn.Module, x1: Tensor, per_unit: int = 2, max_units: int = 12) -> dict:
    """Units from Torch-Pruning's DependencyGraph: each item a site, positions per root channel."""
    tp = pytest.importorskip("torch_pruning")
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    names = {m: n for n, m in model.named_modules()}
    shapes = {}

    def hook(name):
        def fn(_m, inputs, output):
            shapes.setdefault((name, "input"), tuple(inputs[0].shape) if inputs and isinstance(inputs[0], Tensor)
                              else None)
            shapes.setdefault((name, "output"), tuple(output.shape) if isinstance(output, Tensor) else None)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(x1)
    for h in handles:
        h.remove()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x1)
    all_groups = list(DG.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear], ignored_layers=[last]))
    step = max(1, len(all_groups) // max_units)
    units = {}
    for gi, grp in enumerate(all_groups[::step][:max_units]):
        root_n = len(grp[0].idxs)
        sites = []
        for it in grp:
            mod = it.dep.target.module
            handler = it.dep.handler.__name__
            if mod not in names or handler not in ("prune_out_channels", "prune_in_channels"):
                continue
            where = "output" if handler == "prune_out_channels" else "input"
            shape = shapes.get((names[mod], where))
            if shape is None:
                continue
            per_root = [[] for _ in range(root_n)]
            for i, r in zip(it.idxs, it.root_idxs):
                per_root[r].append(int(i))
            top = max(i for pos in per_root for i in pos)
            if type(mod).__name__ == "LayerNorm2d" or isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
                dim = 1                                  # torchvision's LayerNorm2d keeps channels at dim 1
            elif isinstance(mod, (nn.Linear, nn.LayerNorm)):
                dim = -1
            else:
                dim = 1 if shape[1] > top else -1
            if len(shape) < 2 or shape[dim] <= top:
                continue
            sites.append(MaskSite(names[mod], where, dim, tuple(tuple(p) for p in per_root)))
        if sites:
            units[f"g{gi}"] = (sites, [[0], list(range(1, min(root_n, 1 + per_unit)))] if root_n > 1 else [[0]])
    return units


ZOO = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "densenet121"]
# input side: 64, but 32 for the two widest networks (ResNet18, ConvNeXt-T: 15 s and 7 s at 64 on a 2-core machine,
# in float64); every stage still sees a map of 1x1 or more, and the equality of the two paths does not depend on it
ZOO_SIZE = {"resnet18": 32, "convnext_tiny": 32}


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_fast_equals_naive_torchvision(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None, num_classes=10).double().eval()   # float64: exactness,
    size = ZOO_SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # not float32 noise
    units = _dg_units(model, x[:1])
    assert units
    naive, fast = _both(model, x, units)
    _assert_same(naive, fast)
    assert model.training is False


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("units, match", [
    ({"u": ([MaskSite("nope", "output", 1, ((0,),))], [[0]])}, "nope"),
    ({"u": ([MaskSite("1", "inside", 1, ((0,),))], [[0]])}, "where"),
    ({"u": ([MaskSite("1", "output", 2, ((0,),))], [[0]])}, "dim"),
    ({"u": ([MaskSite("1", "output", 1, ((9,),))], [[0]])}, "out of range"),
    ({"u": ([MaskSite("1", "output", 1, _ident(4))], [[4]])}, "groups"),
    ({"u": ([MaskSite("1", "output", 1, _ident(4))], [[]])}, "groups"),
    ({"u": ([MaskSite("1", "output", 1, _ident(4))], [])}, "groups"),
    ({"u": (["1"], [[0]])}, "MaskSite"),
    ({}, "units"),
])
def test_bad_sites(units, match):
    net = _two_conv_net()
    with pytest.raises(ValueError, match=match):
        unit_importance(net, torch.randn(2, 2, 8, 8, dtype=torch.float64), units, progress=False)


def test_untraceable_model_falls_back_to_naive():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)

        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h) if h.sum() > 0 else -self.fc2(h)    # data-dependent: fx cannot trace it

    torch.manual_seed(0)
    net = Branchy().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    units = {"h": ([MaskSite("act", "output", 1, _ident(6))], [[0], [1, 2]])}
    with pytest.warns(UserWarning, match="naive"):
        fast = unit_importance(net, x, units, method="fast", progress=False)
    assert torch.equal(fast["h"], unit_importance(net, x, units, method="naive", progress=False)["h"])


# --------------------------------------------------------------------------- torch.distributed
def _dist_units():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    units = {"a": ([MaskSite("1", "output", 1, _ident(6))], [[0], [1, 2], [3], [4, 5], [5]]),
             "b": ([MaskSite("4", "output", 1, _ident(5))], [[0], [1], [2, 3]])}
    return net, x, units


def _dist_worker(rank: int, rdv: str, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    try:
        net, x, units = _dist_units()
        got = {m: unit_importance(net, x, units, method=m, progress=False) for m in ("naive", "fast")}
        torch.save(got, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_two_gloo_ranks_equal_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "rdv"), str(tmp_path / "scores")), nprocs=2, join=True)
    net, x, units = _dist_units()
    single = {m: unit_importance(net, x, units, method=m, progress=False) for m in ("naive", "fast")}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"scores.{rank}")
        for m in ("naive", "fast"):
            assert list(got[m]) == ["a", "b"]
            for k in units:
                if m == "naive":
                    assert torch.equal(got[m][k], single[m][k])
                else:   # other groups share the stacked batch: equal to float rounding
                    assert torch.allclose(got[m][k], single[m][k], rtol=1e-10, atol=0)
