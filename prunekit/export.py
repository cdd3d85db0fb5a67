"""ONNX export of a (pruned) model, checked against PyTorch and timed beside it.

    result = export_onnx(model, torch.randn(1, 3, 256, 256), "model.onnx")
    result.exporter, result.max_abs_diff, result.speedup

The file is written by torch.onnx's dynamo exporter where it is available
(torch >= 2.5 with onnxscript), else, or when it fails, by the TorchScript
exporter; ``exporter`` and ``fallback_reason`` say which and why. Weights are
embedded in one file (a model whose weights pass 1.5 GB gets a ``.data`` file
beside it, as ONNX requires), written atomically: nothing at ``path`` changes
until the export is complete. The batch dimension is dynamic unless
``dynamic_batch=False``.

With onnxruntime installed (``pip install prunekit[onnx]``), the file is run on
the CPU with the example input (and, for a dynamic batch, with one more sample)
and every output is compared with PyTorch's, flattened in order (dicts by
insertion, tuples by position); a difference beyond ``atol + rtol * |expected|``
raises :class:`OnnxMismatchError` and keeps the file for inspection. Without
onnxruntime the check is skipped and ``skipped`` says so. Both runtimes are then
timed, interleaved (:func:`prunekit.latency.time_calls`), with the same threads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import PrunekitError
from .arguments import check_model
from .graphs.graph import as_inputs
from .latency import Latency, time_calls

__all__ = ["ExportResult", "ExportError", "OnnxMismatchError", "export_onnx", "INSTALL_HINT"]

INSTALL_HINT = "pip install prunekit[onnx]"
_EXTERNAL_DATA_BYTES = 1536 * 2**20  # above this, ONNX keeps the weights in a file of their own


class ExportError(PrunekitError):
    """Neither exporter could write the model; ``reasons`` maps each exporter to its first error line."""

    def __init__(self, message: str, reasons: dict[str, str]):
        super().__init__(message)
        self.reasons = reasons


class OnnxMismatchError(PrunekitError):
    """ONNX Runtime's outputs differ from PyTorch's, or it cannot load or run the file; the file is
    kept at ``path`` for inspection.

    ``output`` names the first output that differs ("" when none was compared), ``batch`` the batch
    size it was run with (0 when the file did not load).
    """

    exit_code = 1

    def __init__(self, message: str, path: str, output: str, max_abs_diff: float, batch: int):
        super().__init__(message)
        self.path, self.output, self.max_abs_diff, self.batch = path, output, max_abs_diff, batch


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how it compares with PyTorch."""

    path: str
    exporter: str  # "dynamo" or "torchscript"
    fallback_reason: str | None  # why the dynamo exporter was not used (None when it was)
    opset: int | None
    dynamic_batch: bool
    input_shapes: list[list[int]]
    outputs: list[str]
    max_abs_diff: float | None  # over every output and batch size checked; None when not checked
    skipped: str | None  # why the check or the timing did not run
    pytorch_latency: Latency | None
    onnxruntime_latency: Latency | None
    versions: dict[str, str | None]

    @property
    def checked(self) -> bool:
        return self.max_abs_diff is not None

    @property
    def speedup(self) -> float | None:
        """PyTorch's median time over ONNX Runtime's (above 1: ONNX Runtime is faster)."""
        if self.pytorch_latency is None or self.onnxruntime_latency is None:
            return None
        return self.pytorch_latency.median / self.onnxruntime_latency.median

    def as_dict(self) -> dict:
        data = asdict(self)
        data.update(checked=self.checked, speedup=self.speedup)
        return data


