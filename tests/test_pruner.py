"""The pruning loop: targets, limits, resume, outputs, errors."""

import json

import numpy as np
import pytest
import torch
import torchvision

import prunekit
from helpers import interrupt_scoring
from prunekit.costs import fvcore_counts
from prunekit.zoo import unet

UNET = {"in_channels": 1, "num_classes": 2, "width": 8, "depth": 3}


def seg_batches(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.rand(4, 1, size, size, generator=g)
        out.append((x, (x[:, 0] > 0.5).long()))
    return out


def make_unet():
    torch.manual_seed(0)
    return unet(**UNET).eval()


def unet_config(**overrides):
    cfg = {
        "model": {"builder": "prunekit.zoo:unet", "kwargs": dict(UNET)},
        "targets": {"flops": 0.5, "params": 0.6},
        "limits": {"default": 0.8, "layers": {"out": 0.0}},
        "schedule": {"steps": 3},
        "data": {"calibration": {"factory": "tests.test_pruner:seg_batches"}},
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.mark.parametrize("method", ["ipad", "l1", "l2", "bn_scale", "random"])
def test_unet_reaches_both_targets(method):
    model = make_unet()
    x = torch.rand(1, 1, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prunekit.prune(model, x, unet_config(importance={"method": method}), progress=False)
    assert result.targets_met
    flops0, _ = fvcore_counts(model, x)
    flops1, _ = fvcore_counts(result.model, x)
    params0 = sum(p.numel() for p in model.parameters())
    params1 = sum(p.numel() for p in result.model.parameters())
    assert flops1 <= 0.5 * flops0 and params1 <= 0.6 * params0
    # the binding target is hit closely: no removal beyond what the targets need
    assert max(flops1 / flops0 / 0.5, params1 / params0 / 0.6) >= 0.95
    assert result.final == {"flops": flops1, "params": params1}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    assert result.model(x).shape == (1, 2, 32, 32)


class _ThresholdPlanner:
    """A stand-in planner whose goals are step numbers: the model meets every goal below ``threshold``."""

    def __init__(self, threshold: int):
        self.threshold, self.calls = threshold, 0

    def plan(self, scores, goal: int):
        from prunekit.planner import Plan

        self.calls += 1
        return Plan(np.array([] if goal < self.threshold else [goal], dtype=np.int64), 0, 0, True)


@pytest.mark.parametrize("steps", [1, 2, 7, 100, 10**9])
def test_steps_whose_goals_are_met_already_are_skipped_by_bisection(steps):
    from prunekit.loop import _first_plan_that_cuts

    for step in sorted({1, 2, steps // 2, steps} - {0} - set(range(steps + 1, 3))):
        for threshold in sorted({1, step, step + 1, step + 2, steps // 3, steps - 1, steps, steps + 1} - {0}):
            planner = _ThresholdPlanner(threshold)
            plan = _first_plan_that_cuts(planner, None, lambda k: k, step, steps)
            first = max(step, threshold)  # the first step, from ``step`` on, whose goal is not met yet
            assert plan.units.tolist() == ([first] if first <= steps else []), (step, threshold)
            assert planner.calls <= 2 + max(steps - step, 1).bit_length()


def test_a_huge_step_count_finishes():
    result = prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32),
                            unet_config(importance={"method": "l1"}, schedule={"steps": 10**9},
                                        targets={"flops": 0.8, "params": 1.0}), progress=False)
    assert result.targets_met and 1 <= len(result.history) <= 40


def test_limits_are_respected():
    model = make_unet()
    x = torch.rand(1, 1, 32, 32)
    limits = {"default": 0.6, "layers": {"out": 0.0, "enc1.*": 0.0, "dec1.block.3": 0.25}}
    result = prunekit.prune(model, x, unet_config(limits=limits, importance={"method": "l1"}), progress=False)
    widths0 = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    widths1 = {n: m.out_channels for n, m in result.model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for name, before in widths0.items():
        after = widths1[name]
        assert after >= 1
        if name == "out" or name.startswith("enc1."):
            assert after == before, name
        elif name == "dec1.block.3":
            assert before - after <= int(0.25 * before), name
        else:
            assert before - after <= int(0.6 * before), name


def test_round_to_keeps_multiples():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(1, 3, 32, 32)
    cfg = {"targets": {"flops": 0.6}, "importance": {"method": "l1"}, "limits": {"round_to": 8, "layers": {"fc": 0}},
           "schedule": {"steps": 2}}
    result = prunekit.prune(model, x, cfg, progress=False)
    assert result.targets_met
    for name, m in result.model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.out_channels % 8 == 0, (name, m.out_channels)


@pytest.mark.parametrize("builder", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("method", ["l1", "ipad"])
def test_torchvision_targets(builder, method):
    model = getattr(torchvision.models, builder)(num_classes=10).eval()
    x = torch.rand(1, 3, 32, 32)
    cfg = {"targets": {"flops": 0.5, "params": 0.7}, "importance": {"method": method},
           "limits": {"layers": {"fc": 0} if builder == "resnet18" else {"classifier.*": 0}}, "schedule": {"steps": 2},
           "data": {"calibration": {"factory": "tests.test_pruner:rgb_batches"}}}
    result = prunekit.prune(model, x, cfg, progress=False)
    flops0, _ = fvcore_counts(model, x)
    flops1, _ = fvcore_counts(result.model, x)
    assert result.targets_met and flops1 <= 0.5 * flops0
    assert sum(p.numel() for p in result.model.parameters()) <= 0.7 * sum(p.numel() for p in model.parameters())
    result.model.train()
    assert result.model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def rgb_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(4, 3, 32, 32, generator=g) for _ in range(2)]


class _MostlyPinned(torch.nn.Module):
    """Most FLOPs in a conv whose channels are reordered (so pinned); a small free layer after it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 8, 1), torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x).flip(1))))


def test_a_target_the_pinned_channels_put_out_of_reach_is_blamed_on_them_not_the_limits():
    torch.manual_seed(0)
    cfg = {"targets": {"flops": 0.5}, "importance": {"method": "l1"}, "limits": {"default": 1.0}}
    result = prunekit.prune(_MostlyPinned().eval(), torch.rand(1, 3, 16, 16), cfg, progress=False)
    assert not result.targets_met
    assert "channels that must stay" in result.message and "raise limits" not in result.message
    assert "hold 76.6% of the FLOPs" in result.message  # a's 3*64*9 of 3*64*9 + 64*8 + 8*2 per output pixel


def test_unreachable_target_stops_with_best_reached():
    model = make_unet()
    x = torch.rand(1, 1, 32, 32)
    cfg = unet_config(targets={"flops": 0.1}, limits={"default": 0.3}, importance={"method": "l1"})
    result = prunekit.prune(model, x, cfg, progress=False)
    assert not result.targets_met
    assert "limits stop pruning" in result.message and "raise limits.default" in result.message
    assert result.final["flops"] < result.original["flops"]
    widths0 = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for n, m in result.model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and n != "out":
            assert widths0[n] - m.out_channels <= int(0.3 * widths0[n])


def test_stop_when_any():
    model = make_unet()
    x = torch.rand(1, 1, 32, 32)
    cfg = unet_config(targets={"flops": 0.5, "params": 0.05, "stop_when": "any"}, importance={"method": "l1"})
    result = prunekit.prune(model, x, cfg, progress=False)
    assert result.targets_met and result.final["flops"] <= 0.5 * result.original["flops"]


def test_custom_scorer_plugs_in():
    model = make_unet()
    x = torch.rand(1, 1, 32, 32)
    seen = []

    def scorer(model, graph, batches, seed):
        seen.append(seed)
        return {name: torch.arange(len(units), dtype=torch.float32).flip(0) for name, units in graph.producers.items()}

    result = prunekit.prune(model, x, unet_config(importance={"method": scorer}), progress=False)
    assert result.targets_met and seen  # called once per step with the seed option
    # highest index scored lowest: the first filters of enc1.block.0 survive
    kept = result.model.enc1.block[0].weight
    assert torch.equal(kept, model.enc1.block[0].weight[:kept.shape[0]])


def test_finetune_validate_keep_best_and_outputs(tmp_path):
    model = make_unet()
    x = torch.rand(1, 1, 32, 32)
    cfg = unet_config(
        schedule={"steps": 2, "finetune": {"iterations": 3}},
        data={"calibration": {"factory": "tests.test_pruner:seg_batches"},
              "train": {"factory": "tests.test_pruner:seg_batches"},
              "val": {"factory": "tests.test_pruner:seg_batches", "kwargs": {"seed": 5}}},
        keep_best=2)
    run = tmp_path / "run"
    result = prunekit.prune(model, x, cfg, run_dir=run, progress=False)
    assert result.targets_met and all(h.metric is not None for h in result.history)
    assert len(result.candidates) <= 2
    for name in ("model.pt", "manifest.json", "report.json", "report.md", "trajectory.png", "widths.png"):
        assert (run / name).is_file(), name
    state = torch.load(run / "model.pt", weights_only=True)
    assert set(state) == set(result.model.state_dict())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["builder"] == "prunekit.zoo:unet" and manifest["modules"]
    report = json.loads((run / "report.json").read_text())
    assert report["importance"]["method"] == "ipad" and len(report["steps"]) == len(result.history)
    loaded = prunekit.load_pruned(run)
    assert torch.allclose(loaded(x), result.model(x), atol=1e-6)
    assert (run / "trajectory.png").read_bytes()[:4] == b"\x89PNG"


class Interrupt(Exception):
    pass


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    cfg = unet_config(schedule={"steps": 3, "finetune": {"iterations": 2}},
                      data={"calibration": {"factory": "tests.test_pruner:seg_batches"},
                            "train": {"factory": "tests.test_pruner:seg_batches"}})
    x = torch.rand(1, 1, 32, 32)
    full = prunekit.prune(make_unet(), x, cfg, run_dir=tmp_path / "full", progress=False)

    interrupt_scoring(monkeypatch, at=2)
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(make_unet(), x, cfg, run_dir=tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    resumed = prunekit.prune(make_unet(), x, cfg, run_dir=tmp_path / "cut", resume=True, progress=False)
    assert [h.flops for h in resumed.history] == [h.flops for h in full.history]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_dir_needs_force(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    for force in (False, True):  # not a prunekit run: never overwritten, not even with force
        with pytest.raises(prunekit.PrunekitError, match="not a prunekit run directory"):
            prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32), unet_config(), run_dir=run, force=force,
                           progress=False)
    assert [p.name for p in run.iterdir()] == ["keep.txt"] and (run / "keep.txt").read_text() == "mine"
    done = tmp_path / "done"
    prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32), unet_config(), run_dir=done, progress=False)
    with pytest.raises(prunekit.PrunekitError, match="already exists; pass --force"):
        prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32), unet_config(), run_dir=done, progress=False)


def test_bad_inputs_leave_no_run_dir(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(prunekit.PrunekitError, match="does not exist"):
        prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32), unet_config(targets={"flop": 0.5}), run_dir=run)
    with pytest.raises(prunekit.PrunekitError, match="needs training data"):
        prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32),
                       unet_config(schedule={"finetune": {"iterations": 5}}), run_dir=run)
    with pytest.raises(prunekit.PrunekitError):
        prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32),
                       unet_config(data={"calibration": {"images": str(tmp_path / "missing")}}), run_dir=run)
    assert not run.exists()


def test_taylor_uses_the_training_loss():
    model = make_unet()
    x = torch.rand(1, 1, 32, 32)
    cfg = unet_config(importance={"method": "taylor"},
                      data={"calibration": {"factory": "tests.test_pruner:seg_batches"},
                            "train": {"factory": "tests.test_pruner:seg_batches"}})
    result = prunekit.prune(model, x, cfg, progress=False)
    assert result.targets_met
    graph = prunekit.build_graph(model, x)
    from prunekit.importance.activations import taylor
    from prunekit.data.trainer import loss_for

    scores = taylor(model, graph, [], loss_batches=seg_batches(), loss_fn=loss_for("segmentation"))
    assert set(scores) >= {"enc1.block.0", "dec1.block.3"}
    assert all((s >= 0).all() and s.shape == (len(graph.producers[n]),) for n, s in scores.items())
    assert any(s.max() > 0 for s in scores.values())
    with pytest.raises(prunekit.PrunekitError, match="needs a loss"):
        prunekit.prune(model, x, unet_config(importance={"method": "taylor"}), progress=False)


class _Cycle:
    def __init__(self):
        self.me = self


def test_prune_leaves_the_garbage_collector_as_it_found_it():
    """A prune keeps the objects that existed before it out of garbage collections (gc.freeze), collects
    its own garbage as it ends and unfreezes; a caller's own frozen objects and a disabled collector stay."""
    import gc
    import weakref

    cfg = unet_config(importance={"method": "l1"}, targets={"flops": 0.8, "params": 1.0})
    assert gc.get_freeze_count() == 0
    seen = []

    def scorer(model, graph, batches=None):  # garbage made inside the prune: a reference cycle
        cycle = _Cycle()
        seen.append(weakref.ref(cycle))
        assert gc.get_freeze_count() > 0  # the objects from before the prune are frozen meanwhile
        return prunekit.importance.SCORERS["l1"](model, graph)

    prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32), unet_config(importance={"method": scorer},
                   targets={"flops": 0.8, "params": 1.0}), progress=False)
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    assert seen and all(ref() is None for ref in seen)  # collected before the prune returned

    gc.freeze()  # the caller's own freeze is theirs
    try:
        prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32), cfg, progress=False)
        assert gc.get_freeze_count() > 0  # not unfrozen (frozen objects that die leave the count)
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32), cfg, progress=False)
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
