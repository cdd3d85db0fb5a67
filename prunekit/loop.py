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
import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree
from torch import nn

from . import distributed, rundir
from .artifacts import MANIFEST_FORMAT, module_widths, width_changes
from .checks import calibration_source, check_labels, check_leaf_modules, check_limits_match, guard_scorer, \
    weights_hash
from .config import Config, load_config, to_dict
from .costs import CostModel
from .data import data_paths, first_input, load_batches, random_batches
from .data.devices import on_device, placed, resolve_device, to_device
from .errors import PrunekitError, PrunekitWarning
from .graphs import build_graph, updated_graph
from .graphs.graph import as_inputs
from .importance import SCORERS, resolve_scorer, score_units
from .latency_model import LatencyGauge, LatencyTables, Settings, choose_alignment, latency_calls
from .builders import resolve_callable
from .planner import Planner, Targets
from .run_state import Candidate, CheckpointClock, StepRecord, load_checkpoint, own_weights, rebuild, save_checkpoint, \
    shared_copy, state_of
from .progress import progress_bar
from .rundir import RunDirError, RunWriter
from .safety import call_user, check_finite_weights, check_input_memory, describe, user_number
from .surgery import apply_removal
from .data.trainer import evaluate, finetune, loss_for, main_output, task_of



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


