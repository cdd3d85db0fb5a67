"""The pruning loop: score, plan, cut, fine-tune, validate, keep the best, repeat.

    result = prunekit.prune(model, torch.randn(1, 3, 256, 256), "configs/unet.yaml", run_dir="out/")
    result.model          # the best pruned model that meets the targets
    result.history        # FLOPs, parameters and metric after every step

Step ``s`` of ``S`` removes the lowest-ranked units until the priority
resource (FLOPs or parameters) is at most ``target ** (s / S)`` of the
original, so the steps shrink the model geometrically; the last step (and
any step after it) removes until the targets themselves hold. If the
per-layer limits make a target unreachable the loop stops with a clear
message and keeps the best model it reached.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import distributed, rundir
from .arguments import check_path
from .artifacts import MANIFEST_FORMAT, width_changes
from .config import Config, load_config
from .costs import CostModel
from .data.devices import on_device, placed
from .errors import PrunekitError
from .graphs import build_graph, updated_graph
from .importance import score_units
from .latency_model import LatencyGauge
from .planner import Planner
from .run_context import Run
from .run_state import Candidate, CheckpointClock, StepRecord, own_weights, rebuild, shared_copy, \
    state_of
from .rundir import RunWriter
from .safety import existing_objects_frozen
from .surgery import apply_removal


@dataclass
class PruneResult:
    model: nn.Module
    history: list[StepRecord]
    original: dict[str, int]
    final: dict[str, int]
    targets_met: bool
    message: str
    best_step: int
    config: Config
    manifest: dict
    run_dir: Path | None = None
    candidates: list[dict] = field(default_factory=list)
    latency: dict | None = None  # the original's and the pruned model's measured latency, and where
    # what the importance scores were calibrated on: "data.calibration", "data.train", "random" (asked for
    # with data.calibration: random), "example input" (a custom scorer without data), None (weights only)
    calibration: str | None = None
    # the original's metric, and the delivered model's after the final fine-tune (None without data.val/validate)
    metrics: dict = field(default_factory=dict)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def prune(model: nn.Module, example_inputs, config, run_dir=None, resume: bool = False, force: bool = False,
          progress: bool = True, builder: str | None = None, builder_kwargs: dict | None = None, *,
          input_files=()) -> PruneResult:
    """Prune ``model`` until the config's FLOPs and parameter targets hold.

    ``config``: a :class:`~prunekit.config.Config`, a dict, or a YAML path.
    ``run_dir``: where the checkpoint and outputs go (model.pt, manifest.json,
    report.json, report.md, trajectory.png, widths.png); None keeps it all in
    memory. ``resume`` continues an interrupted run from its checkpoint;
    ``force`` replaces an earlier run there, once the new one is complete.
    ``input_files``: the files the model and config came from; the run
    directory may not be or hold one. The caller's model is never modified,
    and nothing is written before everything that can be checked is.
    """
    check_path(run_dir, "run_dir", optional=True)
    with distributed.joined(load_config(config).device) as world, existing_objects_frozen():  # ranks join here
        result = _prune(model, example_inputs, config, run_dir, resume, force, progress, builder, builder_kwargs,
                        input_files)
        world.barrier()  # every rank returns once rank 0 has written the run directory
        return result


def _prune(model, example_inputs, config, run_dir, resume, force, progress, builder, builder_kwargs, input_files):
    run = Run(model, example_inputs, config, run_dir, resume, force, progress, input_files)
    if run.run_dir is None or not run.world.main:  # only rank 0 writes
        return _loop(run, None, builder, builder_kwargs)
    with RunWriter(run.run_dir, run.mode, run.input_files) as writer:
        try:
            return _loop(run, writer, builder, builder_kwargs)
        except KeyboardInterrupt:
            raise rundir.Interrupted(str(run.run_dir), writer.resumable, writer.mode) from None
        except PrunekitError as exc:
            if writer.resumable:  # say that the finished steps are kept, and how to go on
                exc.args = (f"{str(exc).rstrip('.')}; the steps finished so far are kept: continue with --resume "
                            f"from '{run.run_dir}'.",)
            raise


def _loop(run: Run, writer: RunWriter | None, builder, builder_kwargs) -> PruneResult:
    cfg = run.config
    _seed(cfg.seed)
    history: list[StepRecord] = []
    candidates: list[Candidate] = []
    current = shared = shared_copy(run.original).eval()  # the caller's weights: only read, then cut into a copy
    step = 0
    if run.checkpoint is not None and (writer is None or writer.mode == "resume"):  # every rank resumes
        step, current, history, candidates = run.checkpoint
        run.log(f"resuming after step {step}")
    message = ""
    # the report's baseline, on a copy: the caller's model stays untouched
    original_metric = run.metric(copy.deepcopy(run.original)) if run.validate_fn or run.val else None
    graph, costs = (run.graph0, run.costs0) if step == 0 else (None, None)  # the untouched model's: built
    cut = None  # (graph, removed units, costs) of the last step: the next graph and costs are derived from them
    checkpoints = CheckpointClock(current)
    while True:
        if graph is None and cut is not None:
            graph = updated_graph(*cut[:2], current, run.inputs, cfg.model.leaf_modules)
            if graph.retraced:
                run.log(f"traced again after step {step}: {graph.retraced}")
            else:
                costs = cut[2].derived(graph)
            cut = None  # the old graph is not needed any more
        elif graph is None:
            graph = build_graph(current, run.inputs, cfg.model.leaf_modules)
        if costs is None:
            costs = CostModel(current, graph)
        flops, params = costs.totals()
        latency = history[-1].latency_ratio if history and run.gauge is not None else 1.0
        if run.targets.done(flops, params, latency):
            message = "targets met"
            break
        if run.gauge is not None and cfg.targets.latency is not None and step >= cfg.schedule.steps + EXTRA_STEPS:
            message = (f"the latency target ({cfg.targets.latency:.0%}) was not met in {step} steps: the model "
                       f"measures {latency:.1%} of the original's latency; prune further from this run's model")
            break
        step += 1
        _seed(cfg.seed + step)
        started = time.perf_counter()
        with placed(current, run.device):
            scores = run.world.scores(run.scorer, lambda sharded: score_units(
                current, graph, run.scorer, on_device(run.calibration_inputs(sharded), run.device),
                {**cfg.importance.scorer_options(), **run.scoring_options(step, sharded)}, cfg.importance.combine,
                cfg.importance.normalize, cfg.importance.allocation, costs, run.producer_widths0))
        predicted = run.gauge.planning_model(current, graph, latency) if run.gauge is not None else None
        if predicted is not None and cfg.targets.latency is not None:
            scores = scores / np.maximum(predicted.unit_seconds(), 1e-12)  # least importance per second saved first
        planner = Planner(graph, costs, cfg.limits, run.producer_widths0,
                          predicted if cfg.targets.latency else None, run.round_to)
        plan = _first_plan_that_cuts(planner, scores, run.targets.goal, step, cfg.schedule.steps)
        run.world.check_same(f"the plan of step {step}", [plan.units.tolist(), plan.flops, plan.params])
        if plan.units.size == 0:
            step -= 1
            message = _unreachable(run, flops, params)
            break
        cut = (graph, graph.removal_mask(plan.units), costs)
        if run.validate_fn is None and run.val is None and candidates and not candidates[0].meets:
            candidates[0].state = None  # no metric: this step's model will outrank it, so the cut may free it
        current = apply_removal(current, *cut[:2], in_place=current is not shared)
        own_weights(current, candidates)
        graph = costs = predicted = None
        if writer is None:
            run.graph0 = None  # only the run directory's report reads it again
        run.tune(current, cfg.schedule.finetune, step, f"fine-tune step {step}")
        metric = run.metric(current)
        measured = run.world.from_main(lambda: run.gauge.confirmed_ratio(current, cfg.targets.latency)) \
            if cfg.targets.latency is not None else None
        record = StepRecord(step, plan.flops, plan.params, plan.flops / run.flops0, plan.params / run.params0,
                            int(plan.units.size), metric, time.perf_counter() - started, measured)
        history.append(record)
        run.log(f"step {step}: FLOPs {record.flops_ratio:.1%}, params {record.params_ratio:.1%}"
                + (f", latency {measured:.1%} (predicted {plan.latency:.1%})" if measured is not None else "")
                + (f", metric {metric:.4f}" if metric is not None else ""))
        candidates.append(Candidate(step, metric, run.targets.done(plan.flops, plan.params, measured),
                                     state_of(current), width_changes(run.original_widths, current)))
        candidates = sorted(candidates, key=Candidate.rank, reverse=True)[:cfg.keep_best]
        for later in candidates[1:]:  # only the best one's weights can become the result
            later.state = None
        if writer is not None and checkpoints.due():  # only after a whole step: a failing one writes nothing
            checkpoints.save(run, writer, step, current, history, candidates)
        if not plan.reached and step >= cfg.schedule.steps:
            message = _unreachable(run, plan.flops, plan.params)
            break
    best = max(candidates, key=Candidate.rank) if candidates else None
    if best is not None:
        model_out = rebuild(run, best.widths, best.state)
        best_step = best.step
    else:
        model_out, best_step = copy.deepcopy(current), 0  # the result shares nothing with the caller's model
    final_started = time.perf_counter()
    if cfg.schedule.final_finetune is not None:
        _seed(cfg.seed + best_step + 1000)  # the same whether the run was resumed or not
        run.tune(model_out, cfg.schedule.final_finetune, best_step + 1000, "final fine-tune")
    sparse_report = _sparse_finetune(run, model_out, best_step) if cfg.sparsity is not None else None
    final_metric = run.metric(model_out)  # the delivered model's, after the final fine-tune
    final_seconds = time.perf_counter() - final_started
    run.log(f"final: step {best_step}'s model" + (" after the final fine-tune" if cfg.schedule.final_finetune else "")
            + (f", metric {final_metric:.4f}" if final_metric is not None else ""))
    if graph is not None and (best is None or best.step == step):
        final_graph, final_costs = graph, costs  # the loop's last graph already describes this model's structure
    else:
        final_graph = build_graph(model_out, run.inputs, cfg.model.leaf_modules)
        final_costs = CostModel(model_out, final_graph)
    final = dict(zip(("flops", "params"), final_costs.totals()))
    latency = None
    if run.gauge is not None or run.run_dir is not None:  # the report's before/after row; a latency target's verdict
        # without a latency target the row is informative only: a short measurement will do
        quick = replace(run.measuring(), warmup=min(cfg.latency.warmup, 1), budget=REPORT_LATENCY_SECONDS)
        gauge = run.gauge or LatencyGauge(run.original, run.inputs, None, quick)
        latency = run.world.from_main(lambda: gauge.measure(model_out.eval()))
        final["latency_ratio"] = latency["ratio"]
    result = PruneResult(
        model=model_out.eval(), history=history, original={"flops": run.flops0, "params": run.params0},
        final=final, targets_met=run.targets.done(final["flops"], final["params"], final.get("latency_ratio")),
        message=message,
        best_step=best_step, config=cfg,
        manifest={"format": MANIFEST_FORMAT, "builder": builder or cfg.model.builder,
                  "kwargs": builder_kwargs if builder_kwargs is not None else cfg.model.kwargs,
                  "input_shape": list(run.inputs[0].shape) if isinstance(run.inputs[0], torch.Tensor) else None,
                  "modules": width_changes(run.original_widths, model_out)},
        run_dir=run.run_dir,
        candidates=[{"step": c.step, "metric": c.metric, "meets_targets": c.meets} for c in candidates],
        latency=latency,
        calibration=run.calibration_from,
        metrics={"original": original_metric, "final": final_metric, "final_finetune_seconds": final_seconds},
    )
    if sparse_report is not None:
        result.metrics["sparsity"] = sparse_report
    if writer is not None:
        from .reports.run import write_outputs

        writer.begin()  # a run of cheap steps may have written no checkpoint: a complete run needs none
        write_outputs(result, run.original, run.graph0, final_graph, run.inputs, directory=writer.work)
        writer.complete()
    return result


def _first_plan_that_cuts(planner: Planner, scores: np.ndarray, goal: Callable, step: int, steps: int):
    """The plan for ``goal(step)``, or, when the model already meets it (a latency measured ahead of the
    schedule, a goal finer than one unit), for the first later step's goal that it does not meet.

    Goals only tighten with the step, so that step is found by bisection: a schedule of a million steps
    costs twenty plans, not a million.
    """
    plan = planner.plan(scores, goal(step))
    if not (plan.reached and plan.units.size == 0) or step >= steps:
        return plan
    met, unmet, unmet_plan = step, steps, planner.plan(scores, goal(steps))
    if unmet_plan.reached and unmet_plan.units.size == 0:
        return unmet_plan
    while unmet - met > 1:
        middle = (met + unmet) // 2
        candidate = planner.plan(scores, goal(middle))
        if candidate.reached and candidate.units.size == 0:
            met = middle
        else:
            unmet, unmet_plan = middle, candidate
    return unmet_plan


# timed seconds (both models together) that the report's latency row may take when there is no latency target
REPORT_LATENCY_SECONDS = 0.5

# steps a latency target may take beyond schedule.steps when the measured latency is still above it
EXTRA_STEPS = 4


def _unreachable(run: Run, flops: int, params: int) -> str:
    """Why pruning stopped short of the targets: the channels that must stay, when they alone exceed a
    target; otherwise the per-layer limits."""
    cfg = run.config
    latency = f", {cfg.targets.latency:.0%} latency" if cfg.targets.latency is not None else ""
    where = (f"at {flops / run.flops0:.1%} of the FLOPs and {params / run.params0:.1%} of the parameters, short "
             f"of the targets ({cfg.targets.flops:.0%} FLOPs, {cfg.targets.params:.0%} parameters{latency})")
    floor_flops, floor_params = (n / total for n, total in zip(run.pinned_floor, (run.flops0, run.params0)))
    if floor_flops > cfg.targets.flops or floor_params > cfg.targets.params:
        return (f"pruning stops {where}: the channels that must stay (pinned by the model's ops; 'prunekit "
                f"graph' lists them and why) hold {floor_flops:.1%} of the FLOPs and {floor_params:.1%} of the "
                "parameters even without any limit.")
    return f"the per-layer limits stop pruning {where}; raise limits.default or the per-layer limits to go further."


def _sparse_finetune(run: Run, model: nn.Module, best_step: int) -> dict:
    """The hook of prunekit.sparse: the delivered model trained sparse (config ``sparsity``); its report."""
    from .config import Finetune
    from .sparse import sparse_tensors, sparsity_report

    s, final = run.config.sparsity, run.config.schedule.final_finetune
    tensors = sparse_tensors(model, s)
    _seed(run.config.seed + best_step + 2000)
    ft = Finetune(iterations=s.iterations, lr=s.lr, task=final.task if final else "auto")
    run.tune(model, ft, best_step + 2000, f"sparse fine-tune ({s.method})", sparsity=s)
    return sparsity_report(model, tensors, s.method)
