"""YAML pruning configs, validated into dataclasses.

Every problem is one sentence that names the key: an unknown key (with the
nearest valid one), a wrong type, a value out of range. ``load_config``
accepts a :class:`Config`, a dict, or a path to a YAML file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from .typedmap import build
from .yamlfile import ConfigError, read_yaml


@dataclass
class ModelConfig:
    builder: Optional[str] = None  # package.module:callable; weights come from MODEL on the CLI
    kwargs: dict = field(default_factory=dict)
    trusted_pickle: bool = False  # True: MODEL is a whole pickled module
    leaf_modules: list = field(default_factory=list)  # submodules torch.fx should not trace into


@dataclass
class Targets:
    flops: Optional[float] = None  # keep at most this fraction of the original FLOPs (0.5; 1.0 with a latency target)
    params: float = 1.0  # keep at most this fraction of the original parameters
    latency: Optional[float] = None  # run in at most this fraction of the original's latency, measured
    stop_when: Literal["both", "any"] = "both"  # "both": every target holds; "any": one does
    priority: Optional[Literal["flops", "params", "latency"]] = None  # what sizes the steps (latency when set)

    def __post_init__(self):
        # defaults that depend on each other: with a latency target, FLOPs are free and latency sizes the steps
        if self.flops is None:
            self.flops = 1.0 if self.latency is not None else 0.5
        if self.priority is None:
            self.priority = "latency" if self.latency is not None else "flops"


@dataclass
class LatencyConfig:
    """Where latency is measured: for a latency target, round_to: auto and the run report."""

    device: str = "cpu"
    threads: Optional[int] = None  # intra-op threads on the CPU (default: torch's)
    repeats: int = 20  # timed runs per measurement (the median counts)
    warmup: int = 3


@dataclass
class ImportanceConfig:
    # ipad | l1 | l2 | bn_scale | group_l2 | taylor | fisher | random | package.module:fn
    method: Union[str, Callable] = "ipad"
    norm: int = 1  # ipad / l1 / l2: the p of the norms
    omega: float = 0.0  # ipad: share of the filter-norm term (both terms scaled to mean 1 per layer)
    omega_scale: Literal["layer", "paper"] = "layer"  # ipad: "paper" = omega / n_l * ||W|| + (1 - omega) * 10 * ADC
    measure: Literal["raw", "bn", "act"] = "raw"  # ipad: read the output raw, after its BatchNorm, or its activation
    propagate: float = 0.0  # ipad: weight of the importance of the consumers that read a channel
    # how many units each layer loses
    allocation: Literal["uniform", "global", "sensitivity"] = "uniform"  # uniform (same share per layer) | global (one ranking) | sensitivity (measured damage per FLOP)
    combine: Literal["mean", "sum", "max"] = "mean"  # how coupled producers' scores make a unit's
    normalize: Literal["rank", "mean"] = "rank"  # older spelling of allocation: rank (uniform) | mean (global)
    kwargs: dict = field(default_factory=dict)  # extra options for a custom scorer

    def scorer_options(self) -> dict:
        """The options every built-in scorer may read (each takes those it names)."""
        return {"norm": self.norm, "omega": self.omega, "scale": self.omega_scale, "measure": self.measure,
                "propagate": self.propagate}


@dataclass
class Limits:
    default: float = 0.75  # at most this fraction of any layer's filters may be removed
    layers: dict = field(default_factory=dict)  # module name or glob -> max fraction; 0 = never
    round_to: Union[int, Literal["auto"]] = 8  # layers of >= 4 x round_to channels keep multiples of it; 1: off; auto


@dataclass
class Finetune:
    iterations: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    task: Literal["auto", "classification", "segmentation"] = "auto"
    augment: bool = True
    amp: bool = False  # mixed precision (float16 autocast, gradient scaling) on CUDA; the CPU trains in float32
    function: Optional[str] = None  # package.module:fn(model, train_batches, iterations) replaces the trainer


@dataclass
class Schedule:
    steps: int = 8
    finetune: Optional[Finetune] = None
    final_finetune: Optional[Finetune] = None  # once more after the last step


# named mean/std presets for data.<source>.normalize, for pixels scaled to [0, 1]
NORMALIZE_PRESETS = {"imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


@dataclass
class Normalize:
    mean: list  # one value per channel, or one for all, of pixels scaled to [0, 1]
    std: list


@dataclass
class DataSource:
    images: Optional[str] = None  # folder of images, or of class sub-folders (images/<class>/*.png)
    masks: Optional[str] = None  # folder of masks with the images' file stems (segmentation)
    labels: Optional[str] = None  # CSV of file,label (classification)
    size: Optional[list] = None  # [H, W]: resize images (and masks) to this; without it sizes must match
    normalize: Union[Normalize, Literal[tuple(NORMALIZE_PRESETS)], None] = None  # {mean, std} or a preset
    workers: int = 0  # DataLoader worker processes reading the images
    factory: Optional[str] = None  # package.module:fn(**kwargs) -> DataLoader or iterable of batches
    kwargs: dict = field(default_factory=dict)
    batch_size: int = 8
    limit: Optional[int] = None  # use at most this many batches


@dataclass
class Data:
    # random: calibrate a data-driven criterion (ipad) on random inputs, by choice
    calibration: Union[DataSource, Literal["random"], None] = None
    train: Optional[DataSource] = None
    val: Optional[DataSource] = None
    root: Optional[str] = None  # relative data paths start here; default: the config file's folder (else cwd)


@dataclass
class Sparsity:
    """Always-sparse training of the weights that are kept (prunekit sparsify; after prune's final fine-tune)."""

    method: Literal["topkast", "magnitude"] = "topkast"  # topkast (sets refreshed while training) | magnitude (one-shot, then fine-tune)
    density: float = 0.1  # forward density D: the fraction of each sparse tensor's weights that is used (set A)
    backward_density: Optional[float] = None  # D + M: the fraction that gets gradients (set B); null: min(1, 2 * D); magnitude: always D
    scope: Optional[Literal["layer", "global"]] = None  # rank per tensor or over all; null: layer (topkast), global (magnitude)
    refresh_every: int = 100  # optimizer steps between recomputing A and B while exploring
    exploration_steps: Optional[int] = None  # steps that refresh the sets, then they freeze; null: 3/4 of iterations
    penalty: float = 0.0001  # scale of the exploration loss: L2 on A, plus L2 / D on B minus A
    iterations: int = 1000  # optimizer steps of sparse training
    lr: float = 0.001  # learning rate (Adam)
    layers: dict = field(default_factory=dict)  # module name or glob -> its own density D; 1.0 = dense
    exclude: list = field(default_factory=list)  # module names or globs left dense
    include_bias: bool = False  # also sparsify the biases of convs and Linears
    include_norm: bool = False  # also sparsify norm layers' weights

    def __post_init__(self):
        if self.method == "magnitude":  # fixed masks: only the kept weights train, whatever B was set to
            self.backward_density = self.density
        elif self.backward_density is None:
            self.backward_density = min(1.0, 2 * self.density)
        if self.scope is None:
            self.scope = "global" if self.method == "magnitude" else "layer"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    input_shape: Optional[list] = None
    targets: Targets = field(default_factory=Targets)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    limits: Limits = field(default_factory=Limits)
    schedule: Schedule = field(default_factory=Schedule)
    data: Data = field(default_factory=Data)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    device: str = "auto"  # where calibration, fine-tuning and validation run: auto (CUDA when there is one) | cpu | cuda[:N]
    validate: Optional[str] = None  # package.module:fn(model) -> float, higher is better
    keep_best: int = 3
    seed: int = 0
    sparsity: Optional[Sparsity] = None  # always-sparse training of the kept weights (prunekit sparsify); null: dense


# -- range checks: key path -> (predicate, what it must be) -------------------

def _ratio(v) -> bool:
    return 0 < v <= 1


def _fraction(v) -> bool:
    return 0 <= v <= 1


def _shape(v) -> bool:
    return len(v) >= 2 and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in v)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "targets.flops": (_ratio, "a ratio in (0, 1]"),
    "targets.params": (_ratio, "a ratio in (0, 1]"),
    "targets.latency": (_ratio, "a ratio in (0, 1]"),
    "latency.threads": (lambda v: v >= 1, "an integer >= 1 (or null for torch's default)"),
    "latency.repeats": (lambda v: v >= 3, "an integer >= 3"),
    "latency.warmup": (lambda v: v >= 0, "an integer >= 0"),
    "importance.norm": (lambda v: v in (1, 2), "1 or 2"),
    "importance.omega": (_fraction, "a number in [0, 1]"),
    "importance.propagate": (_fraction, "a number in [0, 1]"),
    "limits.default": (_fraction, "a fraction in [0, 1]"),
    "limits.round_to": (lambda v: v == "auto" or v >= 1, "an integer >= 1 or 'auto'"),
    "schedule.steps": (lambda v: v >= 1, "an integer >= 1"),
    "keep_best": (lambda v: v >= 1, "an integer >= 1"),
    "input_shape": (_shape, "a list of at least two positive integers, like [1, 3, 256, 256]"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "sparsity.density": (_ratio, "a density in (0, 1]"),
    "sparsity.backward_density": (_ratio, "a density in (0, 1]"),
    "sparsity.refresh_every": (lambda v: v >= 1, "an integer >= 1"),
    "sparsity.exploration_steps": (lambda v: v >= 0, "an integer >= 0 (or null for 3/4 of the iterations)"),
    "sparsity.penalty": (lambda v: v >= 0, "a number >= 0"),
    "sparsity.iterations": (lambda v: v >= 1, "an integer >= 1"),
    "sparsity.lr": (lambda v: 0 < v <= 10, "a positive number at most 10"),
}
for _prefix in ("schedule.finetune", "schedule.final_finetune"):
    _CHECKS[f"{_prefix}.iterations"] = (lambda v: v >= 0, "an integer >= 0")
    _CHECKS[f"{_prefix}.lr"] = (lambda v: 0 < v <= 10, "a positive number at most 10")
    _CHECKS[f"{_prefix}.weight_decay"] = (_fraction, "a weight decay in [0, 1]")
