"""How the ``report``, ``graph`` and ``export`` commands take a model: the shared options (a file, a
builder and its kwargs, --trusted, the input shape, leaf modules) and loading what they name."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from .errors import PrunekitError
from .rundir import input_paths, run_dir_of

if TYPE_CHECKING:
    import torch


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
                         help="Shape of the example input, e.g. 1,3,256,256 or 1x3x256x256 (a run "
                              "directory's manifest gives its own)."),
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


def _example(spec: ModelSpec, also: str | None = None):
    """The example input: --input-shape, or the shape a run directory's manifest stores (MODEL's,
    else ``also``'s: the --compare model's)."""
    import torch

    from .loading import parse_input_shape
    from .safety import check_input_memory

    shape_text = spec.input_shape
    if shape_text is None:
        shape_text = next((s for s in (run_input_shape(p) for p in (spec.path, also) if p) if s), None)
    if shape_text is None:
        raise PrunekitError("An example input shape is needed; pass --input-shape, e.g. 1,3,256,256 "
                            "(a run directory's manifest gives its own).")
    shape = parse_input_shape(shape_text)
    check_input_memory(shape, "--input-shape")
    return torch.randn(shape)


def run_input_shape(path: str) -> list[int] | None:
    """The example input shape stored in the manifest of the run directory ``path`` is (or holds)."""
    from .artifacts import read_manifest

    run_dir = run_dir_of(path)
    if run_dir is None:
        return None
    shape = read_manifest(run_dir / "manifest.json").get("input_shape")
    return shape if isinstance(shape, list) and shape else None


def _check_leaves(model, leaf: tuple[str, ...]) -> None:
    import difflib

    names = {n for n, _ in model.named_modules() if n}
    for name in leaf:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise PrunekitError(f"--leaf {name!r} is not a submodule of the model{hint}")


def load_cli_model(spec: ModelSpec, compare: str | None = None):
    """``(model, example_input)`` for a command: the input shape is checked before the file is read.

    Without --input-shape, a run directory (MODEL, else ``compare``) gives the one its manifest stores.
    """
    from .loading import check_file, load_model, parse_kwargs

    parse_kwargs(spec.kwargs)  # a bad JSON fails before any file is read
    _check_unfinished(spec.path)
    run_dir = run_dir_of(spec.path)
    if run_dir is None:
        check_file(Path(spec.path))  # a missing file or a plain folder is said before an input shape is asked for
    example = _example(spec, compare)
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


def _check_unfinished(path: str) -> None:
    """A run directory without its model yet: say so, instead of "is a directory"."""
    from .rundir import inspect

    if Path(path).is_dir() and inspect(path) in ("started", "interrupted"):
        raise PrunekitError(f"'{path}' holds a prunekit run that has not finished (no model.pt yet); finish it with "
                            "prunekit prune ... --resume.")


def load_compare_model(path: str, spec: ModelSpec, base=None):
    """The model to compare with: a prunekit run directory (or its model.pt) is rebuilt from
    its manifest without pickle; a whole pickled module (with --trusted) is used as it is;
    a weights file is loaded with the same builder and kwargs as MODEL."""
    from .artifacts import load_pruned
    from .errors import UsageError
    from .loading import load_model

    run_dir = run_dir_of(path)
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


def export_inputs(run_dir: str, input_shape: str | None) -> tuple[Path, list[str], torch.Tensor]:
    """The run directory ``export`` reads, its files and the example input, checked before anything is
    loaded: ``--input-shape`` when given, else the shape the run recorded."""
    import torch

    from .artifacts import recorded_input_shape
    from .loading import parse_input_shape
    from .rundir import KNOWN
    from .safety import check_input_memory

    if not Path(run_dir).exists():
        raise PrunekitError(f"'{run_dir}' does not exist; give the directory a prunekit prune run wrote.")
    _check_unfinished(run_dir)
    found = run_dir_of(run_dir)
    if found is None:
        raise PrunekitError(f"'{run_dir}' is not a prunekit run directory (it needs manifest.json and model.pt); "
                            "give the directory a prunekit prune run wrote.")
    if input_shape is not None:
        shape, what = parse_input_shape(input_shape), "--input-shape"
    else:
        shape, what = recorded_input_shape(found), "the run's input_shape"
        if shape is None:
            raise PrunekitError(f"the run in '{found}' records no input shape; pass --input-shape, e.g. 1,3,256,256.")
    check_input_memory(shape, what)
    torch.manual_seed(0)
    # every file of the run is kept safe from --onnx, not only the two that are read
    return found, [*input_paths(run_dir), *(str(found / name) for name in KNOWN)], torch.randn(shape)
