"""Reports: one data schema (:mod:`.data`, plain dicts ready for JSON), drawn by renderers:
rich tables (:mod:`.console`, also an ONNX export's check and timings) and Graphviz text
(:mod:`.dot`); a prune run's report, markdown and plots are written by :mod:`.run`."""

from .console import (human, render_compare_report, render_export_report, render_graph_report, render_model_report,
                      render_tracing)
from .data import check_depth, compare_report, graph_report, latency_report, model_report, tracing_report
from .dot import to_dot

__all__ = ["check_depth", "compare_report", "graph_report", "human", "latency_report", "model_report",
           "render_compare_report", "render_export_report", "render_graph_report", "render_model_report",
           "render_tracing", "to_dot", "tracing_report"]
