"""Transformers in the graph engine: an attention's heads are one unit (a head's q, k, v rows and out_proj
columns, masked at the heads' output), MLP hidden neurons are units like any linear layer's, the embedding
width is not pruned; an attention or MLP that loses everything collapses (its block becomes its shortcut);
the rebuilt attentions hold the kept heads (PrunedMultiheadAttention) and the count is exact.  torchvision's Swin
(v1) the same way (spvr_lib.swin: heads of its shifted-window attentions); Swin v2, whose attention calls its layers
functionally, is refused by name."""
import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import (PatchMergingV2, ShiftedWindowAttention, SwinTransformer,
                                                 SwinTransformerBlockV2)
from torchvision.models.vision_transformer import VisionTransformer

from spvr_lib import models, swin
from spvr_lib.attention import MaskableMultiheadAttention, PrunedMultiheadAttention, make_maskable
from spvr_lib.criteria import CRITERIA
from spvr_lib.prune import GroupRanking, network_units, rank_groups, spvr_prune
from spvr_lib.ranking import unit_importance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_checks import (assert_exact_count_for_random_removals, assert_same_scores,  # noqa: E402
                            assert_saved_network_reloads)

torch.set_num_threads(1)

D = 2
HERE = str(Path(__file__).resolve())


def build_vit() -> nn.Module:
    """torchvision's VisionTransformer, small: 32x32 images, 4x4 patches, 4 layers of 4 heads, width 64."""
    model = VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.2)      # torchvision zero-initialises the head
    return model


class EncoderClassifier(nn.Module):
    """Patches -> nn.TransformerEncoder (4 layers, 4 heads, width 64, feed-forward 256) -> mean -> Linear."""

    def __init__(self, norm_first: bool = False, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, 64, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 64, 64) * 0.02)
        layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        x = self.encoder(x if self.batch_first else x.transpose(0, 1))
        x = x if self.batch_first else x.transpose(0, 1)
        return self.head(self.norm(x).mean(1))


def build_encoder(norm_first: bool = False, batch_first: bool = True) -> nn.Module:
    return EncoderClassifier(norm_first, batch_first)


def _calib(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10


_CACHE: dict = {}
_BUILDERS = {"vit": (build_vit, {}), "encoder": (build_encoder, {}),
             "encoder_prenorm_seqfirst": (build_encoder, {"norm_first": True, "batch_first": False})}


_FELL_BACK: dict[str, list[str]] = {}


def _ranked(key: str):
    """The model, calibration set and its SPvR ranking (the fast method; ``_FELL_BACK[key]``: its fallback
    warnings)."""
    if key not in _CACHE:
        fn, kwargs = _BUILDERS[key]
        torch.manual_seed(0)
        model = fn(**kwargs).eval()
        calib = _calib()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ranking = rank_groups(model, calib, D, method="fast", progress=False)
        _FELL_BACK[key] = [str(w.message) for w in caught if "fast ranking cannot run this model" in str(w.message)]
        _CACHE[key] = (model, calib, ranking, {"model_file": f"{HERE}:{fn.__name__}", "kwargs": kwargs})
    return _CACHE[key]


@pytest.mark.parametrize("key", ["vit", "encoder", "swin", "encoder_prenorm_seqfirst"])
def test_fast_ranking_equals_naive(key):
    """The fast path ranks heads (masked inside the attention, which it re-runs on the stacked variants) and MLP
    neurons as the naive path does; a sequence-first encoder (samples along dim 1) falls back, saying why."""
    model, calib, fast, _ = _ranked(key)
    if key == "encoder_prenorm_seqfirst":
        assert len(_FELL_BACK[key]) == 1 and "the samples are not along its dim 0" in _FELL_BACK[key][0]
        return
    assert _FELL_BACK[key] == []
    naive = rank_groups(model, calib, D, method="naive", progress=False)
    assert fast.groups == naive.groups and fast.scores.keys() == naive.scores.keys()
    assert_same_scores(naive.scores, fast.scores)
    assert any(v.unique().numel() > 1 for v in naive.scores.values())      # the scores tell groups apart


def _attentions(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention))}