def export_onnx(model: nn.Module, example_inputs, path, *, check: bool = True, opset: int | None = None,
                dynamic_batch: bool = True, rtol: float = 1e-3, atol: float = 1e-4, threads: int | None = None,
                repeats: int = 30, warmup: int = 5, exporter: str = "auto") -> ExportResult:
    """Write ``model`` (in eval mode, on the CPU; the caller's model is not changed) to ``path`` as ONNX.

    ``check``: compare ONNX Runtime's outputs with PyTorch's (raises :class:`OnnxMismatchError`).
    ``repeats``: timed runs of each runtime (0: no timing). ``threads``: intra-op threads of both
    (default: torch's current setting). ``exporter``: "auto" (dynamo, else TorchScript), "dynamo"
    or "torchscript".
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise PrunekitError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}.")
    check_opset(opset)
    check_model(model)
    for name, tolerance in (("rtol", rtol), ("atol", atol)):
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
            raise PrunekitError(f"{name} must be a number of at least 0, got {tolerance!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise PrunekitError(f"repeats must be a whole number of at least 0, got {repeats!r}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PrunekitError(f"threads must be a whole number of at least 1, got {threads!r}.")
    inputs = as_inputs(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise PrunekitError("ONNX export needs the example input as a tensor or a tuple of tensors.")
    inputs = tuple(x.detach().cpu() for x in inputs)
    if any(x.dim() == 0 for x in inputs):
        dynamic_batch = False  # a scalar input has no batch dimension
    net = model if _ready(model) else _cpu_eval_copy(model)
    with torch.no_grad():
        try:
            expected = _outputs(net(*inputs))
        except Exception as exc:  # the model's own error, reported in one sentence
            from .graphs.trace import ExampleInputError

            raise ExampleInputError.raised(exc) from None
    if not expected:
        raise PrunekitError("the model returns no tensors, so there is nothing to export.")
    input_names = _input_names(net, len(inputs))
    output_names = [name for name, _ in expected]
    path = Path(path)
    used, fallback = _export(net, inputs, path, opset, dynamic_batch, input_names, output_names, exporter)
    ort = _onnxruntime()
    skipped = None if ort is not None else f"onnxruntime is not installed ({INSTALL_HINT})"
    max_diff = None
    session = None
    if ort is not None and (check or repeats):
        session = _session(ort, path, threads)
    if session is not None and check:
        max_diff = _check(session, net, inputs, expected, path, dynamic_batch, rtol, atol)
    pt_latency = ort_latency = None
    if session is not None and repeats:
        feeds = _feeds(session, inputs)
        timed = time_calls({"pytorch": lambda: net(*inputs), "onnxruntime": lambda: session.run(None, feeds)},
                           "cpu", threads, repeats, warmup)
        pt_latency, ort_latency = timed["pytorch"], timed["onnxruntime"]
    return ExportResult(
        path=str(path), exporter=used, fallback_reason=fallback, opset=_opset(path), dynamic_batch=dynamic_batch,
        input_shapes=[list(x.shape) for x in inputs], outputs=output_names, max_abs_diff=max_diff, skipped=skipped,
        pytorch_latency=pt_latency, onnxruntime_latency=ort_latency, versions=_versions(ort),
    )


# --------------------------------------------------------------------------- exporting


def _ready(model: nn.Module) -> bool:
    """In eval mode and on the CPU, so it can be used without a copy."""
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    return on_cpu and not any(m.training for m in model.modules())


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu().eval()


def _outputs(out, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """The model's output tensors in the order ONNX lists them (torch's pytree order), with names."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):
        items = out.items()
    elif isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple: its field names
        items = zip(out._fields, out)
    elif isinstance(out, (list, tuple)):
        items = enumerate(out)
    else:
        return []  # None, numbers: not part of an ONNX graph
    return [leaf for key, value in items for leaf in _outputs(value, f"{prefix}.{key}")]


def _input_names(model: nn.Module, count: int) -> list[str]:
    """The forward's own parameter names where they name every input, else input_0, input_1, ..."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count:
        return [p.name for p in params[:count]]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _dynamo_available() -> str | None:
    """None when torch.onnx's dynamo exporter can run here, else why not."""
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        return f"torch {torch.__version__} has no dynamo ONNX exporter (torch >= 2.5 has)"
    if importlib.util.find_spec("onnxscript") is None:
        return f"the dynamo exporter needs onnxscript, which is not installed ({INSTALL_HINT})"
    return None


