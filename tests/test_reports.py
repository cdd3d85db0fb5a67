"""A run's report tells the whole story: the delivered model's metric (after the final fine-tune),
before/after FLOPs, parameters and latency, the trajectory from the original to the delivered
model, the limits that applied, what was pinned and why; plots that can be read."""

import io
import json

import pytest
import torch
from torch import nn
from rich.console import Console

import prunekit
from prunekit.reports import graph_report, render_graph_report
from prunekit.reports.dot import to_dot
from prunekit.reports.plots import MAX_LAYERS, _metric_limits, plot_trajectory, plot_widths
from prunekit.reports.run import render_markdown
from prunekit.data.trainer import evaluate, finetune
from prunekit.zoo import unet

HERE = "tests.test_reports"
KW = {"in_channels": 1, "num_classes": 2, "width": 4, "depth": 2}
SHAPE = (1, 1, 32, 32)


def tiles(split: str = "train"):
    """Four batches of a bright-square segmentation task the U-Net can learn in a few steps."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    batches = []
    for _ in range(4):
        y = torch.zeros(4, 32, 32, dtype=torch.long)
        for i in range(4):
            r, c = torch.randint(0, 24, (2,), generator=g).tolist()
            y[i, r:r + 8, c:c + 8] = 1
        batches.append((y.unsqueeze(1).float() + 0.1 * torch.randn(4, 1, 32, 32, generator=g), y))
    return batches


def config(**extra):
    base = {
        "targets": {"flops": 0.5}, "importance": {"method": "l1"},
        "limits": {"layers": {"out": 0.0, "dec1.*": 0.25}}, "schedule": {"steps": 2, "finetune": {"iterations": 10, "lr": 0.01},
                                                               "final_finetune": {"iterations": 20, "lr": 0.01}},
        "data": {"train": {"factory": f"{HERE}:tiles"}, "val": {"factory": f"{HERE}:tiles", "kwargs": {"split": "val"}}},
        "latency": {"repeats": 3, "warmup": 1},
    }
    base.update(extra)
    return base


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = unet(**KW)
    finetune(model, tiles(), 40, lr=0.01, seed=0, show_progress=False)  # a model with a metric worth keeping
    out = tmp_path_factory.mktemp("reports") / "run"
    result = prunekit.prune(model, torch.randn(SHAPE), config(), run_dir=out, progress=False)
    return result, out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_the_delivered_models_metric_is_the_last_trajectory_point(run):
    result, _, report, _ = run
    final = report["trajectory"][-1]
    assert final["step"] == "final" and final["from_step"] == result.best_step
    delivered = evaluate(result.model, tiles("val"))
    assert final["metric"] == pytest.approx(delivered) == pytest.approx(result.metrics["final"])
    assert report["trajectory"][0]["label"] == "original" and report["trajectory"][0]["metric"] is not None
    assert [row["step"] for row in report["trajectory"][1:-1]] == [h.step for h in result.history]
    # the final fine-tune changed the model after the last step's metric was taken
    assert final["metric"] != report["steps"][-1]["metric"]


def test_markdown_has_before_and_after_the_limits_and_the_pins(run):
    result, _, report, md = run
    assert "| FLOPs |" in md and "| parameters |" in md and "| latency |" in md and "| metric |" in md
    assert f"{result.metrics['original']:.4f}" in md and f"{result.metrics['final']:.4f}" in md
    assert f"| final (step {result.best_step} + fine-tune) |" in md
    assert f"- Delivered model: step {result.best_step}'s model after the final fine-tune (20 iterations" in md
    assert "## Limits" in md and "`dec1.*`: at most 25% removed; applies to `dec1.block.0`, `dec1.block.3`" in md
    assert "`out`: never touched" in md
    assert "- round_to: 8 (layers of 32 channels or more keep multiples of 8; narrower ones are pruned freely)" in md
    assert "- Calibration data: none needed (the weights alone)" in md  # l1
    assert "## Pinned channels" in md and "model output" in md and "model input" in md
    assert report["limits_applied"]["layers"]["out"]["matches"] == ["out"]
    assert report["latency"]["original_seconds"] > 0


def test_a_pinned_layer_shows_pinned_and_a_zero_limit_is_never_reached(run):
    _, _, report, md = run
    (out,) = [row for row in report["layers"] if row["name"] == "out"]
    assert out["pinned"] and out["limit"] is None  # a model output: no limit would let it shrink
    assert "| out | Conv2d | 2 -> 2 | pinned |" in md
    assert "out" not in report["limits_applied"]["at_limit"]  # limit 0 is 'never touched', not 'reached'
    assert "A unit is a channel with everything that must go with it" in md


def test_the_plots_are_pngs(run):
    _, out, _, _ = run
    for name in ("trajectory.png", "widths.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_metric_axis_starts_at_a_meaningful_baseline():
    assert _metric_limits([0.8375, 0.8575]) == (0.0, 1.1)  # not a 0.02 range
    low, high = _metric_limits([12.0, 12.2])
    assert low == 0 and high > 12.2
    low, high = _metric_limits([-0.52, -0.50])  # a negative loss: a span of at least a tenth
    assert high - low >= 0.05


def _report_with_layers(n: int) -> dict:
    layers = [{"name": f"features.{i}.block.conv_with_a_long_name", "type": "Conv2d", "channels_before": 64,
               "channels_after": 64 - (i % 17), "params_before": 1, "params_after": 1, "flops_before": 1,
               "flops_after": 1} for i in range(n)]
    steps = [{"step": s, "flops": 1, "params": 1, "flops_ratio": 1 - 0.1 * s, "params_ratio": 1 - 0.08 * s,
              "removed_units": 3, "metric": 0.85 - 0.01 * s, "seconds": 1.0, "latency_ratio": None} for s in (1, 2, 3)]
    return {"layers": layers, "steps": steps, "targets": {"flops": 0.7, "params": 1.0, "latency": None}}


def test_plots_scale_with_the_layer_count():
    from PIL import Image

    small = Image.open(io.BytesIO(plot_widths(_report_with_layers(10))))
    large = Image.open(io.BytesIO(plot_widths(_report_with_layers(300))))
    assert large.height > small.height
    capped = Image.open(io.BytesIO(plot_widths(_report_with_layers(MAX_LAYERS + 5))))
    assert capped.height == large.height  # at most MAX_LAYERS bars: names stay readable
    assert plot_trajectory(_report_with_layers(3))[:4] == b"\x89PNG"  # an older report (no trajectory key)


def test_markdown_of_an_older_report_still_renders(run):
    _, _, report, _ = run
    older = {k: v for k, v in report.items() if k not in ("trajectory", "limits_applied", "pins", "metric_source")}
    text = render_markdown(older)
    assert "## Trajectory" in text and "## Layers" in text


def test_graph_table_never_breaks_a_name_inside_a_word():
    import torchvision

    model = torchvision.models.mobilenet_v3_small().eval()
    data = graph_report(prunekit.build_graph(model, torch.randn(1, 3, 64, 64)))
    buffer = io.StringIO()
    render_graph_report(data, Console(file=buffer, width=80, color_system=None))
    text = buffer.getvalue()
    words = {w.strip(",'") for line in text.splitlines() for w in line.split()}
    names = {p for g in data["groups"] for p in g["producers"]} | {c for g in data["groups"] for c in g["consumers"]}
    assert all(len(line) <= 80 for line in text.splitlines())
    assert names <= words, sorted(names - words)[:5]


def test_graph_counts_channels_where_a_unit_is_a_block_of_them():
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 2, 1)).eval()
    data = graph_report(prunekit.build_graph(model, torch.randn(1, 1, 8, 8)))
    (group,) = [g for g in data["groups"] if g["producers"] == ["0"]]
    assert (group["size"], group["channels"], group["prunable_units"], group["prunable_channels"]) == (4, 16, 4, 16)
    assert (data["totals"]["channels"], data["totals"]["prunable_channels"]) == (16 + 2 + 1, 16)
    buffer = io.StringIO()
    render_graph_report(data, Console(file=buffer, width=100, color_system=None))
    text = buffer.getvalue()
    assert "cut in blocks of 4 channels (4 blocks)" in text
    assert "16 of 19 channels can be pruned" in text
    assert "16 channels, all prunable" in to_dot(prunekit.build_graph(model, torch.randn(1, 1, 8, 8)))


def test_graph_to_a_file_keeps_long_names_whole():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            inner = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
            self.an_encoder_block_with_a_rather_long_name = nn.ModuleDict(
                {"and_a_submodule_whose_name_goes_on_and_on": inner})

        def forward(self, x):
            return self.an_encoder_block_with_a_rather_long_name["and_a_submodule_whose_name_goes_on_and_on"](x)

    data = graph_report(prunekit.build_graph(Deep().eval(), torch.randn(1, 1, 8, 8)))
    buffer = io.StringIO()
    render_graph_report(data, Console(file=buffer, width=80, color_system=None))  # not a terminal
    words = {w.strip(",'") for line in buffer.getvalue().splitlines() for w in line.split()}
    names = {p for g in data["groups"] for p in g["producers"]} | {c for g in data["groups"] for c in g["consumers"]}
    assert max(len(n) for n in names) > 80 // 2 and names <= words, sorted(names - words)
