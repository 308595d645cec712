"""Hugging Face transformers (random weights, built from a config) in the graph engine: a small BERT sequence
classifier and a small GPT-2 language model pruned by spvr_prune to 50% and 10% of their parameters (heads, MLP
neurons and the residual stream's width are the units; attention and MLP branches collapse), ranked by
spvr_lib.hf.rank_token_groups (Eq. 2 per sample, or at every position for GPT-2's next-token distribution)."""
import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from spvr_lib import models                                          # noqa: E402
from spvr_lib.criteria import spvr_loss, spvr_next_token_loss        # noqa: E402
from spvr_lib.hf import ZeroBranch, rank_token_groups                # noqa: E402
from spvr_lib.prune import GroupRanking, network_units, spvr_prune      # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
D = 2


def build_bert() -> nn.Module:
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=1000, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def build_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


_CACHE: dict = {}


def _ranked(key: str):
    if key not in _CACHE:
        torch.manual_seed(0)
        model = build_bert() if key == "bert" else build_gpt2()
        ids = torch.randint(0, 1000, (16, 12), generator=torch.Generator().manual_seed(1))
        y = torch.arange(16) % 3 if key == "bert" else torch.roll(ids, -1, 1)
        crit = "spvr" if key == "bert" else "spvr_next_token"
        _CACHE[key] = (model, (ids, y), crit, rank_token_groups(model, (ids, y), D, crit))
    return _CACHE[key]


# --------------------------------------------------------------------------- the criterion
def test_next_token_criterion_by_hand():
    """One sequence of 2 positions, 3 tokens.  Position 0 predicts token 0 (0.5), the masked network token 1:
    1 + |0.5 - 0.2| = 1.3; position 1 predicts token 2 (0.6) and still does at 0.4: 0 + 0.2.  Mean: 0.75."""
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]]], dtype=torch.float64)
    pm = torch.tensor([[[[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]]], dtype=torch.float64)
    assert spvr_next_token_loss(p, pm).tolist() == pytest.approx([0.75], abs=1e-12)
    assert spvr_next_token_loss(p, p[None]).tolist() == [0.0]
    # the same as Eq. 2 over the n * seq predictions, divided by their number (and as spvr_loss over "pixels")
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 5, 7, generator=g, dtype=torch.float64), -1)
    pm = torch.softmax(torch.randn(4, 3, 5, 7, generator=g, dtype=torch.float64), -1)
    expect = spvr_loss(p.reshape(15, 7), pm.reshape(4, 15, 7)) / 15
    assert torch.allclose(spvr_next_token_loss(p, pm), expect)
    assert torch.allclose(spvr_next_token_loss(p, pm) * 15, spvr_loss(p.transpose(1, 2), pm.transpose(2, 3)))
    with pytest.raises(ValueError, match=r"p_masked must be \[g, n, seq, vocab\]"):
        spvr_next_token_loss(p, pm[0])


# --------------------------------------------------------------------------- units
@pytest.mark.parametrize("key", ["bert", "gpt2"])
def test_units_are_heads_neurons_and_the_stream(key):
    model, (ids, _), _, _ = _ranked(key)
    g = network_units(model, ids)
    by = {u.name: u for u in g.units}
    if key == "bert":
        attn, mlp, out = "bert.encoder.layer.{}.attention.self", "bert.encoder.layer.{}.intermediate.dense", \
            "bert.encoder.layer.{}.attention.output.dense"
        stream, mlp_width = "bert.embeddings.word_embeddings", 128
    else:
        attn, mlp, out = "transformer.h.{}.attn", "transformer.h.{}.mlp.c_fc", "transformer.h.{}.attn.c_proj"
        stream, mlp_width = "transformer.wte", 256
    assert set(by) == {attn.format(i) for i in range(2)} | {mlp.format(i) for i in range(2)} | {stream}
    for i in range(2):
        a = by[attn.format(i)]
        assert a.heads and a.width == 4 and a.collapse == "branch"
        (site,) = a.sites
        assert (site.module, site.where, site.dim) == (out.format(i), "input", -1)
        assert site.index == tuple(tuple(range(16 * j, 16 * j + 16)) for j in range(4))
        assert by[mlp.format(i)].width == mlp_width and by[mlp.format(i)].collapse == "branch"
    assert by[stream].width == 64 and by[stream].collapse is None
    # the exact count: removing one head of layer 0 removes its q, k, v rows and biases and out_proj columns
    removed = [np.zeros(u.width, dtype=bool) for u in g.units]
    removed[g.index[attn.format(0)]][1] = True
    assert g.count(removed) == models.count_params(model) - (3 * (64 * 16 + 16) + 16 * 64)