class _Run:
    """Everything one pruning run needs, resolved and checked before any file is written."""

    def __init__(self, model: nn.Module, example_inputs, config, run_dir, resume: bool, force: bool,
                 progress: bool, input_files=()):
        self.config = cfg = load_config(config)
        self.world = world = distributed.current()  # one process, or this rank's place among several
        self.inputs = as_inputs(example_inputs)
        self.device = world.device(resolve_device(cfg.device))
        self.progress = progress and world.main
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.mode = None
        self.calibration_from = calibration_source(cfg)  # a data-driven criterion without data stops here
        self.input_files = [*input_files, *data_paths(cfg.data)]
        if self.run_dir is not None:  # the directory is checked first: nothing runs for a run that cannot be written
            self.mode = world.from_main(rundir.plan, self.run_dir, resume, force, self.input_files)  # rank 0 writes
        elif resume:
            raise RunDirError("resuming needs the run directory of the interrupted run.")
        if not isinstance(model, nn.Module):
            raise PrunekitError(f"prune needs a torch.nn.Module, got {type(model).__name__}.")
        check_leaf_modules(model, cfg.model.leaf_modules)
        check_limits_match(model, cfg.limits.layers)
        check_finite_weights(model)
        self.input_tensors = [t for t in torch.utils._pytree.tree_leaves(self.inputs) if isinstance(t, torch.Tensor)]
        for tensor in self.input_tensors:
            check_input_memory(tuple(tensor.shape), "example input shape")
        self.scorer = resolve_scorer(cfg.importance.method)
        if not (isinstance(cfg.importance.method, str) and cfg.importance.method in SCORERS):
            self.scorer = guard_scorer(self.scorer, describe(cfg.importance.method if isinstance(
                cfg.importance.method, str) else self.scorer))
        self.validate_fn = resolve_callable(cfg.validate) if cfg.validate else None
        self.finetune_fn = self.finetune_name = None
        for ft in (cfg.schedule.finetune, cfg.schedule.final_finetune):
            if ft is not None and ft.function:
                self.finetune_fn, self.finetune_name = resolve_callable(ft.function), ft.function
        shape = cfg.input_shape or (list(self.input_tensors[0].shape) if self.input_tensors else None)
        check_input_memory(shape, "input_shape")
        root = cfg.data.root
        self.calibration = random_batches(self.inputs, cfg.seed) if cfg.data.calibration == "random" else \
            load_batches(cfg.data.calibration, shape, "calibration", root)
        self.train = load_batches(cfg.data.train, shape, "train", root)
        self.val = load_batches(cfg.data.val, shape, "val", root)
        wants_training = any(ft is not None and ft.iterations > 0 and not ft.function
                             for ft in (cfg.schedule.finetune, cfg.schedule.final_finetune))
        if wants_training and self.train is None:
            raise PrunekitError("schedule.finetune needs training data: set data.train.")
        if cfg.sparsity is not None and self.train is None:
            raise PrunekitError("sparsity (sparse fine-tuning of the delivered model) needs training data: set "
                                "data.train.")
        if cfg.importance.method == "taylor" and self.train is None:
            raise PrunekitError("importance method 'taylor' needs a loss: set data.train.")
        check_labels(model, self.train, "train")
        check_labels(model, self.val, "val")
        self.original = model
        self.original_widths = module_widths(model)
        self.model_hash = weights_hash(model) if self.run_dir is not None else None  # resume checks it
        if world.many:
            world.check_same("the model, config and example input", [weights_hash(model), self.identity()])
        self.checkpoint = load_checkpoint(self) if self.mode == "resume" else None
        self.graph0 = build_graph(model, self.inputs, cfg.model.leaf_modules)
        for fallback in self.graph0.fallbacks:
            warnings.warn(f"{fallback.describe()}; {self.graph0.fallback_cost(fallback)} channels pinned.",
                          PrunekitWarning, stacklevel=3)
        costs = CostModel(model, self.graph0)
        self.flops0, self.params0 = costs.flops(), costs.params()
        if self.flops0 <= 0 or self.params0 <= 0:
            raise PrunekitError(f"the model has {self.flops0} FLOPs and {self.params0} parameters that prunekit can "
                                "count; there is nothing to prune.")
        self.producer_widths0 = {n: len(u) for n, u in self.graph0.producers.items()}
        t = cfg.targets
        self.targets = Targets(self.flops0, self.params0, t.flops, t.params, t.stop_when, t.priority,
                               cfg.schedule.steps, t.latency)
        self.gauge, self.round_to = None, cfg.limits.round_to
        if t.latency is not None or cfg.limits.round_to == "auto":
            self.gauge = self._latency_gauge(model)
        self.task = None

    def _latency_gauge(self, model: nn.Module) -> LatencyGauge:
        """Latency tables from the checkpoint being resumed, or measured on the device now."""
        lat = self.config.latency
        settings = Settings(lat.device, lat.threads)
        saved = getattr(self, "saved_tables", None)
        tables = LatencyTables.from_json(saved, settings) if saved else None
        if tables is None:
            def measure() -> LatencyTables:  # on rank 0 only: every rank plans with the same tables
                layers = sum(1 for _ in latency_calls(model, self.graph0))
                with progress_bar(f"latency tables on {lat.device}", layers, self.progress) as advance:
                    measured = LatencyTables.measure(model, self.graph0, self.inputs, settings,
                                                     progress=lambda done, total: advance())
                if self.config.limits.round_to == "auto":
                    measured.alignment = choose_alignment(model, self.graph0, measured, settings)
                return measured

            tables = self.world.from_main(measure)
        if self.config.limits.round_to == "auto":
            self.round_to = tables.alignment or 1
            self.log(f"round_to: auto chose {self.round_to}")
        return LatencyGauge(model, self.inputs, tables, self.measuring())

    def measuring(self) -> Settings:
        """How the model's latency is measured: the config's latency section."""
        lat = self.config.latency
        return Settings(lat.device, lat.threads, lat.repeats, lat.warmup)

    # -- helpers -----------------------------------------------------------

    def calibration_inputs(self, sharded: bool = False):
        source = self.world.shard(self.calibration or self.train) if sharded else self.calibration or self.train
        inputs = source.map(first_input) if source is not None else list(self.inputs)  # read lazily, every pass
        return _Shown(inputs, "calibration", self.progress)

    def scoring_options(self, step: int, sharded: bool = False) -> dict:
        cfg = self.config.importance
        options = {"norm": cfg.norm, "omega": cfg.omega, "seed": self.config.seed + step, **cfg.kwargs}
        if sharded:  # this rank reads its shard; the scorer sums its statistics over the ranks
            options["reduce"] = self.world.sum_over_ranks
        if self.train is not None:
            train = self.world.shard(self.train) if sharded else self.train
            options["loss_batches"] = train.map(lambda b: to_device((b[0], b[1]), self.device))  # lazily
            options["loss_fn"] = lambda out, y: loss_for(self._task(out, y))(main_output(out), y)
        return options

    def _task(self, output, target) -> str:
        if self.task is None:
            ft = self.config.schedule.finetune or self.config.schedule.final_finetune
            self.task = ft.task if ft is not None and ft.task != "auto" else task_of(main_output(output), target)
        return self.task

    def tune(self, model: nn.Module, ft, step: int, label: str, sparsity=None) -> None:
        if ft is None or ft.iterations <= 0:
            return
        with placed(model, self.device), self.world.training(model) as net:  # a new DDP after every cut
            train = on_device(self.world.shard(self.train), self.device)
            if self.finetune_fn is not None and ft.function:
                call_user(self.finetune_fn, "fine-tune function", ft.function, net, train, ft.iterations)
                return
            finetune(net, train, ft.iterations, lr=ft.lr, weight_decay=ft.weight_decay, task=ft.task,
                     use_augment=ft.augment, seed=self.config.seed + step, show_progress=self.progress,
                     description=label, amp=ft.amp, sparsity=sparsity)

    def metric(self, model: nn.Module) -> float | None:
        model.eval()
        with placed(model, self.device):
            return self._metric(model)

    def _metric(self, model: nn.Module) -> float | None:
        if self.validate_fn is not None:  # on rank 0, its number broadcast
            role = "validate function"
            return self.world.from_main(lambda: user_number(call_user(
                self.validate_fn, role, self.config.validate, model), role, self.config.validate))
        if self.val is not None:
            ft = self.config.schedule.finetune
            return evaluate(model, on_device(self.world.shard(self.val), self.device),
                            ft.task if ft is not None else "auto", combine=self.world.summed)
        return None

    def identity(self) -> dict:
        """What a checkpoint must match to be resumed: the config and example input, and the weights."""
        text = json.dumps([to_dict(self.config), [list(t.shape) for t in self.input_tensors]], sort_keys=True,
                          default=str)
        return {"fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16], "model_hash": self.model_hash}

    def log(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)


class _Shown:
    """A re-iterable list of batches with a progress bar on every pass."""

    def __init__(self, items: list, label: str, enabled: bool):
        self.items, self.label, self.enabled = items, label, enabled
        self.total = len(items) if isinstance(items, list) else items.length  # Batches: None when unknown

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        with progress_bar(self.label, self.total, self.enabled) as advance:
            for item in self.items:
                yield item
                advance()


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
    with distributed.joined(load_config(config).device) as world:  # torchrun's ranks join here
        result = _prune(model, example_inputs, config, run_dir, resume, force, progress, builder, builder_kwargs,
                        input_files)
        world.barrier()  # every rank returns once rank 0 has written the run directory
        return result


def _prune(model, example_inputs, config, run_dir, resume, force, progress, builder, builder_kwargs, input_files):
    run = _Run(model, example_inputs, config, run_dir, resume, force, progress, input_files)
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


def _loop(run: _Run, writer: RunWriter | None, builder, builder_kwargs) -> PruneResult:
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
    graph = run.graph0 if step == 0 else None  # the untouched model's graph is already built
    cut = None  # (graph, removed units) of the last step: the next graph is derived from them
    checkpoints = CheckpointClock()
    while True:
        if graph is None and cut is not None:
            graph = updated_graph(*cut, current, run.inputs, cfg.model.leaf_modules)
            cut = None  # the old graph is not needed any more
            if graph.retraced:
                run.log(f"traced again after step {step}: {graph.retraced}")
        elif graph is None:
            graph = build_graph(current, run.inputs, cfg.model.leaf_modules)
        costs = CostModel(current, graph)
        flops, params = costs.flops(), costs.params()
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
                cfg.importance.normalize, cfg.importance.allocation, costs))
        predicted = run.gauge.planning_model(current, graph, latency) if run.gauge is not None else None
        if predicted is not None and cfg.targets.latency is not None:
            scores = scores / np.maximum(predicted.unit_seconds(), 1e-12)  # least importance per second saved first
        planner = Planner(graph, costs, cfg.limits, run.producer_widths0,
                          predicted if cfg.targets.latency else None, run.round_to)
        plan, aim = planner.plan(scores, run.targets.goal(step)), step
        while plan.reached and plan.units.size == 0 and aim < cfg.schedule.steps:
            aim += 1  # already there (a latency measured ahead of the schedule): aim at the next step's goal
            plan = planner.plan(scores, run.targets.goal(aim))
        run.world.check_same(f"the plan of step {step}", [plan.units.tolist(), plan.flops, plan.params])
        if plan.units.size == 0:
            step -= 1
            message = _unreachable(run, flops, params)
            break
        cut = (graph, graph.removal_mask(plan.units))
        if run.validate_fn is None and run.val is None and candidates and not candidates[0].meets:
            candidates[0].state = None  # no metric: this step's model will outrank it, so the cut may free it
        current = apply_removal(current, *cut, in_place=current is not shared)
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
        if writer is not None and checkpoints.due():  # the first comes after a whole step: a failing one writes nothing
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
        final_graph = graph  # the loop's last graph already describes this model's structure
    else:
        final_graph = build_graph(model_out, run.inputs, cfg.model.leaf_modules)
    final_costs = CostModel(model_out, final_graph)
    final = {"flops": final_costs.flops(), "params": final_costs.params()}
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

        if not writer.began:  # the model met the targets before any step: still a complete run
            save_checkpoint(run, writer, step, current, history, candidates)
        write_outputs(result, run.original, run.graph0, final_graph, run.inputs, directory=writer.work)
        writer.complete()
    return result


