"""The ``prunekit`` command line: thin commands that parse, call the library, print.

Adding a command::

    @main.command()
    @model_options()
    @click.option(...)
    def prune(spec: ModelSpec, ...):
        model, example = load_cli_model(spec)
        ...

Every :class:`~prunekit.errors.PrunekitError` raised inside a command is
printed as ``Error: <one sentence>`` on stderr and exits with its ``exit_code``:
2, or 1 for a check that failed (``export``'s ONNX comparison) (see
:class:`PrunekitGroup`), and so are what the machine refuses (an OSError:
disk full, permission denied, read-only file system, with the path; running
out of memory). Ctrl-C prints one line and exits with code 130. ``--debug``
shows the traceback behind any of these; any other exception is a bug and
shows its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from .cli_config import Overrides, command_line, config_flags
from .cli_models import ModelSpec, load_cli_model, load_compare_model, model_options
from .cli_export import export
from .cli_sparse import sparsify
from .errors import PrunekitError, PrunekitWarning
from .rundir import input_paths

__all__ = ["main", "ModelSpec", "model_options", "load_cli_model", "load_compare_model", "CliError",
           "make_console", "echo_json", "write_text_file"]


class CliError(click.ClickException):
    """A user-facing error: ``Error: <message>`` on stderr, exit code 2 (or the error's own: 1 for a
    failed check)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))  # always one line
        if exit_code is not None:
            self.exit_code = exit_code


HELP_FLAGS = {"-h", "--help"}


class PrunekitGroup(click.Group):
    """The error boundary: every PrunekitError, OSError and MemoryError of its commands becomes one
    sentence and exit code 2; Ctrl-C becomes one line and exit code 130."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a bad flag or argument: one line, with where to look
            where = f"prunekit {exc.ctx.info_name} --help" if exc.ctx is not None and exc.ctx is not ctx \
                else "prunekit --help"
            raise CliError(f"{_sentence(exc.format_message()).rstrip('.')} (see {where}).") from None
        except PrunekitError as exc:
            _show_traceback(exc, debug)
            raise CliError(_sentence(str(exc)), exc.exit_code) from None
        except OSError as exc:
            from .paths import os_error

            _show_traceback(exc, debug)
            raise CliError(_sentence(str(os_error(exc, "use")))) from None
        except MemoryError as exc:
            _show_traceback(exc, debug)
            raise CliError("ran out of memory; use a smaller input shape, model or batch size.") from None
        except RecursionError as exc:
            _show_traceback(exc, debug)
            raise CliError("the model or its data is nested too deeply for Python's recursion limit.") from None
        except KeyboardInterrupt as exc:
            _show_traceback(exc, debug)
            text = str(exc).strip() or "interrupted."
            click.echo(f"\n{text[0].upper()}{text[1:]}", err=True)
            ctx.exit(130)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if not HELP_FLAGS.intersection(rest):  # a command that will run, inside invoke's Ctrl-C handling
            # numpy before torch: torch imports it from C code that clears any exception, so a Ctrl-C
            # landing in that import would be lost, or leave a half-imported numpy behind
            importlib.import_module("numpy")
        return name, command, rest


def _show_traceback(exc: BaseException, debug: bool) -> None:
    """With --debug, the traceback behind a one-sentence error (the user's own code's first)."""
    if not debug:
        return
    import traceback

    click.echo("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(), err=True)


def _sentence(text: str) -> str:
    """One line ending in a single full stop (a quoted message may bring its own)."""
    text = " ".join(text.split()) or "unknown error."
    if text.endswith("..") and not text.endswith("..."):
        text = text.rstrip(".") + "."
    return text


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Every warning as one line on stderr (torch's are several lines long): prunekit's own as
    they are, others with their category."""
    if issubclass(category, PrunekitWarning):
        click.echo(f"Warning: {' '.join(str(message).split())}", err=True)
    else:
        first = str(message).strip().splitlines()[0].strip() if str(message).strip() else category.__name__
        click.echo(f"Warning: {category.__name__}: {first}", err=True)


