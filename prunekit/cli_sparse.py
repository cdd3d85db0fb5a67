"""``prunekit sparsify``: train MODEL sparse (Top-KAST or magnitude pruning) and write the result."""

from __future__ import annotations

import click

from .cli_config import Flag, Overrides, command_line, config_flags

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


def sparse_flags(fn):
    """The config flags that make sense for sparsify: the model's, then the sparsity keys."""
    decorated = config_flags(exclude=_PRUNE_ONLY)(fn)
    for flag in reversed(SPARSE_FLAGS):
        decorated = click.option(*flag.names, flag.dest, metavar=flag.metavar, help=flag.help)(decorated)
    return decorated


@click.command(short_help="Train MODEL sparse (Top-KAST or magnitude pruning).", epilog="""\b
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
    from .sparse.outputs import load_for_sparsify, sparsify_to_dir
    from .sparse.report import summary_lines

    given = Overrides(list(SPARSE_FLAGS), sparse)
    values, flags = {**overrides.values(), **given.values()}, {**overrides.flags, **given.flags}
    net, config, widths, inputs = load_for_sparsify(model, config_path, values, flags)
    result = sparsify_to_dir(net, config, run_dir, force=force, remove_dead=remove_dead_filters,
                             progress=not quiet, inputs=inputs, original_widths=widths)
    for line in summary_lines(result.report):
        click.echo(line)
    click.echo(f"Written to {run_dir} (model.pt, manifest.json, sparsity.md, sparsity.json); see it with: "
               f"{command_line('prunekit', 'report', run_dir)}")
