"""Appendix A's experiment: masking, ground truth and the Table 5 summary."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

from spvr_lib.models import build
from spvr_lib.paper import ranking_criterion


def test_worked_example_table_matches_paper():
    df = ranking_criterion.worked_example()
    assert np.floor(df["KL (ours)"].to_numpy() * 100).tolist() == [20, 32, 78]
    assert df["L (ours)"].tolist() == [1.3, 0.29, 1.5]
    assert df["rank by L"].tolist() == [2, 3, 1]          # neuron 3 most important, then 1, then 2
    assert df["rank by KL"].tolist() == [3, 2, 1]         # KL puts neuron 2 above neuron 1


def test_masked_hidden_outputs_equal_zeroing_the_neuron():
    torch.manual_seed(0)
    model = build({"arch": "mlp", "in_features": 5, "hidden": [4], "num_classes": 3}).eval()
    x = torch.randn(7, 5)
    p, pm = ranking_criterion.masked_hidden_outputs(model, x)
    assert pm.shape == (4, 7, 3)
    assert torch.allclose(p, torch.softmax(model(x), 1), atol=1e-6)
    for j in range(4):
        m = copy.deepcopy(model)
        with torch.no_grad():       # a ReLU unit with zero weights and bias outputs 0: the neuron is removed
            m.fc1.weight[j] = 0
            m.fc1.bias[j] = 0
        assert torch.allclose(pm[j], torch.softmax(m(x), 1), atol=1e-6)


def test_table5_summary_counts_undefined_seeds():
    per_seed = pd.DataFrame({"seed": [0, 1, 2], "tau_SPvR": [0.8, 0.6, float("nan")],
                             "tau_KL": [0.5, 0.3, float("nan")]})
    t = ranking_criterion.table5(per_seed).set_index("criterion")
    assert t.loc["SPvR", "tau_mean"] == pytest.approx(0.7)
    assert t.loc["SPvR", "tau_std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert t.loc["KL", "n_seeds"] == 2 and t.loc["KL", "n_undefined"] == 1
    assert t.loc["SPvR", "paper"] == 0.861 and t.loc["KL", "paper"] == 0.586


def test_guyon_run_is_deterministic_and_reference_predictions_matches_eq2_first_term():
    setup = ranking_criterion.GuyonSetup(n_samples=200, n_features=20, hidden=16, epochs=2)
    a, b = ranking_criterion.guyon_run(setup, 3), ranking_criterion.guyon_run(setup, 3)
    assert a["tau_SPvR"] == b["tau_SPvR"] or (np.isnan(a["tau_SPvR"]) and np.isnan(b["tau_SPvR"]))
    gt, spvr = np.array(a["ground_truth"]), np.array(a["scores_SPvR"])
    # Eq. 2 = flips + |dp| with |dp| <= 1 per sample: the integer part bounds the flip count
    assert len(gt) == 16 and (spvr >= gt - 1e-9).all() and (spvr <= gt + 200 + 1e-9).all()


@pytest.mark.parametrize("kw, msg", [({"reference": "oracle"}, "reference"), ({"test_fraction": 1.0}, "test_fraction"),
                                     ({"epochs": 0}, "epochs")])
def test_bad_setup(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ranking_criterion.GuyonSetup(**kw)