for _prefix in ("data.calibration", "data.train", "data.val"):
    _CHECKS[f"{_prefix}.batch_size"] = (lambda v: v >= 1, "an integer >= 1")
    _CHECKS[f"{_prefix}.limit"] = (lambda v: v >= 1, "an integer >= 1 (or null for all batches)")
    _CHECKS[f"{_prefix}.workers"] = (lambda v: 0 <= v <= 256, "an integer in [0, 256]")
    _CHECKS[f"{_prefix}.size"] = (lambda v: len(v) == 2 and all(isinstance(d, int) and not isinstance(d, bool)
                                                                 and 0 < d < 2**16 for d in v),
                                  "[height, width], two positive integers")
    for _part in ("mean", "std"):
        _CHECKS[f"{_prefix}.normalize.{_part}"] = (
            lambda v, part=_part: 0 < len(v) <= 4 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                and (part == "mean" or x > 0) for x in v),
            "a list of 1 to 4 finite numbers" + (", each above 0" if _part == "std" else ""))


def _check_limits(config: Config) -> None:
    for name, value in config.limits.layers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"config key 'limits.layers.{name}' must be a fraction in [0, 1], got {value!r}.")


def read_config_file(path) -> tuple[dict, str]:
    """A YAML config file's top-level mapping (empty for an empty file) and the folder its relative data
    paths start at."""
    raw = read_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping at the top level.")
    return raw, os.path.dirname(os.path.abspath(os.path.expanduser(path)))