# --------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("keep", [0.5, 0.1])
@pytest.mark.parametrize("key", ["bert", "gpt2"])
def test_prune_to_budget(key, keep):
    model, calib, crit, ranking = _ranked(key)
    before = models.count_params(model)
    res = spvr_prune(model, calib, keep, D, criterion=crit, ranking=ranking, progress=False)
    assert res.params_after == models.count_params(res.model) <= res.budget == int(np.floor(keep * before))
    # under the budget by less than one group of the residual stream (2 channels: 2 x ~1.1k parameters)
    assert res.budget - res.params_after <= 0.015 * before
    assert type(res.model) is type(model)                     # the model itself, sliced: same class and call
    stream = "bert.embeddings.word_embeddings" if key == "bert" else "transformer.wte"
    E = len(res.kept[stream])
    assert 0 < E < 64
    ids = calib[0][:2]
    with torch.no_grad():
        out = res.model(ids).logits
    assert out.shape == ((2, 3) if key == "bert" else (2, 12, 1000)) and torch.isfinite(out).all()
    modules = dict(res.model.named_modules())
    collapsed = {c["unit"]: c for c in res.collapsed}
    for u, kept in res.kept.items():
        if u == stream:
            continue
        if not kept:
            assert collapsed[u]["kind"] == "branch"
            assert all(isinstance(modules[m], (ZeroBranch, nn.Identity)) for m in collapsed[u]["modules"])
            continue
        if u.endswith(("attention.self", "attn")):
            m = modules[u]
            width = (m.query.out_features, m.num_attention_heads) if key == "bert" else (m.c_attn.nf // 3, m.num_heads)
            assert width == (16 * len(kept), len(kept))
    if keep == 0.1:               # the sweep empties all 4 branches; the fill-back brings GPT-2's MLPs back
        assert len(collapsed) == {"bert": 4, "gpt2": 2}[key]
    else:                                                     # a branch gone and some unit only thinned
        assert res.collapsed and any(0 < len(k) < len(ranking.groups[u]) * D for u, k in res.kept.items())


@pytest.mark.parametrize("key", ["bert", "gpt2"])
def test_inherited_heads_and_neurons_give_the_masked_network(key):
    """inherit=True with the stream kept: the pruned model computes what the original computes with the
    removed heads and neurons masked (the masking that ranked them is exactly their removal)."""
    model, calib, crit, ranking = _ranked(key)
    scores = {k: v.clone() + 10.0 for k, v in ranking.scores.items()}
    attn = "bert.encoder.layer.1.attention.self" if key == "bert" else "transformer.h.1.attn"
    mlp = "bert.encoder.layer.0.intermediate.dense" if key == "bert" else "transformer.h.0.mlp.c_fc"
    scores[attn][0] = -1.0
    scores[mlp][:5] = -1.0
    ranking = GroupRanking(ranking.groups, scores, D, crit, "naive", ranking.n_calib)
    before = models.count_params(model)
    removed_params = 2 * (3 * (64 * 16 + 16) + 16 * 64) + 10 * (2 * 64 + 1)
    res = spvr_prune(model, calib, before - removed_params, D, criterion=crit, ranking=ranking, progress=False,
                     inherit=True)
    assert res.params_after == before - removed_params and not res.collapsed
    g = network_units(model, calib[0])
    hooks, modules = [], dict(model.named_modules())
    for u in g.units:
        gone = sorted(set(range(u.width)) - set(res.kept[u.name]))
        if gone:
            (s,) = u.sites
            pos = torch.tensor([i for c in gone for i in s.index[c]])
            hooks.append(modules[s.module].register_forward_pre_hook(lambda _m, i, p=pos: (i[0].index_fill(-1, p, 0),)))
    try:
        with torch.no_grad():
            masked = model(calib[0]).logits
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        assert torch.allclose(res.model(calib[0]).logits, masked, atol=1e-5)


# --------------------------------------------------------------------------- what it refuses, by name
def test_errors_name_the_module_and_what_to_try():
    model, calib, _, _ = _ranked("bert")
    with pytest.raises(ValueError, match=r"rank it with spvr_lib\.hf\.rank_token_groups"):
        spvr_prune(model, calib, 0.5, D, progress=False)
    with pytest.raises(ValueError, match=r"criterion='spvr'; model \(GPT2LMHeadModel\) returns language-model "
                                         r"logits \[n, seq, vocab\], for which the criteria are"):
        gpt, gcalib, _, _ = _ranked("gpt2")
        rank_token_groups(gpt, gcalib, D, "spvr")
    with pytest.raises(ValueError, match=r"calib input_ids must be an integer tensor \[n, seq\]"):
        rank_token_groups(model, (calib[0].float(), calib[1]), D)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match=r"it stopped at module 'model\.layers\.0\.self_attn' \(LlamaAttention\), "
                                         r"an attention it does not know.*ignored_layers"):
        network_units(llama, torch.randint(0, 100, (2, 8)))
