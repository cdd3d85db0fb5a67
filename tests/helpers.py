"""Exactness checks shared by the channel-graph and surgery tests.

The guarantee under test (DESIGN.md): removing a unit whose producers output
exact zeros leaves the model's output unchanged, and the pruned model's
weights equal the kept slices of the original's.

``zero_units`` makes units carry exact zeros by zeroing everything that
*produces* a channel's value (producer output rows, biases and per-channel
holders such as BatchNorm, GroupNorm, depthwise convs and PReLU), never the
input positions of the consumers. ``assert_exact`` then checks that cutting
the zeroed units out changes nothing.
"""

from __future__ import annotations

import copy
import math
import signal
from contextlib import contextmanager
from typing import Any, Iterable

import numpy as np
import torch
from torch import fx, nn

from prunekit.ops import layer_spec, spec_for
from prunekit.surgery import apply_removal

__all__ = [
    "as_tuple",
    "assert_attributes_consistent",
    "assert_exact",
    "assert_same_structure",
    "assert_close_nested",
    "assert_train_mode_runs",
    "interrupt_scoring",
    "output_shapes",
    "pick_units",
    "randomize_norms",
    "tensor_leaves",
    "time_limit",
    "zero_roles",
    "zero_units",
]

def interrupt_scoring(monkeypatch, at: int):
    """Make the pruning loop's ``at``-th scoring raise KeyboardInterrupt, as Ctrl-C would in step ``at``;
    returns the real scorer, to put back before resuming."""
    import prunekit.loop as loop

    real, calls = loop.score_units, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "score_units", interrupting)
    return real


@contextmanager
def time_limit(seconds: int, what: str):
    """Raise TimeoutError in a step that runs past ``seconds`` (SIGALRM); a no-op without it or for 0."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"{what} ran past {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def as_tuple(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    return tuple(inputs)


def _arg(node: fx.Node, index: int, keyword: str, default=None):
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(keyword, default)


def _attr_name(value) -> str | None:
    return str(value.target) if isinstance(value, fx.Node) and value.op == "get_attr" else None


def zero_roles(model: nn.Module, graph) -> dict[tuple[str, int], bool]:
    """For every sliced ``(tensor, dim)`` of ``graph.slices``: True when it produces the channel's value.

    Read from prunekit's op table (``OpSpec.carries``): producer output dims,
    biases and per-channel holder tensors (norm weight/bias, depthwise and
    grouped conv weights, PReLU weight) are True; consumer input dims and
    running statistics are False. A sliced tensor whose role cannot be worked
    out fails loudly, so a new kind of slice never goes unchecked.
    """
    sliced: dict[str, set[int]] = {}
    for (tensor, dim) in graph.slices:
        sliced.setdefault(tensor, set()).add(dim)
    # functional uses first: tensor name -> (its op's record, its argument's keyword)
    functional: dict[str, tuple] = {}
    for g in graph.fx_graphs:
        for node in g.nodes:
            spec = spec_for(node, None) if node.op == "call_function" else None
            if spec is None or not spec.params:
                continue
            for keyword, index in spec.params.items():
                name = _attr_name(_arg(node, index, keyword))
                if name:
                    functional[name] = (spec, keyword)
    # per-channel tensors read element-wise (layer scale, FilterResponseNorm): they hold the channel's value
    per_channel = {str(n.target) for g in graph.fx_graphs for n in g.nodes if n.meta.get("prunekit_per_channel")}
    modules = dict(model.named_modules())
    roles: dict[tuple[str, int], bool] = {}
    for (tensor, dim) in graph.slices:
        owner, _, attr = tensor.rpartition(".")
        module = modules.get(owner)
        zero = None
        if tensor in per_channel:
            zero = True
        elif tensor in functional:
            spec, role = functional[tensor]
            zero = spec.carries(role, dim, None, sliced[tensor])
        elif module is not None and (spec := layer_spec(module)) is not None:
            zero = spec.carries(attr, dim, module, sliced[tensor])
        if zero is None:
            raise AssertionError(f"cannot tell what the slice {tensor!r} dim {dim} holds")
        roles[(tensor, dim)] = zero
    return roles


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def zero_units(model: nn.Module, graph, units: Iterable[int]) -> nn.Module:
    """Zero, in place, every tensor position that produces a value for one of ``units``."""
    units = np.asarray(list(units), dtype=np.int64)
    mask = np.zeros(graph.num_units, dtype=bool)
    mask[units] = True
    tensors = _named_tensors(model)
    with torch.no_grad():
        for (tensor, dim), zero in zero_roles(model, graph).items():
            if not zero:
                continue
            positions = np.flatnonzero(mask[graph.slices[(tensor, dim)]])
            if positions.size:
                t = tensors[tensor]
                t.index_fill_(dim, torch.as_tensor(positions, device=t.device), 0.0)
    return model


def pick_units(graph, fraction: float = 1 / 3, seed: int = 0) -> list[int]:
    """A seeded random ``fraction`` of the prunable units, skipping any that would empty a layer."""
    prunable = np.flatnonzero(~graph.pinned)
    if prunable.size == 0:
        return []
    rng = np.random.default_rng(seed)
    target = max(1, int(round(prunable.size * fraction)))
    arrays = [u for u in graph.widths.values() if u.size] + [u for u in graph.producers.values() if u.size]
    mask = np.zeros(graph.num_units, dtype=bool)
    chosen: list[int] = []
    for unit in rng.permutation(prunable):
        if len(chosen) == target:
            break
        mask[unit] = True
        if any(mask[u].all() for u in arrays):
            mask[unit] = False
            continue
        chosen.append(int(unit))
    return sorted(chosen)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, so that no layer is close to identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                for name in ("weight", "running_var"):
                    t = getattr(m, name, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                for name in ("bias", "running_mean"):
                    t = getattr(m, name, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model


# ---------------------------------------------------------------------------
# Comparing outputs


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def assert_same_structure(a, b, path: str = "output") -> None:
    """Same nesting (tensor/tuple/list/dict/namedtuple) and the same tensor shapes."""
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), f"{path}: {type(a).__name__} instead of a tensor"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
    elif isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in b:
            assert_same_structure(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(b, (tuple, list)):
        assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
        if _is_namedtuple(b):
            assert a._fields == b._fields
        assert len(a) == len(b), f"{path}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_structure(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def tensor_leaves(x) -> list[torch.Tensor]:
    """Every tensor in a nested output (tensors, dicts, tuples, lists), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensor_leaves(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensor_leaves(v)]
    return []


