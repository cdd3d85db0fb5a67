"""``prunekit sparsify``: train MODEL sparse (Top-KAST or magnitude pruning) and write the result."""

from __future__ import annotations

import click

from .cli_config import Flag, Overrides, command_line, config_flags
from .errors import PrunekitError

# the flags of sparsify that set sparsity keys (prune's own --method means importance.method)
SPARSE_FLAGS = (
    Flag(("--density", "-d"), "sparsity.density", "float", "Fraction of each conv / Linear weight kept (set A, "
         "sparsity.density), e.g. 0.1.", "D"),
    Flag(("--backward-density",), "sparsity.backward_density", "float", "Fraction that gets gradients (set B, "
         "sparsity.backward_density; default 2 x density).", "D"),
    Flag(("--sparse-method",), "sparsity.method", "str", "topkast (default) or magnitude (sparsity.method).",
         "METHOD"),
    Flag(("--iterations",), "sparsity.iterations", "int", "Optimizer steps of sparse training "
         "(sparsity.iterations).", "N"),
)
_PRUNE_ONLY = ("targets.flops", "targets.params", "targets.latency", "importance.method", "schedule.steps",
               "data.calibration")


def _in_config(path: str | None, key: str) -> bool:
    """Whether the YAML config at ``path`` sets the dotted ``key``."""
    if path is None:
        return False
    from .yamlfile import read_yaml

    node = read_yaml(path) or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node is not None


def sparse_flags(fn):
    """The config flags that make sense for sparsify: the model's, then the sparsity keys."""
    decorated = config_flags(exclude=_PRUNE_ONLY)(fn)
    for flag in reversed(SPARSE_FLAGS):
        decorated = click.option(*flag.names, flag.dest, metavar=flag.metavar, help=flag.help)(decorated)
    return decorated


def register(main: click.Group) -> None:
    @main.command(short_help="Train MODEL sparse (Top-KAST or magnitude pruning).", epilog="""\b
Examples:
  prunekit sparsify model.pt --config configs/sparse.yaml -o out/sparse
  prunekit sparsify out/run -c configs/sparse.yaml -o out/run-sparse  # pruned
  prunekit sparsify model.pt -c configs/sparse.yaml -d 0.05 -o out/s05
  prunekit sparsify model.pt -c configs/sparse.yaml \\
      --sparse-method magnitude --remove-dead-filters -o out/mag
  prunekit report out/sparse    # FLOPs and parameters (dense compute)
""")
    @click.argument("model", metavar="MODEL")
    @click.option("--config", "-c", "config_path", metavar="CONFIG",
                  help="A YAML config with a sparsity section and data.train; the flags below override its keys.")
    @click.option("--output", "-o", "run_dir", required=True, metavar="RUN_DIR",
                  help="Output directory: model.pt, manifest.json, sparsity.json, sparsity.md.")
    @sparse_flags
    @click.option("--remove-dead-filters", is_flag=True,
                  help="Cut the filters that ended all zero, exactly (checked), through the channel graph.")
    @click.option("--force", is_flag=True, help="Replace RUN_DIR if it is not empty.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress output.")
    def sparsify(model: str, config_path: str | None, run_dir: str, overrides: Overrides, remove_dead_filters: bool,
                 force: bool, quiet: bool, **sparse: str | None) -> None:
        """Train MODEL sparse and write it to RUN_DIR: every conv, transposed conv and Linear
        weight keeps its top `density` fraction by magnitude (Top-KAST: the sets move while
        training; magnitude: chosen once, then fine-tuned). MODEL may be a prunekit prune run
        directory: its pruned model is trained sparse (its manifest gives builder and shape).

        The saved model.pt is an ordinary state dict with exact zeros; sparsity.md gives the
        density per layer, the nonzeros and the size stored sparse. Compute stays dense: no FLOPs
        are saved. Training data comes from data.train (data.val for the metric).
        """
        from .configtools import with_overrides
        from .loading import load_model
        from .sparse.outputs import sparsify_to_dir

        given = Overrides(list(SPARSE_FLAGS), sparse)
        values, flags = {**overrides.values(), **given.values()}, {**overrides.flags, **given.flags}
        raw_sparse = {k: v for k, v in values.items() if k.startswith("sparsity.")}
        if config_path is None and not raw_sparse:
            values["sparsity.density"] = 0.1  # the section's defaults, switched on
        from .artifacts import _read_manifest
        from .cli_models import _run_dir_of, input_paths

        inputs = input_paths(model) + ([config_path] if config_path else [])
        run = _run_dir_of(model)  # a pruned run's model: its manifest gives builder, kwargs and shape
        manifest = _read_manifest(run / "manifest.json") if run is not None else {}
        for key, field in (("model.builder", "builder"), ("model.kwargs", "kwargs"), ("input_shape", "input_shape")):
            if manifest.get(field) and key not in values and not _in_config(config_path, key):
                values[key] = manifest[field]
        config = with_overrides(config_path, values, flags)
        if config.sparsity is None:
            where = f"the config '{config_path}'" if config_path else "the config"
            raise PrunekitError(f"sparsify needs a sparsity section in {where}, or --density.")
        if config.model.builder is None and not config.model.trusted_pickle:
            raise PrunekitError("sparsify needs model.builder (the function that builds the model): pass --builder "
                                "package.module:function or set model.builder in the config (or --trusted for a "
                                "whole pickled module).")
        if run is not None:
            from .artifacts import load_pruned
            from .sparse.outputs import builder_widths

            net = load_pruned(run, builder=config.model.builder, trusted=config.model.trusted_pickle)
            widths = builder_widths(net, manifest)
        else:
            net = load_model(model, builder=config.model.builder, kwargs=config.model.kwargs,
                             trusted=config.model.trusted_pickle)
            widths = None
        result = sparsify_to_dir(net, config, run_dir, force=force, remove_dead=remove_dead_filters,
                                 progress=not quiet, inputs=inputs, original_widths=widths)
        rep = result.report
        o, p, b = rep["overall"], rep["parameters"], rep["bytes"]
        click.echo(f"Sparse ({rep['method']}): density {o['density']:.4f} over {o['sparse_tensors']} weight tensors, "
                   f"{p['nonzero']:,} of {p['total']:,} parameters nonzero.")
        click.echo(f"Size: {b['model_dense']:,} bytes dense, {b['model_compressed']:,} bytes stored sparse.")
        if "metric" in rep:
            m = rep["metric"]
            click.echo(f"Metric: {m['before']:.4f} before, {m['after']:.4f} after sparse training"
                       + (f", {m['after_removal']:.4f} after removing dead filters" if "after_removal" in m else "")
                       + ".")
        dead = rep.get("dead_filters") or {}
        if dead.get("zero"):
            done = f"removed {dead['removed']}" if dead.get("removed") is not None else \
                "pass --remove-dead-filters to cut them"
            click.echo(f"Dead filters: {dead['zero']} all zero, {dead['removable']} removable exactly; {done}.")
        click.echo("Compute is dense with masks: no FLOPs are saved on dense kernels.")
        click.echo(f"Written to {run_dir} (model.pt, manifest.json, sparsity.md, sparsity.json); see it with: "
                   f"{command_line('prunekit', 'report', run_dir)}")
