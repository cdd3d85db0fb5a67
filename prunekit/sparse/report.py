"""What a sparse model is: density per tensor and overall, nonzeros, and its size stored sparse.

Sizes are of the tensors as stored, in two formats a reader can check by hand:

- CSR: each tensor viewed as (dim 0, everything else); nonzero values in the tensor's dtype,
  their column indices as int32, and one int32 row pointer per row plus one;
- bitmask: one bit per entry (rounded up to whole bytes) plus the nonzero values.

The compressed model size stores each sparse tensor in the smaller of the two and everything else
dense. None of this changes compute: the layers still run dense kernels on weights full of zeros.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .linear import has_sparse_gradient, pays_off
from .masks import SparseTensor

__all__ = ["sparsity_report", "render_sparsity_markdown", "summary_lines", "COMPUTE_NOTE", "BACKWARD_NOTE"]

COMPUTE_NOTE = ("Compute is dense with masks: the layers run the same dense kernels on weights that are mostly "
                "exact zeros, so no FLOPs are saved and latency is unchanged; the gain is in storage (a sparse "
                "format) and in what a sparse kernel or structured pruning can remove later.")
BACKWARD_NOTE = ("Weight gradients are computed dense by the kernels and then masked to set B (zero outside it), "
                 "except a large Linear weight with a small B (see the table's last column), whose gradient is "
                 "computed on B only (a sampled matmul, torch.sparse.sampled_addmm); input gradients are dense. "
                 "For magnitude pruning, and once Top-KAST's sets are frozen, B = A.")


def _csr_bytes(tensor: torch.Tensor, nonzero: int) -> int:
    rows = tensor.shape[0] if tensor.dim() > 1 else 1  # a vector is one row
    return nonzero * (tensor.element_size() + 4) + (rows + 1) * 4


def _bitmask_bytes(tensor: torch.Tensor, nonzero: int) -> int:
    return (tensor.numel() + 7) // 8 + nonzero * tensor.element_size()


def sparsity_report(model: nn.Module, tensors: Sequence[SparseTensor], method: str = "topkast") -> dict:
    """Plain data (JSON-ready) on the sparse ``tensors`` of ``model`` and the model as a whole."""
    modules = dict(model.named_modules())
    layers, sparse_ids = [], set()
    dense_b = csr_b = mask_b = best_b = 0
    for t in tensors:
        module = modules[t.module]
        w = getattr(module, t.param).detach()
        sparse_ids.add(id(getattr(modules[t.module], t.param)))
        nz = int(torch.count_nonzero(w))
        csr, bits = _csr_bytes(w, nz), _bitmask_bytes(w, nz)
        dense = w.numel() * w.element_size()
        dense_b, csr_b, mask_b, best_b = dense_b + dense, csr_b + csr, mask_b + bits, best_b + min(csr, bits, dense)
        layers.append({"name": t.name, "shape": list(w.shape), "numel": w.numel(), "nonzero": nz,
                       "density": nz / max(w.numel(), 1), "target_density": t.density,
                       "backward_density": t.backward, "dense_bytes": dense, "csr_bytes": csr, "bitmask_bytes": bits,
                       "gradient": "on B only" if has_sparse_gradient(module, t.param)
                       and pays_off(t.backward, w.numel()) else "dense, masked to B"})
    numel = sum(l["numel"] for l in layers)
    nonzero = sum(l["nonzero"] for l in layers)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    total_nz = sum(int(torch.count_nonzero(p.detach())) for p in params.values())
    state = model.state_dict(keep_vars=True)
    model_dense = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    rest = sum(v.numel() * v.element_size() for v in state.values()
               if isinstance(v, torch.Tensor) and id(v) not in sparse_ids)
    return {
        "method": method,
        "layers": layers,
        "overall": {"sparse_tensors": len(layers), "numel": numel, "nonzero": nonzero,
                    "density": nonzero / max(numel, 1)},
        "parameters": {"total": total, "nonzero": total_nz, "density": total_nz / max(total, 1)},
        # a tensor with no weight left cuts its layer off (a global ranking can do this to a layer)
        "empty": [l["name"] for l in layers if l["nonzero"] == 0],
        "bytes": {"sparse_tensors_dense": dense_b, "sparse_tensors_csr": csr_b, "sparse_tensors_bitmask": mask_b,
                  "model_dense": model_dense, "model_compressed": rest + best_b},
        "formats": "CSR: values + int32 column indices + int32 row pointers, each tensor as (dim 0, rest); "
                   "bitmask: 1 bit per entry + values; the compressed model stores each sparse tensor in the "
                   "smaller of the two and the rest dense.",
        "compute": COMPUTE_NOTE,
        "backward": BACKWARD_NOTE,
    }


def _size(n: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render_sparsity_markdown(report: dict) -> str:
    """The report as a readable Markdown page."""
    o, p, b = report["overall"], report["parameters"], report["bytes"]
    lines = [f"# Sparse model ({report['method']})", "",
             f"- Sparse tensors: {o['sparse_tensors']}, density {o['density']:.4f} "
             f"({o['nonzero']:,} of {o['numel']:,} weights nonzero)",
             f"- All parameters: {p['nonzero']:,} of {p['total']:,} nonzero (density {p['density']:.4f})",
             f"- Size of the sparse tensors: {_size(b['sparse_tensors_dense'])} dense, "
             f"{_size(b['sparse_tensors_csr'])} as CSR, {_size(b['sparse_tensors_bitmask'])} as bitmask + values",
             f"- Size of the model: {_size(b['model_dense'])} dense, {_size(b['model_compressed'])} compressed",
             f"- Formats: {report['formats']}",
             f"- **{report['compute']}**",
             f"- {report['backward']}"]
    if report.get("empty"):
        lines.append(f"- **Empty tensors (every weight zero, the layer passes only its bias): "
                     f"{', '.join(report['empty'])}**")
    if "metric" in report:
        m = report["metric"]
        lines.append(f"- Metric: {m['before']:.4f} before, {m['after']:.4f} after" if m.get("before") is not None
                     else f"- Metric after: {m['after']:.4f}")
    dead = report.get("dead_filters")
    if dead:
        lines.append(f"- Filters with all-zero weights: {dead['zero']}; removable exactly: {dead['removable']}"
                     + (f"; removed: {dead['removed']}" if dead.get("removed") is not None else
                        " (remove them with --remove-dead-filters)"))
        if dead.get("kept_reason"):
            lines.append(f"  ({dead['kept_reason']})")
    lines += ["", "| tensor | shape | nonzero | density | target | CSR | bitmask | dense | weight gradient |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for l in report["layers"]:
        shape = "x".join(map(str, l["shape"]))
        lines.append(f"| {l['name']} | {shape} | {l['nonzero']:,} | {l['density']:.4f} | {l['target_density']:.4f} | "
                     f"{_size(l['csr_bytes'])} | {_size(l['bitmask_bytes'])} | {_size(l['dense_bytes'])} | "
                     f"{l['gradient']} |")
    return "\n".join(lines) + "\n"


def summary_lines(report: dict) -> list[str]:
    """What ``prunekit sparsify`` prints when it is done."""
    o, p, b = report["overall"], report["parameters"], report["bytes"]
    lines = [f"Sparse ({report['method']}): density {o['density']:.4f} over {o['sparse_tensors']} weight tensors, "
             f"{p['nonzero']:,} of {p['total']:,} parameters nonzero.",
             f"Size: {b['model_dense']:,} bytes dense, {b['model_compressed']:,} bytes stored sparse."]
    if "metric" in report:
        m = report["metric"]
        lines.append(f"Metric: {m['before']:.4f} before, {m['after']:.4f} after sparse training"
                     + (f", {m['after_removal']:.4f} after removing dead filters" if "after_removal" in m else "")
                     + ".")
    dead = report.get("dead_filters") or {}
    if dead.get("zero"):
        done = f"removed {dead['removed']}" if dead.get("removed") is not None else \
            "pass --remove-dead-filters to cut them"
        lines.append(f"Dead filters: {dead['zero']} all zero, {dead['removable']} removable exactly; {done}.")
    if report.get("empty"):
        lines.append(f"Empty tensors (every weight zero): {', '.join(report['empty'])}.")
    lines.append("Compute is dense with masks: no FLOPs are saved on dense kernels.")
    return lines