@click.group(cls=PrunekitGroup, context_settings={"help_option_names": sorted(HELP_FLAGS)}, epilog="""\b
Examples:
  prunekit demo              # train, prune and compare a U-Net on real data
  prunekit report model.pt -b torchvision.models:resnet18 -i 1,3,224,224
  prunekit prune model.pt -b torchvision.models:resnet18 -i 1,3,224,224 \\
      --flops 0.5 --method l1 -o out/run
  prunekit report out/run    # the run's manifest gives builder and shape
  prunekit COMMAND --help    # each command's options and examples
""")
@click.version_option(package_name="prunekit")
@click.option("--debug", is_flag=True, help="Show the traceback behind an error (for bug reports).")
def main(debug: bool) -> None:
    """Structured filter pruning for CNNs and U-Nets.

    A MODEL is a state_dict file plus the function that builds it
    (--builder package.module:function, --kwargs as a JSON object), or a whole
    pickled module, which is read only with --trusted (unpickling runs code).
    A run directory is data: it never runs a builder you did not name (see the
    README's security section).
    """
    warnings.showwarning = _show_warning


# --------------------------------------------------------------------------- output helpers


def make_console(stderr: bool = False):
    """A rich console; wider than 80 columns when the output is not a terminal."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, highlight=False, width=120)
    return console


def echo_json(data: Any) -> None:
    """Machine-readable output: strict JSON only (NaN becomes null), on stdout."""
    from .files import strict_json

    click.echo(strict_json(data, indent=2))


def check_writable(path: str, inputs=()) -> Path:
    """Fail before any work when ``path`` cannot be written or is one of ``inputs``."""
    from .paths import check_output

    p = check_output(path, inputs, what="output")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise PrunekitError(f"Cannot write {path!r}: its directory {str(parent)!r} does not exist.")
    return p


def write_text_file(path: str, text: str, inputs=()) -> None:
    """Write ``text`` atomically; OS errors become one sentence naming the path."""
    from .files import atomic_write_text

    check_writable(path, inputs)
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- commands


@main.command(short_help="FLOPs and parameters per layer, checked against fvcore.", epilog="""\b
Examples:
  prunekit report model.pt -i 1,3,256,256 -b prunekit.zoo:unet \\
      -k '{"num_classes": 2}'
  prunekit report out/run    # a run directory: its manifest gives the rest
  prunekit report r18.pt -i 1,3,224,224 -b torchvision.models:resnet18 \\
      --depth 1 --json
  prunekit report model.pt -b prunekit.zoo:unet --compare out/run --latency