# --------------------------------------------------------------------------- units
def test_vit_units_are_heads_and_mlp_neurons_and_not_the_embedding():
    model, calib, _, _ = _ranked("vit")
    g = network_units(model, calib[0])
    by_name = {u.name: u for u in g.units}
    for i in range(4):
        attn = by_name[f"encoder.layers.encoder_layer_{i}.self_attention"]
        assert attn.heads and attn.width == 4 and attn.collapse == "branch"
        (site,) = attn.sites
        assert (site.module, site.where, site.dim) == (f"{attn.name}.heads", "output", -1)
        assert site.index == tuple(tuple(range(16 * j, 16 * j + 16)) for j in range(4))
        assert set(attn.dead) == {f"encoder.layers.encoder_layer_{i}.{m}" for m in ("ln_1", "self_attention", "dropout")}
        mlp = by_name[f"encoder.layers.encoder_layer_{i}.mlp.0"]
        assert mlp.width == 128 and mlp.collapse == "branch"
        assert mlp.consumers == (f"encoder.layers.encoder_layer_{i}.mlp.3",)
    assert len(g.units) == 8                                 # no unit for the 64-wide residual stream
    # made head-maskable in place: same parameters and outputs
    assert all(type(m) is MaskableMultiheadAttention for m in _attentions(model).values())
    fresh = build_vit().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(calib[0]), model(calib[0]), atol=1e-6)


def test_masking_a_head_equals_removing_its_out_proj_columns():
    """Eq. 2 for a group of heads (masked at the heads' output) equals the loss of the network whose
    out_proj columns of those heads are zero, computed by hand."""
    model, (x, _), _, _ = _ranked("vit")
    name = "encoder.layers.encoder_layer_1.self_attention"
    g = network_units(model, x)
    unit = next(u for u in g.units if u.name == name)
    scores = unit_importance(model, x, {name: (unit.sites, [[1], [0, 3]])}, method="naive", progress=False)[name]
    with torch.no_grad():
        p = torch.softmax(model(x), 1).double()
        attn = dict(model.named_modules())[name]
        saved = attn.out_proj.weight.clone()
        expected = []
        for heads in ([1], [0, 3]):
            for j in heads:
                attn.out_proj.weight[:, 16 * j:16 * (j + 1)] = 0
            expected.append(CRITERIA["spvr"](p, torch.softmax(model(x), 1).double()[None])[0].item())
            attn.out_proj.weight.copy_(saved)
    assert scores.tolist() == pytest.approx(expected, rel=1e-9)
    assert min(expected) > 0


# --------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("keep", [0.5, 0.1])
@pytest.mark.parametrize("key", ["vit", "encoder", "encoder_prenorm_seqfirst"])
def test_transformers_prune_to_budget_with_heads_and_collapse(key, keep, tmp_path):
    model, calib, ranking, source = _ranked(key)
    before = models.count_params(model)
    res = spvr_prune(model, calib, keep, group_size=D, ranking=ranking, progress=False, source=source)
    assert res.params_after == models.count_params(res.model) <= res.budget == int(np.floor(keep * before))
    # within 1% of the original count.  At 0.1 these tiny transformers are mostly what is never pruned (patch
    # embedding, positions, norms, classifier: 4-8k parameters) and a group of two heads costs 8.3k (6% of the
    # ViT): the step that meets the budget collapses a branch, and budget.global_discard's fill-back gives groups
    # back (to collapsed units too) until the network is as close to the budget as its groups allow
    assert res.budget - res.params_after <= 0.01 * before
    pruned = dict(res.model.named_modules())
    original = _attentions(model)
    collapsed = {c["unit"]: c for c in res.collapsed}
    for name, m in original.items():
        kept = res.kept[name]
        if not kept:                                # every head gone: the attention branch is gone
            assert collapsed[name]["kind"] == "branch" and name not in pruned
            continue
        new = pruned[name]
        assert isinstance(new, PrunedMultiheadAttention)
        assert new.num_heads == len(kept) and new.kept_heads == tuple(kept)
        assert new.embed_dim == 64 and new.head_dim == 16       # the embedding width is not pruned
        assert new.in_proj_weight.shape == (3 * 16 * len(kept), 64) and new.out_proj.weight.shape == (64, 16 * len(kept))
    for name in collapsed:
        assert collapsed[name]["kind"] == "branch" and not res.kept[name]
    assert all(m.normalized_shape == (64,) for m in res.model.modules() if isinstance(m, nn.LayerNorm))
    if keep == 0.5:
        assert any(0 < len(k) < len(ranking.groups[u]) * D for u, k in res.kept.items())   # a unit thinned
    else:
        assert collapsed                                        # a branch is gone (MLPs: the test below)
    with torch.no_grad():
        assert res.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert_saved_network_reloads(res.model, res.params_after, tmp_path, (2, 3, 32, 32))


