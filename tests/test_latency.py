"""measure_latency: what it returns and what it leaves alone (timings themselves are benchmarks' job)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.latency import compare_latency, measure_latency


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_measure_latency_reports_median_spread_and_where():
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    lat = measure_latency(model, torch.randn(1, 3, 16, 16), threads=1, repeats=7, warmup=2)
    assert lat.median > 0 and lat.spread >= 0 and lat.repeats == 7
    assert lat.device == "cpu" and lat.threads == 1 and lat.torch == torch.__version__
    assert set(lat.as_dict()) == {"median", "spread", "repeats", "device", "threads", "torch"}
    # the caller's model keeps its mode and its statistics; torch keeps its thread count
    assert model.training and torch.get_num_threads() == threads
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_compare_latency_interleaves_every_model():
    small, big = _model(), nn.Sequential(_model(), nn.Conv2d(4, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    result = compare_latency({"small": small.eval(), "big": big.eval()}, torch.randn(1, 3, 32, 32), repeats=5, warmup=1)
    assert set(result) == {"small", "big"} and all(r.repeats == 5 for r in result.values())


@pytest.mark.parametrize("kwargs, match", [
    ({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"threads": 0}, "threads"),
    ({"device": "gpu0"}, "not a device"), ({"repeats": True}, "repeats"), ({"budget": 0}, "budget"),
    ({"budget": "1s"}, "budget"),
])
def test_bad_arguments_are_one_sentence(kwargs, match):
    with pytest.raises(prunekit.PrunekitError, match=match):
        measure_latency(_model(), torch.randn(1, 3, 8, 8), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_sentence():
    with pytest.raises(prunekit.PrunekitError, match="no CUDA device"):
        measure_latency(_model(), torch.randn(1, 3, 8, 8), device="cuda")


def test_time_calls_times_any_zero_argument_calls_interleaved():
    from prunekit.latency import time_calls

    seen = []
    result = time_calls({"a": lambda: seen.append("a"), "b": lambda: seen.append("b")}, repeats=4, warmup=1)
    assert set(result) == {"a", "b"} and all(r.repeats == 4 and r.median >= 0 for r in result.values())
    assert seen[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # after the warm-up, who goes first rotates


def test_a_time_budget_cuts_the_repeats_short_but_never_below_the_minimum():
    import time

    from prunekit.latency import MIN_REPEATS, time_calls

    def slow():
        time.sleep(0.01)

    short = time_calls({"a": slow, "b": slow}, repeats=50, warmup=0, budget=0.001)
    assert all(r.repeats == MIN_REPEATS for r in short.values())
    roomy = time_calls({"a": slow}, repeats=8, warmup=0, budget=60.0)
    assert roomy["a"].repeats == 8  # a budget that is not used up changes nothing