""")
@model_options(input_shape_required=False)
@click.option("--compare", "compare", metavar="OTHER",
              help="A second model (e.g. the pruned one) to compare with, layer by layer: a run directory, a "
                   "weights file for the same builder, or a whole pickled module with --trusted.")
@click.option("--depth", type=int, metavar="N",
              help="Sum the layers by the first N parts of their names (1: layer1, layer2, ...).")
@click.option("--latency", is_flag=True,
              help="Also measure the forward latency (both models, interleaved, with --compare).")
@click.option("--device", default="cpu", show_default=True, metavar="DEVICE", help="Where --latency measures.")
@click.option("--threads", type=click.IntRange(1), metavar="N", help="CPU threads for --latency (default: torch's).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON only.")
def report(spec: ModelSpec, compare: str | None, depth: int | None, latency: bool, device: str,
           threads: int | None, as_json: bool) -> None:
    """FLOPs and parameters of MODEL per layer, checked against fvcore.

    One fused multiply-add counts as one flop (fvcore's convention). MODEL may
    be a prunekit run directory: its manifest gives the builder, kwargs and
    input shape, so no other option is needed.
    """
    from . import reports as rep
    from .data.devices import resolve_device

    from .safety import quiet_stdout

    rep.check_depth(depth)
    if latency:
        resolve_device(device)
    with quiet_stdout():  # what the user's builder or forward prints goes to stderr, not into --json
        model, example = load_cli_model(spec, compare)
        if compare is None:
            data = rep.model_report(model, example, depth, leaf_modules=spec.leaf)
        else:
            other = load_compare_model(compare, spec, base=model)
            data = rep.compare_report(model, other, example, depth, leaf_modules=spec.leaf)
        if latency:
            data["latency"] = rep.latency_report(model, other if compare else None, example, device, threads)
    if as_json:
        echo_json(data)
    elif compare is None:
        rep.render_model_report(data, make_console())
    else:
        rep.render_compare_report(data, make_console())


@main.command(short_help="Channel groups: what goes together, what is pinned, why.", epilog="""\b
Examples:
  prunekit graph model.pt -i 1,3,256,256 -b prunekit.zoo:unet
  prunekit graph out/run --dot groups.dot
  dot -Tsvg groups.dot -o groups.svg    # draw it with Graphviz
""")
@model_options(input_shape_required=False)
@click.option("--dot", "dot", metavar="FILE", help="Also write the groups as a Graphviz file.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON only.")
def graph(spec: ModelSpec, dot: str | None, as_json: bool) -> None:
    """The channel groups of MODEL: which channels are removed together, and which are pinned and why."""
    from . import reports as rep
    from .graphs import build_graph
    from .safety import quiet_stdout

    inputs = input_paths(spec.path)
    if dot is not None:
        check_writable(dot, inputs)
    with quiet_stdout():  # what the user's builder or forward prints goes to stderr, not into --json
        model, example = load_cli_model(spec)
        g = build_graph(model, example, leaf_modules=spec.leaf)
        data = rep.graph_report(g)
    if dot is not None:
        write_text_file(dot, rep.to_dot(g), inputs)
    if as_json:
        echo_json(data)
    else:
        rep.render_graph_report(data, make_console())
    if dot is not None:
        click.echo(f"Wrote {dot} (render it with: dot -Tsvg {dot} -o groups.svg).", err=as_json)


# --------------------------------------------------------------------------- prune, init-config and demo


@main.command(short_help="Prune MODEL to the FLOPs, parameter or latency targets.", epilog="""\b
Examples:
  prunekit prune model.pt -b prunekit.zoo:unet -k '{"num_classes": 2}' \\
      -i 1,3,256,256 --flops 0.5 --data images/ -o out/run
  prunekit prune r18.pt -b torchvision.models:resnet18 -i 1,3,224,224 \\
      --flops 0.5 --method l1 -o out/r18
  prunekit prune out/demo/unet.pt --config configs/unet.yaml -o out/run
  prunekit prune out/demo/unet.pt -c configs/unet.yaml --flops 0.3 -o out/r30
  prunekit init-config -b prunekit.zoo:unet -o prunekit.yaml  # every key
""")
@click.argument("model", metavar="MODEL")
@click.option("--config", "-c", "config_path", metavar="CONFIG",
              help="A YAML pruning config (prunekit init-config writes one); the flags below override its keys.")
@click.option("--output", "-o", "run_dir", required=True, metavar="RUN_DIR",
              help="Run directory: checkpoint, model.pt, manifest.json, reports and plots.")
@config_flags()
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--force", is_flag=True, help="Replace an earlier run in RUN_DIR (kept until the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def prune(model: str, config_path: str | None, run_dir: str, overrides: Overrides, resume: bool, force: bool,
          quiet: bool) -> None:
    """Prune MODEL until the targets hold; write the smaller model and its report to RUN_DIR.

    MODEL is a state_dict for the builder (--builder or the config's
    model.builder), or a whole pickled module with --trusted. The settings come
    from --config, from the flags, or both (a flag wins); without a config the
    defaults of `prunekit init-config` apply. Load the pruned model later with
    prunekit.load_pruned(RUN_DIR), no pickle involved.
    """
    import torch

    from .artifacts import PICKLED_MODULE
    from .configtools import with_overrides
    from .distributed import launched_rank
    from .loading import load_model
    from .loop import prune as run_prune
    from .reports.run import summary_lines
    from .rundir import Interrupted, inspect, plan
    from .safety import check_input_memory

    inputs = [model] + ([config_path] if config_path else [])
    config = with_overrides(config_path, overrides.values(), overrides.flags)
    where = f"the config '{config_path}'" if config_path else "a config"
    if config.input_shape is None:
        raise PrunekitError(f"prune needs input_shape (the example input's shape): pass --input-shape, e.g. "
                            f"1,3,256,256, or set input_shape in {where}.")
    if config.model.builder is None and not config.model.trusted_pickle:
        raise PrunekitError(f"prune needs model.builder (the function that builds the model): pass --builder "
                            f"package.module:function or set model.builder in {where} (or --trusted for a whole "
                            "pickled module).")
    if launched_rank() == 0:  # under torchrun, rank 0 alone reads and writes the run directory
        plan(run_dir, resume, force, inputs)  # refuse a run directory before the model is even read
    check_input_memory(config.input_shape, "input_shape")
    net = load_model(model, builder=config.model.builder, kwargs=config.model.kwargs,
                     trusted=config.model.trusted_pickle)
    torch.manual_seed(config.seed)
    example = torch.rand(config.input_shape)
    try:
        result = run_prune(net, example, config, run_dir=run_dir, resume=resume, force=force, progress=not quiet,
                           input_files=inputs)
    except KeyboardInterrupt as stop:
        # also a stop that landed outside the run's own handling (torchrun's SIGTERM to rank 0 just after a
        # collective failed on the rank that was stopped): the run directory says whether it can go on
        resumable = stop.resumable if isinstance(stop, Interrupted) else \
            launched_rank() == 0 and inspect(run_dir) == "interrupted"
        if resumable:
            again = command_line("prunekit", "prune", model, *(["--config", config_path] if config_path else []),
                                 *overrides.argv(), "-o", run_dir, "--resume")
            click.echo(f"\nInterrupted; continue with: {again}", err=True)
        elif isinstance(stop, Interrupted):
            click.echo(f"\nInterrupted; {str(stop).split('; ', 1)[-1]}", err=True)
        else:
            raise
        sys.exit(130)
    if launched_rank() != 0:  # under torchrun the summary is rank 0's to print; every rank exits alike
        sys.exit(0 if result.targets_met else 2)
    for line in summary_lines(result):
        click.echo(line)
    pickled = (Path(run_dir) / PICKLED_MODULE).is_file()  # a run from a trusted whole pickled module
    report = command_line("prunekit", "report", run_dir, *(["--trusted"] if pickled else []))
    click.echo(f"Best model: step {result.best_step}; written to {run_dir} (model.pt, manifest.json, report.md, "
               f"trajectory.png, widths.png{', module.pt' if pickled else ''}); see it with: {report}")
    if not result.targets_met:
        raise CliError(result.message)


@main.command("init-config", short_help="Write a commented config with every key and its default.", epilog="""\b
Examples:
  prunekit init-config -o prunekit.yaml
  prunekit init-config -b torchvision.models:resnet18 \\
      -k '{"num_classes": 10}' -i 1,3,224,224 --flops 0.5 -o resnet.yaml
  prunekit init-config | less
""")
@config_flags()
@click.option("--output", "-o", "output", metavar="FILE", help="Write the config to FILE (default: print it).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def init_config(overrides: Overrides, output: str | None, force: bool) -> None:
    """Write a starting config: every key there is, with its default and a comment.

    The flags (the same as prune's) fill in their keys. Sections that are off
    by default (fine-tuning, data) are written out in comments, ready to switch
    on.
    """
    from .configtools import config_template

    text = config_template(overrides.values(), overrides.flags)
    if output is None:
        click.echo(text, nl=False)
        return
    if os.path.lexists(output) and not os.path.isdir(output) and not force:
        raise PrunekitError(f"'{output}' already exists; pass --force to replace it or choose another file.")
    write_text_file(output, text)
    click.echo(f"Wrote {output}; prune with: prunekit prune MODEL --config {output} -o RUN_DIR", err=True)


@main.command(short_help="Train, prune and compare the reference U-Net on real data.", epilog="""\b
Examples:
  prunekit demo    # writes out/demo: unet.pt, config.yaml, run/
  prunekit demo -o /tmp/demo --iterations 50 2>&1 | tee demo.log
""")
@click.option("--output", "-o", "out_dir", default="out/demo", show_default=True, metavar="DIR",
              help="Where the trained model, config and run directory go.")
@click.option("--iterations", default=200, show_default=True, type=click.IntRange(1),
              help="Training iterations before pruning.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def demo(out_dir: str, iterations: int, quiet: bool) -> None:
    """Train the reference U-Net on real nuclei tiles, prune it to half its FLOPs with
    IPAD, fine-tune, and print FLOPs, parameters, latency and IoU before and after.

    Progress goes to stderr: bars on a terminal, one line per piece of work
    when piped or logged.
    """
    from .demo import run_demo
    from .paths import check_output
    from .rundir import MARKER

    out = check_output(out_dir, what="demo output", directory=True)
    if out.is_dir() and any(out.iterdir()) and not (out / "run" / MARKER).is_file():
        raise PrunekitError(f"'{out_dir}' already holds files the demo did not write (it writes unet.pt, "
                            "config.yaml and run/ there); choose a new directory.")
    run_demo(out_dir, train_iterations=iterations, progress=not quiet, echo=click.echo)


main.add_command(export)
main.add_command(sparsify)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