def _export(model, inputs, path: Path, opset, dynamic_batch, input_names, output_names,
            exporter: str) -> tuple[str, str | None]:
    """Write the file with the first exporter that works: ``(exporter used, why dynamo was not)``."""
    reasons: dict[str, str] = {}
    if exporter in ("auto", "dynamo"):
        unavailable = _dynamo_available()
        if unavailable is None:
            try:
                _write_beside(path, lambda target: _dynamo(model, inputs, target, opset, dynamic_batch,
                                                           input_names, output_names))
                return "dynamo", None
            except PrunekitError:
                raise
            except Exception as exc:  # an exporter fails in many ways; its first line says which
                reasons["dynamo"] = _first_line(exc)
        else:
            reasons["dynamo"] = unavailable
    if exporter in ("auto", "torchscript"):
        try:
            _write_beside(path, lambda target: _torchscript(model, inputs, target, opset, dynamic_batch,
                                                            input_names, output_names))
            return "torchscript", reasons.get("dynamo")
        except PrunekitError:
            raise
        except Exception as exc:
            reasons["torchscript"] = _first_line(exc)
    tried = "; ".join(f"the {name} exporter: {why}" for name, why in reasons.items())
    raise ExportError(f"the model could not be exported to ONNX ({tried}).", reasons)