# timed seconds (both models together) that the report's latency row may take when there is no latency target
REPORT_LATENCY_SECONDS = 0.5

# steps a latency target may take beyond schedule.steps when the measured latency is still above it
EXTRA_STEPS = 4


def _unreachable(run: _Run, flops: int, params: int) -> str:
    cfg = run.config
    latency = f", {cfg.targets.latency:.0%} latency" if cfg.targets.latency is not None else ""
    return (f"the per-layer limits stop pruning at {flops / run.flops0:.1%} of the FLOPs and "
            f"{params / run.params0:.1%} of the parameters, short of the targets "
            f"({cfg.targets.flops:.0%} FLOPs, {cfg.targets.params:.0%} parameters{latency}); "
            f"raise limits.default or the per-layer limits to go further.")


def _sparse_finetune(run: _Run, model: nn.Module, best_step: int) -> dict:
    """The hook of prunekit.sparse: the delivered model trained sparse (config ``sparsity``); its report."""
    from .config import Finetune
    from .sparse import sparse_tensors, sparsity_report

    s, final = run.config.sparsity, run.config.schedule.final_finetune
    tensors = sparse_tensors(model, s)
    _seed(run.config.seed + best_step + 2000)
    ft = Finetune(iterations=s.iterations, lr=s.lr, task=final.task if final else "auto")
    run.tune(model, ft, best_step + 2000, f"sparse fine-tune ({s.method})", sparsity=s)
    return sparsity_report(model, tensors, s.method)