def assert_close_nested(actual, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same structure; every tensor within ``rtol`` and ``atol`` scaled by the tensor's magnitude."""
    assert_same_structure(actual, expected)
    for i, (a, e) in enumerate(zip(tensor_leaves(actual), tensor_leaves(expected))):
        assert torch.isfinite(e).all(), f"output {i} of the reference is not finite"
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale,
                                   msg=lambda m, i=i: f"output leaf {i} differs after removal: {m}")


def output_shapes(out) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: output_shapes(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(*[output_shapes(v) for v in out]) if _is_namedtuple(out) else \
            type(out)(output_shapes(v) for v in out)
    return out


# ---------------------------------------------------------------------------
# Module attributes


def assert_attributes_consistent(model: nn.Module) -> None:
    """Size attributes of every module agree with its tensors (a rebuilt module would load them)."""
    for name, m in model.named_modules():
        where = f"{type(m).__name__} '{name}'"
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, where
            if m.transposed:
                expected = (m.in_channels, m.out_channels // m.groups, *m.kernel_size)
            else:
                expected = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            assert tuple(w.shape) == expected, f"{where}: weight {tuple(w.shape)} != {expected}"
            if m.bias is not None:
                assert tuple(m.bias.shape) == (m.out_channels,), where
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), where
            if m.bias is not None:
                assert tuple(m.bias.shape) == (m.out_features,), where
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    assert tuple(t.shape) == (m.num_features,), where
        elif isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0, where
            for t in (m.weight, m.bias):
                if t is not None:
                    assert tuple(t.shape) == (m.num_channels,), where
        elif isinstance(m, nn.PReLU):
            assert m.weight.numel() == m.num_parameters, where
        elif isinstance(m, nn.LayerNorm):
            for t in (m.weight, m.bias):
                if t is not None:
                    assert tuple(t.shape) == tuple(m.normalized_shape), where


_WIDTH_ATTRS = {
    "in": ("in_channels", "in_features", "num_features", "num_channels", "num_parameters"),
    "out": ("out_channels", "out_features"),
}


def _assert_widths(pruned: nn.Module, graph, mask: np.ndarray) -> None:
    for (name, role), units in graph.widths.items():
        expected = int((~mask[units]).sum())
        m = pruned.get_submodule(name)
        attrs = [a for a in _WIDTH_ATTRS[role] if hasattr(m, a)]
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            continue
        assert attrs, f"{type(m).__name__} '{name}' has no {role}put width attribute"
        for a in attrs[:1]:
            assert getattr(m, a) == expected, f"'{name}'.{a} = {getattr(m, a)}, expected {expected}"


# ---------------------------------------------------------------------------
# The exactness check


def _forward(model: nn.Module, inputs: tuple):
    with torch.no_grad():
        return model(*inputs)


def assert_exact(model: nn.Module, graph, inputs, units: Iterable[int] | None = None, *,
                 rtol: float = 1e-5, atol: float = 1e-6, seed: int = 0) -> nn.Module:
    """Zero ``units`` (default: a seeded random third of the prunable ones) on a copy, cut them out,
    and check that nothing changed: outputs, kept weights, module attributes. Returns the pruned model."""
    inputs = as_tuple(inputs)
    units = pick_units(graph, seed=seed) if units is None else sorted(int(u) for u in units)
    assert units, "nothing to remove: the check would be vacuous"
    assert not graph.pinned[units].any(), "asked to remove pinned units"
    zeroed = zero_units(copy.deepcopy(model).eval(), graph, units)
    before = {k: v.clone() for k, v in zeroed.state_dict().items()}
    expected = _forward(zeroed, inputs)
    mask = graph.removal_mask(units)
    pruned = apply_removal(zeroed, graph, mask).eval()
    actual = _forward(pruned, inputs)
    assert_close_nested(actual, expected, rtol=rtol, atol=atol)

    # the zeroed model was only copied, never cut
    for k, v in zeroed.state_dict().items():
        assert torch.equal(v, before[k]), f"apply_removal modified its input's {k}"

    # parameters went down, by exactly the removed slices
    n_before = sum(p.numel() for p in zeroed.parameters())
    n_after = sum(p.numel() for p in pruned.parameters())
    assert n_after < n_before, f"parameter count did not drop ({n_before} -> {n_after})"

    # every kept weight equals its slice of the (zeroed) original
    sliced: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (tensor, dim), u in graph.slices.items():
        sliced.setdefault(tensor, []).append((dim, np.flatnonzero(~mask[u])))
    original = _named_tensors(model)  # untouched: zeroing only touched removed positions
    after = _named_tensors(pruned)
    assert set(original) == set(after), "the pruned model's tensors are not the original's"
    # a tensor under several names (a module registered twice, tied weights) is cut by any of them
    by_identity: dict[int, dict[int, np.ndarray]] = {}
    for name, tensor in original.items():
        by_identity.setdefault(id(tensor), {}).update(dict(sliced.get(name, [])))
    for name, tensor in original.items():
        want = tensor.detach()
        for dim, keep in sorted(by_identity[id(tensor)].items()):
            want = want.index_select(dim, torch.as_tensor(keep, dtype=torch.long))
        got = after[name].detach()
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert torch.equal(got, want), f"{name}: kept values differ from the original's slice"
        assert type(after[name]) is type(tensor), f"{name}: {type(after[name])} != {type(tensor)}"

    assert_attributes_consistent(pruned)
    _assert_widths(pruned, graph, mask)
    return pruned


def assert_train_mode_runs(original: nn.Module, pruned: nn.Module, inputs) -> None:
    """The pruned model runs in train mode and gives the original's train-mode output structure."""
    inputs = as_tuple(inputs)
    reference = copy.deepcopy(original).train()
    candidate = copy.deepcopy(pruned).train()
    expected = reference(*inputs)
    actual = candidate(*inputs)
    assert_same_structure(actual, expected)
    # and gradients flow through the smaller model
    loss = sum(t.float().sum() for t in tensor_leaves(actual) if t.is_floating_point())
    loss.backward()
    grads = [p.grad for p in candidate.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    assert all(math.isfinite(float(g.abs().sum())) for g in grads if g is not None)


class TinyConvNet(nn.Module):
    """conv -> bn -> torch.relu (a function) -> head (whose outputs are the model's: pinned)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))