@pytest.mark.parametrize("key", ["vit", "encoder"])
def test_an_attention_and_an_mlp_ranked_last_collapse_as_branches(key):
    """Every head of layer 1's attention and every neuron of layer 2's MLP ranked below everything else: at keep
    0.5 both branches are gone (their blocks keep the other branch), reported in ``collapsed`` as branches."""
    model, calib, ranking, _ = _ranked(key)
    prefix = "encoder.layers.encoder_layer_" if key == "vit" else "encoder.layers."
    attn = f"{prefix}1.self_attention" if key == "vit" else f"{prefix}1.self_attn"
    mlp = f"{prefix}2.mlp.0" if key == "vit" else f"{prefix}2.linear1"
    scores = {k: v.clone() for k, v in ranking.scores.items()}
    scores[attn][:], scores[mlp][:] = -2.0, -1.0
    res = spvr_prune(model, calib, 0.5, group_size=D, progress=False,
                     ranking=GroupRanking(ranking.groups, scores, D, "spvr", "fast", ranking.n_calib))
    collapsed = {c["unit"]: c["kind"] for c in res.collapsed}
    assert collapsed.get(attn) == collapsed.get(mlp) == "branch" and not res.kept[attn] and not res.kept[mlp]
    assert res.params_after == models.count_params(res.model) <= res.budget
    modules = dict(res.model.named_modules())
    assert attn not in modules and mlp not in modules
    with torch.no_grad():
        assert res.model.eval()(calib[0][:2]).shape == (2, 10)


def test_inherited_heads_give_the_masked_network():
    """inherit=True: the pruned network (kept heads with their weights, removed MLP neurons gone) computes
    exactly what the original computes with the removed heads and neurons masked."""
    model, calib, ranking, _ = _ranked("encoder")
    scores = {k: v.clone() for k, v in ranking.scores.items()}
    for i in (1, 3):                                    # heads 0-1 (or 2-3) of layers 1 and 3 rank last
        scores[f"encoder.layers.{i}.self_attn"][0] = -1.0
    ranking = GroupRanking(ranking.groups, scores, D, "spvr", "fast", ranking.n_calib)
    res = spvr_prune(model, calib, 0.5, group_size=D, ranking=ranking, progress=False, inherit=True)
    assert not res.collapsed
    heads = {n: m.num_heads for n, m in _attentions(res.model).items()}
    assert heads == {"encoder.layers.0.self_attn": 4, "encoder.layers.1.self_attn": 2,
                     "encoder.layers.2.self_attn": 4, "encoder.layers.3.self_attn": 2}
    _assert_pruned_equals_masked(model, calib[0], res)


