"""diagnostics: a network's shape facts and whether its output depends on its input, on hand-made networks."""
import pytest
import torch
from torch import nn

from spvr_lib import diagnostics


def _net(widths, dead_stem=False):
    layers, c = [], 1
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    if dead_stem:                      # the ReLU after the first BN is 0 on every input: gamma 0, beta < 0
        with torch.no_grad():
            net[1].weight.zero_()
            net[1].bias.fill_(-0.026)
    return net.eval()


def test_layer_summary_names_the_narrowest_layer_and_what_the_classifier_sees():
    base, pruned = _net([8, 16, 16, 32]), _net([4, 1, 6])
    s = diagnostics.layer_summary(pruned, base)
    assert s == {"narrowest layer": "3: 1", "classifier inputs": 6, "layers": 4, "layers removed": 1}
    assert diagnostics.layer_summary(base)["layers removed"] is None
    assert diagnostics.layer_summary(_net([8, 1]))["classifier inputs"] == 1


def test_a_dead_stem_makes_the_output_independent_of_the_input():
    torch.manual_seed(0)
    x = torch.randn(20, 1, 8, 8)
    assert diagnostics.output_spread(_net([4, 4], dead_stem=True), x) == 0.0
    assert diagnostics.output_spread(_net([4, 4]), x) > 1e-3
    with pytest.raises(ValueError, match="at least 2 inputs"):
        diagnostics.output_spread(_net([4]), x[:1])
