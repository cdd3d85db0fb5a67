"""The ``prunekit`` command line: thin commands that parse, call the library, print.

Adding a command::

    @main.command()
    @model_options()
    @click.option(...)
    def prune(spec: ModelSpec, ...):
        model, example = load_cli_model(spec)
        ...

Every :class:`~prunekit.errors.PrunekitError` raised inside a command is
printed as ``Error: <one sentence>`` on stderr and exits with code 2 (see
:class:`PrunekitGroup`), and so are what the machine refuses (an OSError:
disk full, permission denied, read-only file system, with the path; running
out of memory). Ctrl-C prints one line and exits with code 130. ``--debug``
shows the traceback behind any of these; any other exception is a bug and
shows its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from .errors import PrunekitError, PrunekitWarning

__all__ = ["main", "ModelSpec", "model_options", "load_cli_model", "load_compare_model", "CliError",
           "make_console", "echo_json", "write_text_file"]


class CliError(click.ClickException):
    """A user-facing error: ``Error: <message>`` on stderr, exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


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
            raise CliError(_sentence(str(exc))) from None
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


@click.group(cls=PrunekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


# --------------------------------------------------------------------------- shared model options


@dataclass(frozen=True)
class ModelSpec:
    """How the user named a model and its example input on the command line."""

    path: str
    builder: str | None = None
    kwargs: str | None = None
    trusted: bool = False
    input_shape: str | None = None
    leaf: tuple[str, ...] = ()


def model_options(input_shape_required: bool = True) -> Callable:
    """The MODEL argument and the options that say how to load and run it.

    The decorated command receives them as one ``spec`` argument (a :class:`ModelSpec`).
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, model: str, builder, kwargs, trusted, input_shape, leaf, **rest):
            spec = ModelSpec(model, builder, kwargs, trusted, input_shape, tuple(leaf))
            return fn(*args, spec=spec, **rest)

        if hasattr(wrapper, "__click_params__"):  # options declared below this decorator: keep, don't share
            wrapper.__click_params__ = list(wrapper.__click_params__)

        options = [
            click.argument("model", metavar="MODEL"),
            click.option("--input-shape", "-i", required=input_shape_required, metavar="SHAPE",
                         help="Shape of the example input, e.g. 1,3,256,256 or 1x3x256x256."),
            click.option("--builder", "-b", metavar="PKG.MOD:FN",
                         help="Function that builds the model the weights fit, e.g. torchvision.models:resnet50."),
            click.option("--kwargs", "-k", metavar="JSON",
                         help='Keyword arguments for the builder as a JSON object, e.g. \'{"num_classes": 2}\'.'),
            click.option("--trusted", is_flag=True,
                         help="Allow reading a whole pickled module (unpickling runs code from the file)."),
            click.option("--leaf", multiple=True, metavar="NAME",
                         help="Treat this submodule as one opaque op when tracing (repeatable); "
                              "a module that cannot be traced becomes one by itself."),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def _example(spec: ModelSpec):
    import torch

    from .loading import parse_input_shape
    from .safety import check_input_memory

    if spec.input_shape is None:
        raise PrunekitError("An example input shape is needed; pass --input-shape, e.g. 1,3,256,256.")
    shape = parse_input_shape(spec.input_shape)
    check_input_memory(shape, "--input-shape")
    return torch.randn(shape)


def _check_leaves(model, leaf: tuple[str, ...]) -> None:
    import difflib

    names = {n for n, _ in model.named_modules() if n}
    for name in leaf:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise PrunekitError(f"--leaf {name!r} is not a submodule of the model{hint}")


def load_cli_model(spec: ModelSpec):
    """``(model, example_input)`` for a command: the input shape is checked before the file is read."""
    from .loading import load_model, parse_kwargs

    parse_kwargs(spec.kwargs)  # a bad JSON fails before any file is read
    example = _example(spec)
    _check_unfinished(spec.path)
    run_dir = _run_dir_of(spec.path)
    if run_dir is not None:  # a pruned model, rebuilt from its manifest: data, not code
        from .artifacts import load_pruned
        from .errors import UsageError

        if spec.kwargs:
            raise UsageError(f"'{run_dir}' is a run directory whose manifest gives the builder's kwargs; "
                             "drop --kwargs.")
        model = load_pruned(run_dir, builder=spec.builder, trusted=spec.trusted)
    else:
        model = load_model(spec.path, builder=spec.builder, kwargs=spec.kwargs, trusted=spec.trusted)
    _check_leaves(model, spec.leaf)
    return model, example


def input_paths(path: str) -> list[str]:
    """The files a MODEL argument reads: the file, or a run directory's manifest and weights."""
    run_dir = _run_dir_of(path)
    if run_dir is None:
        return [path]
    return [path, str(run_dir / "manifest.json"), str(run_dir / "model.pt")]


def _check_unfinished(path: str) -> None:
    """A run directory without its model yet: say so, instead of "is a directory"."""
    from .rundir import inspect

    if Path(path).is_dir() and inspect(path) in ("started", "interrupted"):
        raise PrunekitError(f"'{path}' holds a prunekit run that has not finished (no model.pt yet); finish it with "
                            "prunekit prune ... --resume.")


def _run_dir_of(path: str) -> Path | None:
    """The prunekit run directory that ``path`` is, or whose model.pt it is."""
    candidate = Path(path)
    run_dir = candidate if candidate.is_dir() else candidate.parent
    if (run_dir / "manifest.json").is_file() and (candidate.is_dir() or candidate.name == "model.pt"):
        return run_dir
    return None


def load_compare_model(path: str, spec: ModelSpec, base=None):
    """The model to compare with: a prunekit run directory (or its model.pt) is rebuilt from
    its manifest without pickle; a whole pickled module (with --trusted) is used as it is;
    a weights file is loaded with the same builder and kwargs as MODEL."""
    from .artifacts import load_pruned
    from .errors import UsageError
    from .loading import load_model

    run_dir = _run_dir_of(path)
    if run_dir is not None:
        return load_pruned(run_dir, model=base, builder=spec.builder, trusted=spec.trusted)
    if spec.trusted:
        try:
            return load_model(path, trusted=True)  # a whole module keeps its own (pruned) widths
        except UsageError:
            pass  # only weights: load them into the builder's model below
    try:
        return load_model(path, builder=spec.builder, kwargs=spec.kwargs, trusted=spec.trusted)
    except PrunekitError as exc:
        text = str(exc).rstrip(".")
        if "do not fit" in text:  # pruned weights cannot fill the builder's full widths
            raise PrunekitError(f"{text}; to compare with a pruned model, give its whole pickled module "
                                "and --trusted.") from None
        raise


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


@main.command()
@model_options()
@click.option("--compare", "compare", metavar="OTHER",
              help="A second model (e.g. the pruned one) to compare with, layer by layer: a weights file "
                   "for the same builder, or a whole pickled module with --trusted.")
@click.option("--depth", type=int, metavar="N",
              help="Sum the layers by the first N parts of their names (1: layer1, layer2, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON only.")
def report(spec: ModelSpec, compare: str | None, depth: int | None, as_json: bool) -> None:
    """FLOPs and parameters of MODEL per layer, checked against fvcore.

    One fused multiply-add counts as one flop (fvcore's convention).
    """
    from . import reports as rep

    from .safety import quiet_stdout

    rep.check_depth(depth)
    with quiet_stdout():  # what the user's builder or forward prints goes to stderr, not into --json
        model, example = load_cli_model(spec)
        if compare is None:
            data = rep.model_report(model, example, depth, leaf_modules=spec.leaf)
        else:
            other = load_compare_model(compare, spec, base=model)
            data = rep.compare_report(model, other, example, depth, leaf_modules=spec.leaf)
    if as_json:
        echo_json(data)
    elif compare is None:
        rep.render_model_report(data, make_console())
    else:
        rep.render_compare_report(data, make_console())


@main.command()
@model_options()
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


# --------------------------------------------------------------------------- prune and demo


@main.command()
@click.argument("model", metavar="MODEL")
@click.option("--config", "-c", "config_path", required=True, metavar="CONFIG", help="The YAML pruning config.")
@click.option("--output", "-o", "run_dir", required=True, metavar="RUN_DIR",
              help="Run directory: checkpoint, model.pt, manifest.json, reports and plots.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite an existing run directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def prune(model: str, config_path: str, run_dir: str, resume: bool, force: bool, quiet: bool) -> None:
    """Prune MODEL until the config's FLOPs and parameter targets hold.

    MODEL is a state_dict for the config's model.builder (or a whole pickled
    module when model.trusted_pickle is true). Loads the pruned model later
    with prunekit.load_pruned(RUN_DIR), no pickle involved.
    """
    import torch

    from .config import load_config
    from .loading import load_model
    from .loop import prune as run_prune
    from .rundir import Interrupted, plan
    from .safety import check_input_memory

    inputs = [model, config_path]
    config = load_config(config_path)
    if config.input_shape is None:
        raise PrunekitError(f"config '{config_path}' needs input_shape, e.g. [1, 3, 256, 256].")
    if config.model.builder is None and not config.model.trusted_pickle:
        raise PrunekitError(f"config '{config_path}' needs model.builder (or model.trusted_pickle: true "
                            f"for a whole pickled module).")
    plan(run_dir, resume, force, inputs)  # refuse a run directory before the model is even read
    check_input_memory(config.input_shape, "input_shape")
    net = load_model(model, builder=config.model.builder, kwargs=config.model.kwargs,
                     trusted=config.model.trusted_pickle)
    torch.manual_seed(config.seed)
    example = torch.rand(config.input_shape)
    try:
        result = run_prune(net, example, config, run_dir=run_dir, resume=resume, force=force, progress=not quiet,
                           input_files=inputs)
    except Interrupted as stop:
        if stop.resumable:
            click.echo(f"\nInterrupted; continue with: prunekit prune {model} --config {config_path} "
                       f"-o {run_dir} --resume", err=True)
        else:
            click.echo(f"\nInterrupted; {str(stop).split('; ', 1)[-1]}", err=True)
        sys.exit(130)
    o, f = result.original, result.final
    status = "targets met" if result.targets_met else "targets NOT met"
    click.echo(f"FLOPs {o['flops']:,} -> {f['flops']:,} ({f['flops'] / o['flops']:.1%}), "
               f"parameters {o['params']:,} -> {f['params']:,} ({f['params'] / o['params']:.1%}); {status}.")
    click.echo(f"Best model: step {result.best_step}; written to {run_dir} (model.pt, manifest.json, report.md).")
    if not result.targets_met:
        raise CliError(result.message)


@main.command()
@click.option("--output", "-o", "out_dir", default="out/demo", show_default=True, metavar="DIR",
              help="Where the trained model, config and run directory go.")
@click.option("--iterations", default=200, show_default=True, type=click.IntRange(1),
              help="Training iterations before pruning.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(out_dir: str, iterations: int, quiet: bool) -> None:
    """Train the reference U-Net on real nuclei tiles, prune it to half its FLOPs with
    IPAD, fine-tune, and print FLOPs, parameters and IoU before and after."""
    from .demo import run_demo
    from .paths import check_output
    from .rundir import MARKER

    out = check_output(out_dir, what="demo output", directory=True)
    if out.is_dir() and any(out.iterdir()) and not (out / "run" / MARKER).is_file():
        raise PrunekitError(f"'{out_dir}' already holds files the demo did not write (it writes unet.pt, "
                            "config.yaml and run/ there); choose a new directory.")
    run_demo(out_dir, train_iterations=iterations, progress=not quiet, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