def check_opset(opset: int | None, name: str = "opset") -> None:
    """An opset torch.onnx writes (or None: the exporter's own), else one sentence naming ``name``."""
    try:
        from torch.onnx import _constants
        lowest, highest = _constants.ONNX_MIN_OPSET, _constants.ONNX_MAX_OPSET
    except (ImportError, AttributeError):  # a torch that moved them: the range of torch 2.3 to 2.14
        lowest, highest = 7, 23
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not lowest <= opset <= highest):
        raise PrunekitError(f"{name} must be a whole number from {lowest} to {highest} (what this torch.onnx "
                            f"writes), got {opset!r}.")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__).rstrip(".")


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines, warnings and log records (deprecations, tracer notes, the opset
    converter's tracebacks) stay out of the output: what matters is raised, or read from the file."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _dynamo(model, inputs, target: Path, opset, dynamic_batch, input_names, output_names) -> None:
    shapes = tuple({0: "batch"} for _ in inputs) if dynamic_batch else None
    with _quiet():
        program = torch.onnx.export(model, tuple(inputs), None, dynamo=True, verbose=False, opset_version=opset,
                                    dynamic_shapes=shapes, input_names=input_names, output_names=output_names,
                                    external_data=False)
        program.save(str(target), external_data=_weight_bytes(model) > _EXTERNAL_DATA_BYTES)
    written = _opset(target)
    if opset is not None and written != opset:  # below its own opset it converts, and keeps its own on failure
        raise RuntimeError(f"it wrote opset {written}, not the {opset} asked for")


def _torchscript(model, inputs, target: Path, opset, dynamic_batch, input_names, output_names) -> None:
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]} if dynamic_batch else None
    with _quiet():
        torch.onnx.export(model, tuple(inputs), str(target), dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names, dynamic_axes=axes)


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _write_beside(path: Path, write) -> None:
    """``write(target)`` into a temporary directory beside ``path``, then move what it wrote into place:
    an external-data file first, the model file last, so ``path`` only ever holds a complete export."""
    from .paths import os_error

    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise PrunekitError(f"Cannot write {str(path)!r}: its directory {str(directory)!r} does not exist.")
    try:
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        raise os_error(exc, "write", path) from None
    try:
        write(staging / path.name)
        written = sorted(staging.iterdir(), key=lambda p: p.name == path.name)  # the model file last
        if not any(p.name == path.name for p in written):
            raise RuntimeError("the exporter wrote no file")
        for item in written:
            with open(item, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(item, directory / item.name)
    except OSError as exc:
        raise os_error(exc, "write", path) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _opset(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _versions(ort) -> dict[str, str | None]:
    try:
        import onnx

        onnx_version = onnx.__version__
    except ImportError:
        onnx_version = None
    return {"torch": torch.__version__, "onnx": onnx_version,
            "onnxruntime": getattr(ort, "__version__", None) if ort is not None else None}


# --------------------------------------------------------------------------- checking


def _onnxruntime():
    """The onnxruntime module, or None when it is not installed (it is an optional extra)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _session(ort, path: Path, threads: int | None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types: an op or opset it does not support
        raise OnnxMismatchError(f"ONNX Runtime could not load '{path}': {_first_line(exc)}; the file is kept for "
                                "inspection.", str(path), "", float("inf"), 0) from None


def _feeds(session, inputs) -> dict:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise PrunekitError(f"the ONNX model takes {len(names)} inputs, but the example has {len(inputs)}.")
    return {name: x.detach().cpu().numpy() for name, x in zip(names, inputs)}


def _check(session, model, inputs, expected, path: Path, dynamic_batch: bool, rtol: float, atol: float) -> float:
    """The largest absolute difference between ONNX Runtime's and PyTorch's outputs; raises on a mismatch."""
    runs = [(inputs, expected)]
    if dynamic_batch:  # one more sample than the example: the batch dimension really is free
        more = tuple(torch.cat([x, x[:1]]) for x in inputs)
        with torch.no_grad():
            runs.append((more, _outputs(model(*more))))
    worst = 0.0
    for batch_inputs, wanted in runs:
        batch = int(batch_inputs[0].shape[0]) if batch_inputs[0].dim() else 1
        extra = batch_inputs is not inputs
        hint = ("; the batch dimension may not be free in this model: export with a fixed batch size "
                "(dynamic_batch=False, --static-batch)." if extra else ".")

        def mismatch(text: str, name: str = "", diff: float = float("inf")) -> OnnxMismatchError:
            return OnnxMismatchError(f"{text}{hint}", str(path), name, diff, batch)

        try:
            got = session.run(None, _feeds(session, batch_inputs))
        except PrunekitError:
            raise
        except Exception as exc:  # onnxruntime's own error types
            raise mismatch(f"ONNX Runtime could not run '{path}' with batch size {batch}: "
                           f"{_first_line(exc)}") from None
        if len(got) != len(wanted):
            raise mismatch(f"'{path}' has {len(got)} outputs, but the PyTorch model returns {len(wanted)} tensors")
        for (name, want), have in zip(wanted, got):
            have, want = torch.from_numpy(have), want.detach().cpu()
            if have.shape != want.shape:
                raise mismatch(f"ONNX output '{name}' has shape {list(have.shape)}, PyTorch's {list(want.shape)} "
                               f"(batch size {batch}); the file is kept at '{path}' for inspection", name)
            diff = _max_abs_diff(have, want)
            if not torch.isclose(have.to(want.dtype), want, rtol=rtol, atol=atol, equal_nan=True).all():
                raise mismatch(f"ONNX Runtime's output '{name}' differs from PyTorch's by up to {diff:.3g} at batch "
                               f"size {batch} (allowed: {atol:g} + {rtol:g} x |PyTorch's|); the file is kept at "
                               f"'{path}' for inspection", name, diff)
            worst = max(worst, diff)
    return worst


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    if not (a.is_floating_point() or b.is_floating_point()):
        return float((a.long() - b.long()).abs().max())
    diff = (a.double() - b.double()).abs()
    both_nan = torch.isnan(a.double()) & torch.isnan(b.double())
    return float(torch.where(both_nan, torch.zeros_like(diff), diff).max())
