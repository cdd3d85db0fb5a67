"""``prunekit export``: RUN_DIR's pruned model as ONNX, checked against PyTorch and timed."""

from __future__ import annotations

import click


@click.command(short_help="Export RUN_DIR's pruned model to ONNX, checked and timed.", epilog="""\b
Examples:
  prunekit export out/run --onnx model.onnx
  prunekit export out/run --onnx model.onnx --threads 1 --static-batch
""")
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--onnx", "onnx_path", required=True, metavar="FILE", help="Where to write the ONNX model.")
@click.option("--input-shape", "-i", metavar="SHAPE",
              help="Shape of the example input, e.g. 1,3,256,256 (default: the one the run recorded).")
@click.option("--builder", "-b", metavar="PKG.MOD:FN",
              help="The builder the run's manifest names, when it is your own code (see prunekit --help).")
@click.option("--trusted", is_flag=True, help="Import whatever builder the run's manifest names.")
@click.option("--opset", type=click.IntRange(7), metavar="N", help="ONNX opset version (default: the exporter's).")
@click.option("--static-batch", is_flag=True, help="Fix the batch size to the example's (default: dynamic).")
@click.option("--no-check", is_flag=True, help="Do not compare ONNX Runtime's outputs with PyTorch's.")
@click.option("--threads", type=click.IntRange(1), metavar="N", help="Intra-op threads of both runtimes.")
@click.option("--repeats", type=click.IntRange(0), default=30, show_default=True, metavar="N",
              help="Timed runs of each runtime (0: no timing).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON only.")
def export(run_dir: str, onnx_path: str, input_shape: str | None, builder: str | None, trusted: bool,
           opset: int | None, static_batch: bool, no_check: bool, threads: int | None, repeats: int,
           as_json: bool) -> None:
    """Export the pruned model of RUN_DIR to ONNX, check that ONNX Runtime gives PyTorch's outputs,
    and time both.

    Exit code 1 when the outputs differ (the file is kept for inspection). Without onnxruntime
    the file is written and the check skipped (pip install prunekit[onnx]).
    """
    from . import reports as rep
    from .artifacts import load_pruned
    from .cli import check_writable, echo_json, make_console
    from .cli_models import export_inputs
    from .export import check_opset, export_onnx
    from .safety import quiet_stdout

    check_opset(opset, "--opset")
    found, inputs, example = export_inputs(run_dir, input_shape)
    check_writable(onnx_path, inputs)
    with quiet_stdout():  # what the user's builder or forward prints goes to stderr, not into --json
        model = load_pruned(found, builder=builder, trusted=trusted)
        result = export_onnx(model, example, onnx_path, check=not no_check, opset=opset,
                             dynamic_batch=not static_batch, threads=threads, repeats=repeats)
    if as_json:
        echo_json(result.as_dict())
    else:
        rep.render_export_report(result.as_dict(), make_console())
