"""Latency tables, the latency a removal is predicted to leave, round_to: auto, and a latency target.

The arithmetic is checked with synthetic tables (seconds = a known function of the widths), so the
tests do not depend on how fast this machine is; one test measures real tables on a tiny model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import prunekit
from prunekit import latency_model as lm
from prunekit.cli import main
from prunekit.config import Limits
from prunekit.costs import CostModel
from prunekit.planner import Planner, Targets
from prunekit.surgery import apply_removal
from prunekit.zoo import resnet_small, small_cnn, unet

X = torch.randn(1, 3, 32, 32)


def _synthetic(model, graph, seconds=lambda cin, cout: cin * cout * 1e-6, rest=0.0, fixed=0.0):
    """Tables as :meth:`LatencyTables.measure` builds them, with ``seconds`` instead of a stopwatch."""
    layers, tables, outputs = {}, {}, {}
    for key, node, module in lm.latency_calls(model, graph):
        shape = tuple(node.args[0].meta["prunekit_shape"])
        cin0 = shape[-1] if isinstance(module, torch.nn.Linear) else shape[1]
        cout0 = node.meta["prunekit_shape"][-1 if isinstance(module, torch.nn.Linear) else 1]
        cins, couts = lm._grid(cin0), lm._grid(cout0)
        signature = layers[key] = key  # one table per call: exact, no sharing
        tables[signature] = lm.Table(cins, couts, [[seconds(i, o) for o in couts] for i in cins], False, cout0, cin0)
        outputs[key] = int(np.prod(node.meta["prunekit_shape"]))
    return lm.LatencyTables({}, layers, tables, outputs, rest, fixed)


def test_table_interpolates_between_grid_points_and_hits_them_exactly():
    t = lm.Table([8, 16], [8, 32], [[1.0, 3.0], [2.0, 6.0]], False, 32, 16)
    assert t.at(8, 8) == 1.0 and t.at(16, 32) == 6.0
    assert t.at(12, 8) == pytest.approx(1.5) and t.at(8, 20) == pytest.approx(2.0)
    assert t.at(100, 100) == 6.0  # clamped to the grid


def test_grid_is_aligned_to_8_for_wide_layers_and_includes_the_full_width():
    assert lm._grid(64) == [16, 32, 48, 64]
    assert lm._grid(37)[-1] == 37 and all(w % 8 == 0 for w in lm._grid(37)[:-1])
    assert lm._grid(3) == [1, 2, 3]


@pytest.mark.parametrize("build", [lambda: unet(width=8, depth=2), lambda: resnet_small(width=8)])
def test_predicted_ratio_follows_the_kept_widths(build):
    torch.manual_seed(0)
    model = build().eval()
    graph = prunekit.build_graph(model, X)
    tables = _synthetic(model, graph)
    model_now = lm.LatencyModel(model, graph, tables)
    assert model_now.ratio(None) == pytest.approx(1.0)
    units = np.flatnonzero(~graph.pinned)
    removed = graph.removal_mask(np.random.default_rng(0).choice(units, len(units) // 3, replace=False))
    pruned = apply_removal(model, graph, removed)

    def products(m):  # cin * cout of every table layer, read from a fresh trace
        g = prunekit.build_graph(m, X)
        return sum(node.args[0].meta["prunekit_shape"][1] * node.meta["prunekit_shape"][1]
                   for _, node, _ in lm.latency_calls(m, g))

    # seconds = cin * cout is bilinear, so the interpolation between grid points is exact
    assert model_now.ratio(removed) == pytest.approx(products(pruned) / products(model), rel=1e-9)
    # calibration: the current model measured at 0.8 predicts 0.8 for no removal, and scales the rest
    calibrated = lm.LatencyModel(model, graph, tables, measured_ratio=0.8)
    assert calibrated.ratio(None) == pytest.approx(0.8)
    assert calibrated.ratio(removed) == pytest.approx(0.8 * model_now.ratio(removed))


def test_unit_seconds_price_every_prunable_unit_and_sum_to_about_the_tables():
    torch.manual_seed(0)
    model = small_cnn(in_channels=3).eval()
    graph = prunekit.build_graph(model, X)
    model_now = lm.LatencyModel(model, graph, _synthetic(model, graph))
    cost = model_now.unit_seconds()
    prunable = np.flatnonzero(~graph.pinned)
    assert (cost[prunable] > 0).all()
    one = prunable[:1]
    assert model_now.ratio(None) - model_now.ratio(graph.removal_mask(one)) == pytest.approx(cost[one[0]], rel=0.3)


def test_the_rest_of_the_model_shrinks_with_its_activations_except_its_fixed_share():
    torch.manual_seed(0)
    model = small_cnn(in_channels=3).eval()
    graph = prunekit.build_graph(model, X)
    zero = lambda cin, cout: 0.0  # noqa: E731 - everything is in the rest
    units = np.flatnonzero(~graph.pinned)
    removed = graph.removal_mask(units[::2])
    shrinking = lm.LatencyModel(model, graph, _synthetic(model, graph, zero, rest=1.0, fixed=0.0))
    fixed = lm.LatencyModel(model, graph, _synthetic(model, graph, zero, rest=1.0, fixed=1.0))
    assert 0 < shrinking.ratio(removed) < 1
    assert fixed.ratio(removed) == pytest.approx(1.0)


def test_planner_meets_a_predicted_latency_goal():
    torch.manual_seed(0)
    model = resnet_small(width=8).eval()
    graph = prunekit.build_graph(model, X)
    costs = CostModel(model, graph)
    model_now = lm.LatencyModel(model, graph, _synthetic(model, graph))
    widths = {n: len(u) for n, u in graph.producers.items()}
    plan = Planner(graph, costs, Limits(default=0.9), widths, model_now).plan(
        np.random.default_rng(0).random(graph.num_units), Targets(costs.flops(), costs.params(), 1.0, 1.0,
                                                                  priority="latency", latency=0.5).done)
    assert plan.reached and plan.latency <= 0.5
    assert plan.latency == pytest.approx(model_now.ratio(graph.removal_mask(plan.units)))


def test_tables_are_measured_for_every_layer_call_and_saved_as_json():
    torch.manual_seed(0)
    model = small_cnn(in_channels=3).eval()
    graph = prunekit.build_graph(model, X)
    settings = lm.Settings(threads=1, repeats=3, warmup=1)
    tables = lm.LatencyTables.measure(model, graph, X, settings)
    keys = [k for k, _, _ in lm.latency_calls(model, graph)]
    assert sorted(tables.layers) == sorted(keys) and tables.rest >= 0 and 0 <= tables.fixed <= 1
    assert all(min(min(row) for row in t.seconds) > 0 for t in tables.tables.values())
    again = lm.LatencyTables.from_json(tables.as_json(), settings)
    assert again is not None and again.tables == tables.tables and again.layers == tables.layers
    assert lm.LatencyTables.from_json(tables.as_json(), lm.Settings(threads=2)) is None  # another machine's
    assert lm.LatencyTables.from_json("{not json", settings) is None


@pytest.mark.parametrize("penalty, expected", [(True, 8), (False, 1)])
def test_round_to_auto_picks_the_alignment_the_device_rewards(monkeypatch, penalty, expected):
    torch.manual_seed(0)
    model = resnet_small(width=32).eval()
    graph = prunekit.build_graph(model, X)
    tables = _synthetic(model, graph)

    def stopwatch(module, shape, cin, cout, settings):
        # a device that runs widths of multiples of 8 fastest: anything else costs the next multiple of 8, and more
        if penalty and cout % 8:
            return cin * (cout // 8 + 1) * 8 * 1.5e-6
        return cin * cout * 1e-6

    monkeypatch.setattr(lm, "_time_layer", stopwatch)
    assert lm.choose_alignment(model, graph, tables, lm.Settings()) == expected


def _scripted_measurements(monkeypatch, ratios):
    """Make every measurement of the pruned model return the next of ``ratios`` (the last repeats)."""
    seen = []

    def measure(self, model):
        ratio = ratios[min(len(seen), len(ratios) - 1)]
        seen.append(ratio)
        return {"original_seconds": 1.0, "pruned_seconds": ratio, "ratio": ratio, "spread": [0, 0],
                "device": "cpu", "threads": 1, "torch": torch.__version__, "repeats": 3}

    monkeypatch.setattr(lm.LatencyGauge, "measure", measure)
    monkeypatch.setattr(lm.LatencyTables, "measure",
                        classmethod(lambda cls, model, graph, x, settings, progress=None: _synthetic(model, graph)))
    return seen


CONFIG = {"targets": {"latency": 0.5}, "importance": {"method": "l1"}, "schedule": {"steps": 2},
          "limits": {"default": 0.9}, "latency": {"repeats": 3, "warmup": 0}}


def test_a_latency_target_is_met_by_measurement_and_reported(monkeypatch, tmp_path):
    seen = _scripted_measurements(monkeypatch, [0.7, 0.47, 0.49, 0.48])
    result = prunekit.prune(small_cnn(in_channels=3).eval(), X, CONFIG, run_dir=tmp_path / "run", progress=False)
    assert [h.latency_ratio for h in result.history] == [0.7, 0.49]  # a met target is measured twice: the slower counts
    assert result.targets_met and result.message == "targets met"
    assert result.final["flops"] < result.original["flops"]
    assert result.latency["ratio"] == 0.48 and len(seen) == 4  # two steps (the second confirmed), the final check
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["latency"]["ratio"] == 0.48 and report["targets"]["latency"] == 0.5
    assert "- Latency: 1000.00 ms -> 480.00 ms (48.0%" in (tmp_path / "run" / "report.md").read_text()


def test_a_lucky_measurement_that_the_second_does_not_confirm_takes_another_step(monkeypatch):
    seen = _scripted_measurements(monkeypatch, [0.7, 0.45, 0.56, 0.49, 0.5, 0.49])
    result = prunekit.prune(small_cnn(in_channels=3).eval(), X, CONFIG, progress=False)
    assert [h.latency_ratio for h in result.history] == [0.7, 0.56, 0.5]
    assert result.targets_met and len(seen) == 6


def test_a_step_whose_goal_a_measurement_already_met_aims_at_the_next_one(monkeypatch):
    """After step 1 the device measures 65%, below step 2's goal (71%): step 2 cuts towards step 3's."""
    _scripted_measurements(monkeypatch, [0.65, 0.55, 0.45])
    result = prunekit.prune(small_cnn(in_channels=3).eval(), X, {**CONFIG, "schedule": {"steps": 4}}, progress=False)
    assert result.targets_met and result.message == "targets met", result.message
    assert [h.latency_ratio for h in result.history] == [0.65, 0.55, 0.45, 0.45][:len(result.history)]
    assert len(result.history) >= 3 and result.history[1].flops_ratio < result.history[0].flops_ratio


def test_a_latency_target_missed_by_the_measurement_takes_more_steps_then_stops_and_says_so(monkeypatch):
    _scripted_measurements(monkeypatch, [0.9])  # the device never gets faster
    result = prunekit.prune(small_cnn(in_channels=3).eval(), X, CONFIG, progress=False)
    from prunekit.loop import EXTRA_STEPS

    assert len(result.history) == CONFIG["schedule"]["steps"] + EXTRA_STEPS or "limits" in result.message
    assert not result.targets_met and "latency" in result.message


@pytest.mark.parametrize("bad, key", [({"targets": {"latency": 1.5}}, "targets.latency"),
                                      ({"targets": {"priority": "latency"}}, "targets.priority"),
                                      ({"limits": {"round_to": "fast"}}, "limits.round_to"),
                                      ({"latency": {"repeats": 1}}, "latency.repeats")])
def test_latency_config_errors_name_the_key(bad, key):
    with pytest.raises(prunekit.PrunekitError, match=key.replace(".", r"\.")):
        prunekit.load_config(bad)


def test_a_latency_target_frees_the_flops_target():
    cfg = prunekit.load_config({"targets": {"latency": 0.6}})
    assert cfg.targets.flops == 1.0 and cfg.targets.priority == "latency"
    assert prunekit.load_config({}).targets.flops == 0.5


def test_report_latency_compares_two_models_interleaved(tmp_path):
    torch.manual_seed(0)
    model = unet(width=8, depth=2)
    weights = tmp_path / "u.pt"
    torch.save(model.state_dict(), weights)
    args = ["report", str(weights), "--builder", "prunekit.zoo:unet", "--kwargs", '{"width": 8, "depth": 2}',
            "--input-shape", "1,3,32,32", "--latency", "--threads", "1", "--compare", str(weights), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    latency = json.loads(result.output)["latency"]
    assert latency["before"]["repeats"] == latency["after"]["repeats"] == 30 and latency["before"]["threads"] == 1
    assert latency["ratio"] == pytest.approx(latency["after"]["median"] / latency["before"]["median"])
    bad = CliRunner().invoke(main, args[:-5] + ["--latency", "--device", "tpu"])
    assert bad.exit_code == 2 and "not a device" in bad.output
