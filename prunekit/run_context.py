"""What one pruning run knows, resolved and checked before any file is written: the config, the
example inputs and data, the original model's graph and costs, the targets, the latency gauge, and
how the run fine-tunes and measures a model (on its device, on every rank)."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.utils._pytree
from torch import nn

from . import distributed, rundir
from .arguments import check_leaf_modules, check_model
from .artifacts import module_widths
from .builders import resolve_callable
from .checks import calibration_source, check_labels, check_limits_match, guard_scorer, \
    weights_hash
from .config import load_config, to_dict
from .costs import CostModel
from .data import data_paths, first_input, load_batches, random_batches
from .data.devices import on_device, placed, resolve_device, to_device
from .data.trainer import evaluate, finetune, loss_for, main_output, task_of
from .errors import PrunekitError, PrunekitWarning
from .graphs import build_graph
from .graphs.graph import as_inputs
from .importance import SCORERS, resolve_scorer
from .latency import measure_latency
from .latency_model import LatencyGauge, LatencyTables, Settings, choose_alignment, latency_calls
from .planner import Targets
from .progress import progress_bar
from .run_state import load_checkpoint
from .rundir import RunDirError
from .safety import call_user, check_finite_weights, check_input_memory, describe, user_number


class Run:
    """Everything one pruning run needs, resolved and checked before any file is written."""

    def __init__(self, model: nn.Module, example_inputs, config, run_dir, resume: bool, force: bool,
                 progress: bool, input_files=()):
        self.config = cfg = load_config(config)
        self.world = world = distributed.current()  # one process, or this rank's place among several
        self.inputs = as_inputs(example_inputs)
        self.device = world.device(resolve_device(cfg.device))
        if run_dir is not None or cfg.targets.latency is not None or cfg.limits.round_to == "auto":
            resolve_device(cfg.latency.device, "latency.device")  # latency will be measured there: refuse it now
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
        check_model(model)
        check_leaf_modules(model, cfg.model.leaf_modules, "model.leaf_modules")
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
        costs = self.costs0 = CostModel(model, self.graph0)
        self.flops0, self.params0 = costs.totals()
        if self.flops0 <= 0 or self.params0 <= 0:
            raise PrunekitError(f"the model has {self.flops0} FLOPs and {self.params0} parameters that prunekit can "
                                "count; there is nothing to prune.")
        self.producer_widths0 = {n: len(u) for n, u in self.graph0.producers.items()}
        every_free_unit = ~self.graph0.pinned  # what is left without any limit: the pinned channels' cost
        self.pinned_floor = costs.totals(every_free_unit)
        t = cfg.targets
        self.targets = Targets(self.flops0, self.params0, t.flops, t.params, t.stop_when, t.priority,
                               cfg.schedule.steps, t.latency)
        self.gauge, self.round_to = None, cfg.limits.round_to
        if t.latency is not None or cfg.limits.round_to == "auto":
            self.gauge = self._latency_gauge(model)
        if self.gauge is not None or self.run_dir is not None:
            # the model will be timed on the example input (a latency target, or the report's latency row
            # after the last step): one run now, so that an input it cannot take (a dtype the trace, which
            # reads shapes only, did not see) stops the run before the work, not after it
            lat = cfg.latency
            self.world.from_main(lambda: measure_latency(model, self.inputs, lat.device, lat.threads, 1, 0))
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
        return Shown(inputs, "calibration", self.progress)

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


class Shown:
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
