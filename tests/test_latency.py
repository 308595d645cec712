"""Tests for spvr_lib.latency: argument checks, result contents and the MAC counter on hand-counted models."""
import pytest
import torch
from torch import nn

from spvr_lib import models as M
from spvr_lib.latency import count_macs, measure_latency

torch.set_num_threads(1)

KEYS = {"mean_ms", "median_ms", "std_ms", "p10_ms", "p90_ms", "runs", "batch_size", "device", "threads"}


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(12, 5))


def test_result_keys_order_statistics_and_provenance():
    model = _tiny()
    out = measure_latency(model, (2, 4, 4), batch_size=3, runs=25, warmup=2, device="cpu", threads=1)
    assert set(out) == KEYS
    assert (out["runs"], out["batch_size"], out["device"], out["threads"]) == (25, 3, "cpu", 1)
    assert 0 < out["p10_ms"] <= out["median_ms"] <= out["p90_ms"]
    assert out["std_ms"] >= 0 and out["mean_ms"] > 0
    assert torch.get_num_threads() == 1


def test_thread_count_and_train_mode_are_restored():
    model = _tiny()
    model.train()
    before = torch.get_num_threads()
    out = measure_latency(model, (2, 4, 4), runs=3, warmup=0, device="cpu", threads=2)
    assert out["threads"] == 2 and torch.get_num_threads() == before
    assert model.training
    one = measure_latency(model, (2, 4, 4), runs=1, warmup=0, device="cpu")
    assert one["std_ms"] == 0.0 and one["threads"] == before and one["p10_ms"] == one["p90_ms"]


@pytest.mark.parametrize("kw, match", [
    ({"input_shape": (2, 4)}, r"input_shape must be a tuple of 3 positive ints.*\(2, 4\)"),
    ({"input_shape": (2, 0, 4)}, "input_shape"),
    ({"input_shape": (2, 4.0, 4)}, "input_shape"),
    ({"runs": 0}, r"runs must be an int >= 1, got 0"),
    ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
    ({"batch_size": True}, "batch_size"),
    ({"warmup": -1}, r"warmup must be an int >= 0, got -1"),
    ({"threads": 0}, r"threads must be an int >= 1, got 0"),
    ({"device": "tpu"}, r"device='tpu': expected None, 'cpu' or 'cuda\[:index\]'"),
])
def test_argument_errors(kw, match):
    args = {"input_shape": (2, 4, 4), "runs": 2, "warmup": 0, **kw}
    with pytest.raises(ValueError, match=match):
        measure_latency(_tiny(), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        measure_latency(_tiny(), (2, 4, 4), runs=1, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_leaves_model_on_cpu():
    model = _tiny()
    out = measure_latency(model, (2, 4, 4), runs=5, warmup=1, device="cuda")
    assert out["device"].startswith("cuda:") and out["p10_ms"] <= out["median_ms"] <= out["p90_ms"]
    assert next(model.parameters()).device.type == "cpu"


def test_count_macs_pure_macs_without_bias_norm_or_activation():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(48, 5, bias=False))
    # conv: 3x3 kernel * 2 input channels per output element, 3 * 4 * 4 outputs; linear: 48 * 5
    assert count_macs(model, (2, 4, 4)) == 9 * 2 * 48 + 48 * 5


def test_count_macs_torch_pruning_convention():
    conv_macs, conv_bias = 9 * 2 * 48, 48      # 3 x 4 x 4 outputs
    bn, relu, pool = 2 * 48, 48, 48            # per element of their inputs
    linear = 12 * 5 + 5                        # MACs + bias
    assert count_macs(_tiny(), (2, 4, 4)) == conv_macs + conv_bias + bn + relu + pool + linear


def test_count_macs_strided_grouped_conv_and_model_untouched():
    model = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)  # 8x8 -> 4x4
    assert count_macs(model, (4, 8, 8)) == 9 * (4 // 2) * 6 * 16
    assert not hasattr(model, "__flops__")


def test_count_macs_vgg_spec_matches_hand_count():
    spec = {"arch": "vgg", "cfg": [4, "M"], "in_channels": 1, "num_classes": 3}
    model = M.build(spec)
    # conv 1->4 on 8x8 (+bias), BN, ReLU, MaxPool on 4x8x8, AdaptiveAvgPool on 4x4x4, Linear 4->3 (+bias)
    expected = 9 * 1 * 4 * 64 + 4 * 64 + 2 * 256 + 256 + 256 + 64 + 4 * 3 + 3
    assert count_macs(model, (1, 8, 8)) == expected
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(model, (1, 8))


def test_median_interval_is_the_order_statistics_of_the_binomial():
    from spvr_lib.latency import median_interval
    # n = 30: the 95% interval of the median is x_(10) .. x_(21) (the textbook table)
    assert median_interval(list(range(30, 0, -1))) == (15.5, 10.0, 21.0)
    # n = 5: too few for 95% (P(all on one side) = 1/16 > 2.5%): the whole range
    assert median_interval([5, 1, 3, 2, 4]) == (3.0, 1.0, 5.0)
    with pytest.raises(ValueError, match="empty"):
        median_interval([])


def test_interleaved_timing_tells_a_slower_network_apart():
    import time as _time
    from torch import nn
    from spvr_lib.latency import measure_interleaved

    class Slow(nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds, self.lin = seconds, nn.Linear(4, 2)

        def forward(self, x):
            _time.sleep(self.seconds)
            return self.lin(x.flatten(1)[:, :4])

    out = measure_interleaved({"fast": Slow(0.0), "slow": Slow(0.002)}, (1, 2, 2), rounds=8, runs_per_round=3,
                              warmup=1, threads=1)
    assert set(out) == {"fast", "slow"} and out["fast"]["runs"] == 24 and out["slow"]["threads"] == 1
    assert out["fast"]["low_ms"] <= out["fast"]["median_ms"] <= out["fast"]["high_ms"]
    assert out["fast"]["high_ms"] < out["slow"]["low_ms"] and out["slow"]["median_ms"] >= 2.0
    with pytest.raises(ValueError, match="rounds"):
        measure_interleaved({"fast": Slow(0.0)}, (1, 2, 2), rounds=0)