# --------------------------------------------------------------------------- the attention modules
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kv", [{}, {"kdim": 24, "vdim": 40}, {"add_bias_kv": True, "add_zero_attn": True}])
def test_pruned_attention_equals_torch_attention(batch_first, kv):
    """PrunedMultiheadAttention with all heads == nn.MultiheadAttention == its maskable form (outputs and
    weights, with masks); with some heads == the maskable one with the other heads zeroed."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, **kv).eval()
    L, S, n = 5, 7, 3
    q = torch.randn(n, L, 32)
    k, v = torch.randn(n, S, kv.get("kdim", 32)), torch.randn(n, S, kv.get("vdim", 32))
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    pad = torch.zeros(n, S)
    pad[0, -2:] = float("-inf")
    amask = torch.randn(L, S)
    with torch.no_grad():
        ref, ref_w = mha(q, k, v, key_padding_mask=pad, attn_mask=amask)
        full = PrunedMultiheadAttention.from_attention(mha, range(4)).eval()
        out, w = full(q, k, v, key_padding_mask=pad, attn_mask=amask)
        assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(w, ref_w, atol=1e-6)
        out2, none = full(q, k, v, key_padding_mask=pad, attn_mask=amask, need_weights=False)
        assert none is None and torch.allclose(out2, ref, atol=1e-5)
        wrapper = nn.Sequential()
        wrapper.add_module("mha", mha)
        make_maskable(wrapper)
        assert type(mha) is MaskableMultiheadAttention and mha.state_dict().keys() == full.state_dict().keys()
        same, same_w = mha(q, k, v, key_padding_mask=pad, attn_mask=amask)
        assert torch.allclose(same, ref, atol=1e-5) and torch.allclose(same_w, ref_w, atol=1e-6)
        part = PrunedMultiheadAttention.from_attention(mha, [0, 2]).eval()
        h = mha.heads.register_forward_hook(lambda _m, _i, o: o.index_fill(-1, torch.arange(8, 16), 0)
                                            .index_fill(-1, torch.arange(24, 32), 0))
        try:
            masked, _ = mha(q, k, v, key_padding_mask=pad, attn_mask=amask)
        finally:
            h.remove()
        got, _ = part(q, k, v, key_padding_mask=pad, attn_mask=amask)
        assert torch.allclose(got, masked, atol=1e-5)
        assert part.num_heads == 2 and part.kept_heads == (0, 2) and part.out_proj.in_features == 16
        assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in mha.parameters())


def test_pruned_attention_rejects_bad_arguments():
    mha = nn.MultiheadAttention(32, 4)
    with pytest.raises(ValueError, match=r"kept=\[\]; expected a non-empty list of heads in \[0, 4\)"):
        PrunedMultiheadAttention.from_attention(mha, [])
    with pytest.raises(ValueError, match=r"kept=\[4\]"):
        PrunedMultiheadAttention.from_attention(mha, [4])
    with pytest.raises(ValueError, match="num_heads=0; expected a positive int"):
        PrunedMultiheadAttention(32, 0, 8)


def test_an_ignored_attention_keeps_its_heads():
    model, calib, _, _ = _ranked("encoder")
    name = "encoder.layers.2.self_attn"
    g = network_units(model, calib[0], None, [name])
    assert name not in {u.name for u in g.units} and len(g.units) == 7


# --------------------------------------------------------------------------- torchvision's Swin (v1)
def build_swin() -> nn.Module:
    """torchvision's SwinTransformer, small: 32x32 images, 2x2 patches, two stages of two blocks (2 then 4 heads
    of 16, width 32 then 64, MLP 128 then 256), 4x4 windows (shifted in every second block)."""
    model = SwinTransformer(patch_size=[2, 2], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10)
    nn.init.normal_(model.head.weight, std=0.2)            # torchvision's trunc_normal(0.02) head: near-uniform output
    return model


_BUILDERS["swin"] = (build_swin, {})
_SWIN_ATTN = ("features.1.0.attn", "features.1.1.attn", "features.3.0.attn", "features.3.1.attn")


def _head_mask(m: nn.Module, heads) -> torch.utils.hooks.RemovableHandle:
    pos = torch.tensor([i for j in heads for i in range(m.head_dim * j, m.head_dim * (j + 1))])
    return m.heads.register_forward_hook(lambda _m, _i, o: o.index_fill(-1, pos, 0))


@pytest.mark.parametrize("shift", [[0, 0], [2, 2], [1, 3]])
def test_swin_attention_equals_torchvision(shift):
    """MaskableShiftedWindowAttention (qkv and proj called as modules) == torchvision's ShiftedWindowAttention on
    random input, shifted and unshifted windows, padded and window-sized maps; PrunedShiftedWindowAttention with
    all heads == both (same state dict keys), with some heads == the maskable one with the other heads masked."""
    torch.manual_seed(0)
    ref = ShiftedWindowAttention(32, [4, 4], shift, 4).eval()
    nn.init.normal_(ref.relative_position_bias_table, std=1.0)
    wrapper = nn.Sequential()
    wrapper.add_module("attn", copy.deepcopy(ref))
    assert swin.make_maskable(wrapper) == ["attn"]
    mask = wrapper.attn
    assert type(mask) is swin.MaskableShiftedWindowAttention and mask.state_dict().keys() == ref.state_dict().keys()
    full = swin.PrunedShiftedWindowAttention.from_attention(mask, range(4)).eval()
    part = swin.PrunedShiftedWindowAttention.from_attention(mask, [1, 3]).eval()
    assert full.state_dict().keys() == ref.state_dict().keys()
    assert part.kept_heads == (1, 3) and part.relative_position_bias_table.shape == (49, 2)
    assert part.qkv.weight.shape == (48, 32) and part.proj.weight.shape == (32, 16)
    for shape in ((2, 8, 8, 32), (2, 10, 7, 32), (1, 3, 3, 32)):
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = ref(x)
            assert torch.allclose(mask(x), expected, atol=1e-6) and torch.allclose(full(x), expected, atol=1e-6)
            h = _head_mask(mask, [0, 2])
            try:
                masked = mask(x)
            finally:
                h.remove()
            assert torch.allclose(part(x), masked, atol=1e-6) and not torch.allclose(masked, expected, atol=1e-3)
    with pytest.raises(ValueError, match=r"kept=\[\]; expected a non-empty list of heads in \[0, 4\)"):
        swin.PrunedShiftedWindowAttention.from_attention(mask, [])


def test_swin_units_are_heads_and_mlp_neurons_and_not_the_embedding():
    """Units: each attention's heads (masked at its heads' output) and each MLP's hidden neurons, all collapsible
    branches; no unit for the embedding width (patch embedding, residual streams, patch merging); the count is
    exact for random removals; masking heads equals zeroing their proj columns (Eq. 2)."""
    model, (x, _), _, _ = _ranked("swin")
    g = network_units(model, x)
    by_name = {u.name: u for u in g.units}
    assert set(by_name) == {*_SWIN_ATTN, *(f"features.{s}.{b}.mlp.0" for s in (1, 3) for b in (0, 1))}
    for name, h in zip(_SWIN_ATTN, (2, 2, 4, 4)):
        u = by_name[name]
        assert u.heads and u.width == h and u.collapse == "branch"
        assert set(u.dead) == {name, name.replace("attn", "norm1")}
        (site,) = u.sites
        assert (site.module, site.where, site.dim) == (f"{name}.heads", "output", -1)
        assert site.index == tuple(tuple(range(16 * j, 16 * j + 16)) for j in range(h))
        mlp = by_name[name.replace("attn", "mlp.0")]
        assert not mlp.heads and mlp.width == 4 * 16 * h and mlp.collapse == "branch"
        assert mlp.consumers == (name.replace("attn", "mlp.3"),)
    assert all(type(m) is swin.MaskableShiftedWindowAttention for n, m in model.named_modules() if n in _SWIN_ATTN)
    assert_exact_count_for_random_removals(g, np.random.default_rng(0), 4)
    name = "features.3.0.attn"
    scores = unit_importance(model, x, {name: (by_name[name].sites, [[1], [0, 3]])}, method="naive",
                             progress=False)[name]
    with torch.no_grad():
        p = torch.softmax(model(x), 1).double()
        attn = dict(model.named_modules())[name]
        saved = attn.proj.weight.clone()
        expected = []
        for heads in ([1], [0, 3]):
            for j in heads:
                attn.proj.weight[:, 16 * j:16 * (j + 1)] = 0
            expected.append(CRITERIA["spvr"](p, torch.softmax(model(x), 1).double()[None])[0].item())
            attn.proj.weight.copy_(saved)
    assert scores.tolist() == pytest.approx(expected, rel=1e-9) and min(expected) > 0


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_swin_prunes_to_budget_with_heads_and_collapse(keep, tmp_path):
    """Swin at keep 0.5 and 0.1: <= budget, within 1% of it at 0.5; the kept attentions hold their kept heads
    (PrunedShiftedWindowAttention), the emptied ones and MLPs are collapsed branches; saved and rebuilt by plan."""
    model, calib, ranking, source = _ranked("swin")
    before = models.count_params(model)
    res = spvr_prune(model, calib, keep, group_size=D, ranking=ranking, progress=False, source=source)
    assert res.params_after == models.count_params(res.model) <= res.budget == int(np.floor(keep * before))
    # at 0.1 the never-pruned part (patch embedding, norms, patch merging, classifier: 9.7k of 136k) is most of the
    # budget (13.6k): the sweep ends by collapsing every branch (2.8% of the original under the budget), and
    # budget.global_discard's fill-back gives groups back to collapsed units too, bringing branches back
    assert res.budget - res.params_after <= 0.01 * before
    pruned = dict(res.model.named_modules())
    collapsed = {c["unit"]: c for c in res.collapsed}
    assert all(c["kind"] == "branch" and not res.kept[n] for n, c in collapsed.items())
    for name in _SWIN_ATTN:
        kept = res.kept[name]
        if not kept:
            assert name in collapsed and name not in pruned and name.replace("attn", "norm1") not in pruned
            continue
        new = pruned[name]
        assert type(new) is swin.PrunedShiftedWindowAttention and new.kept_heads == tuple(kept)
        assert new.num_heads == len(kept) and new.head_dim == 16
        assert new.qkv.weight.shape == (48 * len(kept), new.proj.out_features)
        assert new.relative_position_bias_table.shape == (49, len(kept))
    assert {m.normalized_shape for m in res.model.modules() if isinstance(m, nn.LayerNorm)} <= {(32,), (64,), (128,)}
    kinds = {("heads" if n in _SWIN_ATTN else "mlp") for n in collapsed}
    assert kinds == {"heads", "mlp"}                        # attention AND MLP branches collapsed
    if keep == 0.5:
        assert any(0 < len(k) < len(ranking.groups[u]) * D for u, k in res.kept.items())   # a unit thinned
    else:
        assert 0 < 8 - len(collapsed) < 8                   # fill-back brought branches back, not all of them
    with torch.no_grad():
        assert res.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert_saved_network_reloads(res.model, res.params_after, tmp_path, (2, 3, 32, 32))


def test_swin_inherited_heads_give_the_masked_network():
    """inherit=True: the pruned Swin (kept heads with their qkv rows, proj columns and bias-table columns, removed
    MLP neurons gone) computes exactly what the original computes with the removed heads and neurons masked."""
    model, calib, ranking, _ = _ranked("swin")
    scores = {k: v.clone() for k, v in ranking.scores.items()}
    scores["features.3.0.attn"][0] = scores["features.3.1.attn"][1] = -1.0      # two of four heads rank last
    ranking = GroupRanking(ranking.groups, scores, D, "spvr", "fast", ranking.n_calib)
    res = spvr_prune(model, calib, 0.8, group_size=D, ranking=ranking, progress=False, inherit=True)
    assert not res.collapsed
    heads = {n: m.num_heads for n, m in res.model.named_modules() if type(m) is swin.PrunedShiftedWindowAttention}
    assert heads == {"features.1.0.attn": 2, "features.1.1.attn": 2, "features.3.0.attn": 2, "features.3.1.attn": 2}
    _assert_pruned_equals_masked(model, calib[0], res)


def test_swin_v2_is_refused_by_name():
    """torchvision's Swin v2 attention (cosine attention, a bias MLP) still calls its layers functionally (F.linear
    on qkv.weight): it is refused at once, naming the module and the layers."""
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                            num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2).eval()
    with pytest.raises(ValueError, match=r"module 'features\.1\.0\.attn' \(ShiftedWindowAttentionV2\) uses the "
                                         r"weights of its layer\(s\) \['features\.1\.0\.attn\.qkv'"):
        network_units(model, torch.randn(2, 3, 32, 32))


def _assert_pruned_equals_masked(model, x, res):
    """``res.model`` (pruned with inherit=True) computes on ``x`` what ``model`` computes with every channel
    ``res`` removed zeroed at its unit's first mask site (heads at the heads' output, neurons at their layer's)."""
    g = network_units(model, x)
    hooks = []
    for u in g.units:
        gone = sorted(set(range(u.width)) - set(res.kept[u.name]))
        if gone:
            s = u.sites[0]
            pos = torch.tensor([i for c in gone for i in s.index[c]])
            mod = dict(model.named_modules())[s.module]
            hooks.append(mod.register_forward_hook(lambda _m, _i, o, p=pos: o.index_fill(-1, p, 0)))
    try:
        with torch.no_grad():
            masked = model(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        assert torch.allclose(res.model.eval()(x), masked, atol=1e-5)