def load_config(source, *, folder: str | None = None) -> Config:
    """A validated :class:`Config` from a Config, a dict, or a YAML file path.

    A Config built in code is checked exactly as YAML is (``Limits(default=2.0)``
    is refused the same way), so each rule and each default lives in one place.
    A YAML file's relative data paths start at the file's folder (``data.root``, itself relative
    to that folder when set); those of a dict or Config at ``folder`` (a dict read from a YAML
    file and edited keeps the file's), by default the current directory.
    """
    if isinstance(source, Config):
        raw = _as_raw(source)
    elif isinstance(source, (str, Path)):
        raw, folder = read_config_file(source)
    elif isinstance(source, dict):
        raw = source
    else:
        raise ConfigError("config must be a Config, a dict, or a path to a YAML file.")
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping at the top level.")
    config = build(Config, raw, _CHECKS)
    _check_limits(config)
    _check_targets(config.targets)
    _check_data(config.data)
    _check_sparsity(config.sparsity)
    if folder is not None:
        root = config.data.root
        config.data.root = os.path.normpath(os.path.join(folder, os.path.expanduser(root))) if root else folder
    return config


def _check_data(data: Data) -> None:
    """Keys of a data source that do not go together: one sentence naming them."""
    for what in ("calibration", "train", "val"):
        src = getattr(data, what)
        if not isinstance(src, DataSource):
            continue
        key = f"data.{what}"
        if src.images and src.factory:
            raise ConfigError(f"config key '{key}' sets both images and factory; use one.", key=f"{key}.factory")
        if not src.images and not src.factory:
            raise ConfigError(f"config key '{key}' needs images (a folder) or factory (package.module:fn).",
                              key=f"{key}.images")
        if src.masks and src.labels:
            raise ConfigError(f"config key '{key}' sets both masks (segmentation) and labels (classification); "
                              "use one.", key=f"{key}.labels")
        folder_only = [k for k in ("masks", "labels", "size", "normalize", "workers") if getattr(src, k)]
        if src.factory and folder_only:
            raise ConfigError(f"config key '{key}.{folder_only[0]}' applies to an image folder; a factory's batches "
                              "are used as they are.", key=f"{key}.{folder_only[0]}")
        if src.images and src.kwargs:
            raise ConfigError(f"config key '{key}.kwargs' applies to a factory, not to an image folder.",
                              key=f"{key}.kwargs")
        norm = src.normalize
        if isinstance(norm, Normalize) and len(norm.mean) != len(norm.std) and 1 not in (len(norm.mean), len(norm.std)):
            raise ConfigError(f"config key '{key}.normalize' has {len(norm.mean)} means and {len(norm.std)} "
                              "standard deviations; give one per channel (or one for all).", key=f"{key}.normalize")


def _check_sparsity(sparsity: Optional[Sparsity]) -> None:
    if sparsity is None:
        return
    if sparsity.backward_density < sparsity.density:
        raise ConfigError(f"config key 'sparsity.backward_density' must be at least sparsity.density "
                          f"({sparsity.density}), got {sparsity.backward_density}.", key="sparsity.backward_density")
    for name, value in sparsity.layers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f"config key 'sparsity.layers.{name}' must be a density in (0, 1], got {value!r}.",
                              key=f"sparsity.layers.{name}")
    for name in sparsity.exclude:
        if not isinstance(name, str):
            raise ConfigError(f"config key 'sparsity.exclude' must list module names or globs, got {name!r}.",
                              key="sparsity.exclude")


def _check_targets(targets: Targets) -> None:
    if targets.priority == "latency" and targets.latency is None:
        raise ConfigError("config key 'targets.priority' is 'latency' but no targets.latency is set.",
                          key="targets.priority")


def _as_raw(value):
    """A dataclass tree back to the mapping it would be built from (callables stay callables)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _as_raw(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def to_dict(config: Config) -> dict:
    """Plain data for manifests and reports (callables become their names)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if callable(value):
            return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', repr(value))}"
        return value

    return plain(config)
