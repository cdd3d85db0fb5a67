"""Top-KAST, magnitude pruning and what they deliver (prunekit.sparse).

What must hold: A is exactly the top-D of each tensor by |w| (ties by position); gradients outside B
are zero after every step; the sets refresh on schedule and freeze after exploration; the
exploration loss matches a hand computation; the saved file has density D and loads as an ordinary
state dict; conv 1d/2d/3d, transposed convs and Linear all train; all-zero filters are removed
exactly through the channel graph.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.config import ConfigError, Sparsity, load_config
from prunekit.data.trainer import finetune
from prunekit.errors import PrunekitError
from prunekit.sparse import (COMPUTE_NOTE, TopKAST, dead_filters, keep_count, masks_for, remove_dead_filters,
                             select_tensors, sparsify, sparsity_report, top_mask)


class MixedNet(nn.Module):
    """Every kind of layer Top-KAST supports, in one small classifier on (N, 1, 8, 8)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)  # 16x16
        self.conv3d = nn.Conv3d(1, 3, 3, padding=1)
        self.conv1d = nn.Conv1d(4, 5, 3, padding=1)
        self.up1d = nn.ConvTranspose1d(5, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.up(x))[:, :, ::2, ::2]  # N, 4, 8, 8
        x = torch.relu(self.conv3d(x.unsqueeze(1))).mean(1)  # N, 4, 8, 8 via (N, 1, 4, 8, 8)
        x = x.mean(-1)  # N, 4, 8
        x = torch.relu(self.up1d(torch.relu(self.conv1d(x))))  # N, 4, 8
        return self.fc(x.flatten(1))


def _batches(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 1, 8, 8, generator=g)
        y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()  # 3 classes, learnable
        out.append((x, y))
    return out


def _expected_top(w: torch.Tensor, k: int) -> set[int]:
    """The k largest |w|, lower flat index first among equals: by hand, with Python's stable sort."""
    flat = w.detach().abs().reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return set(order[:k])


def _as_set(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist())


# --------------------------------------------------------------------------- the sets


def test_top_mask_ranks_by_magnitude_with_ties_by_position():
    w = torch.tensor([0.5, -3.0, 2.0, -2.0, 2.0, 0.0, -0.5, 1.0])
    assert _as_set(top_mask(w.abs(), 1)) == {1}  # -3 is the largest by magnitude, not the smallest
    assert _as_set(top_mask(w.abs(), 3)) == {1, 2, 3}  # three 2.0s tie: the two lowest indices
    assert _as_set(top_mask(w.abs(), 5)) == {1, 2, 3, 4, 7}
    assert _as_set(top_mask(w.abs(), 7)) == {0, 1, 2, 3, 4, 6, 7}  # +-0.5 tie: both in; 0.0 out
    for _ in range(3):  # the same answer every time
        assert torch.equal(top_mask(w.abs(), 3), top_mask(w.abs(), 3))


def test_forward_set_is_exactly_the_top_density_of_each_layer():
    torch.manual_seed(0)
    model = MixedNet()
    with torch.no_grad():  # ties on purpose: quantised weights
        for p in model.parameters():
            p.copy_((p * 8).round() / 8)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = TopKAST(model, select_tensors(model, 0.3, 0.5), refresh_every=10, exploration_steps=10)
    for t, a, b in zip(sparse.tensors, sparse.forward_masks(), sparse.backward_masks()):
        w = originals[t.name]
        assert _as_set(a) == _expected_top(w, keep_count(w.numel(), 0.3)), t.name
        assert _as_set(b) == _expected_top(w, keep_count(w.numel(), 0.5)), t.name
        assert int(a.sum()) == round(0.3 * w.numel()) and bool((b | ~a).all())  # exactly D; A inside B


def test_global_scope_ranks_all_tensors_together():
    a, b = torch.tensor([[4.0, 0.1], [0.2, 3.0]]), torch.tensor([1.0, -5.0, 0.3, 0.0])
    ma, mb = masks_for([a, b], [0.5, 0.5], "global")  # 4 of 8 by |w|: 4, 3 (a); 1, -5 (b)
    assert _as_set(ma) == {0, 3} and _as_set(mb) == {0, 1}


def test_biases_and_norm_layers_stay_dense_unless_asked():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(3, 2))
    assert [t.name for t in select_tensors(model, 0.1, 0.2)] == ["0.weight", "2.weight"]
    names = [t.name for t in select_tensors(model, 0.1, 0.2, include_bias=True, include_norm=True)]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert [t.name for t in select_tensors(model, 0.1, 0.2, exclude=["0"], layers={"2": 1.0})] == []
    chosen = select_tensors(model, 0.1, 0.3, layers={"2": 0.5})
    assert (chosen[1].density, chosen[1].backward) == (0.5, pytest.approx(0.7))  # the margin M carries over


# --------------------------------------------------------------------------- gradients and schedule


def test_gradients_outside_b_are_zero_after_every_step_and_b_minus_a_learns():
    torch.manual_seed(1)
    model = MixedNet()
    sparse = TopKAST(model, select_tensors(model, 0.2, 0.4), refresh_every=2, exploration_steps=6, penalty=1e-3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    outside_a_learned = False
    for step, (x, y) in enumerate(_batches(10, size=8)):
        loss = nn.functional.cross_entropy(model(x), y) + sparse.penalty()
        optimizer.zero_grad()
        loss.backward()
        for w, a, b in zip(sparse.originals(), sparse.forward_masks(), sparse.backward_masks()):
            assert w.grad is not None
            assert torch.count_nonzero(w.grad[~b]) == 0, f"step {step}: a gradient outside B"
            outside_a_learned |= bool(torch.count_nonzero(w.grad[b & ~a]) > 0)
        optimizer.step()
        sparse.step()
    assert outside_a_learned  # B \ A gets gradients while exploring: weights can enter A
    assert sparse.frozen and all(torch.equal(a, b) for a, b in zip(sparse.forward_masks(), sparse.backward_masks()))


def test_forward_uses_only_a():
    model = nn.Linear(4, 3, bias=False)
    sparse = TopKAST(model, select_tensors(model, 0.25, 0.5), exploration_steps=5)
    a = sparse.forward_masks()[0]
    assert torch.equal(model.weight, torch.where(a, sparse.originals()[0], torch.zeros(())))
    x = torch.randn(2, 4)
    assert torch.allclose(model(x), x @ (sparse.originals()[0] * a).T)


def _shuffle(sparse: TopKAST, seed: int) -> None:
    """New magnitudes (as training would bring), so a refresh must change the sets."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in sparse.originals():
            w.copy_(torch.randn(w.shape, generator=g))


def test_sets_refresh_on_schedule_then_freeze():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5))
    sparse = TopKAST(model, select_tensors(model, 0.1, 0.3), refresh_every=3, exploration_steps=7)
    history = []
    for step in range(1, 13):
        before = [m.clone() for m in sparse.forward_masks()]
        _shuffle(sparse, step)
        sparse.step()
        changed = any(not torch.equal(a, b) for a, b in zip(before, sparse.forward_masks()))
        history.append(changed)
        if changed:  # a refresh makes A the top of the current weights
            for w, a in zip(sparse.originals(), sparse.forward_masks()):
                assert _as_set(a) == _expected_top(w, keep_count(w.numel(), 0.1))
    # refreshes at steps 3 and 6, the last one at 7 (exploration ends), then frozen
    assert history == [False, False, True, False, False, True, True, False, False, False, False, False]
    assert sparse.frozen and sparse.refreshes == 4  # the first sets, 3, 6 and the freeze
    assert all(torch.equal(a, b) for a, b in zip(sparse.forward_masks(), sparse.backward_masks()))


def test_magnitude_masks_are_fixed_from_the_first_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5))
    sparse = TopKAST(model, select_tensors(model, 0.1, 0.1), scope="global", method="magnitude")
    first = [m.clone() for m in sparse.forward_masks()]
    for step in range(5):
        _shuffle(sparse, step)
        sparse.step()
    assert all(torch.equal(a, b) for a, b in zip(first, sparse.forward_masks()))
    assert sparse.penalty().item() == 0 and sum(int(m.sum()) for m in first) == keep_count(500, 0.1)


# --------------------------------------------------------------------------- the exploration loss


def test_penalty_matches_a_hand_computation():
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -2.0, 0.1], [1.5, -0.3, 1.0]]))
    # D = 2/6: A = {-2.0, 1.5}; D + M = 4/6: B = A + {1.0, 0.5}
    sparse = TopKAST(model, select_tensors(model, 2 / 6, 4 / 6), exploration_steps=10, penalty=0.01)
    hand = 0.01 * ((2.0 ** 2 + 1.5 ** 2) + (1.0 ** 2 + 0.5 ** 2) / (2 / 6))
    value = sparse.penalty()
    assert value.item() == pytest.approx(hand, rel=1e-6) and value.item() > 0
    value.backward()  # its gradient: 2 * 0.01 * w on A, 2 * 0.01 * w / D on B \ A, 0 elsewhere
    want = torch.tensor([[0.5 * 3, -2.0, 0.0], [1.5, 0.0, 1.0 * 3]]) * 0.02
    assert torch.allclose(sparse.originals()[0].grad, want)


def test_penalty_is_part_of_the_trainers_loss():
    torch.manual_seed(0)
    model, data = MixedNet(), _batches(2)
    plain = finetune(MixedNet().requires_grad_(True), data, 1, seed=0, show_progress=False, use_augment=False)
    torch.manual_seed(0)
    sparse_losses = finetune(MixedNet(), data, 1, seed=0, show_progress=False, use_augment=False,
                             sparsity=Sparsity(density=0.5, penalty=1.0, exploration_steps=1))
    assert sparse_losses[0] > plain[0] + 0.1  # the penalty, at scale 1, adds to the task loss
    del model


# --------------------------------------------------------------------------- training and the result


def test_every_layer_kind_trains_and_the_saved_file_has_density_d():
    torch.manual_seed(0)
    model = MixedNet()
    sparsity = Sparsity(density=0.25, backward_density=0.5, refresh_every=5, exploration_steps=30, iterations=40,
                        lr=1e-2)
    result = sparsify(model, _batches(8), sparsity, progress=False, augment=False)
    assert result.losses[-1] < result.losses[0]  # it learns
    assert not any(parametrize.is_parametrized(m) for m in result.model.modules())  # baked: ordinary layers
    buffer = io.BytesIO()
    torch.save(result.model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == set(MixedNet().state_dict())  # an ordinary state dict of the user's class
    fresh = MixedNet()
    fresh.load_state_dict(state)
    for name in ("conv", "up", "conv3d", "conv1d", "up1d", "fc"):
        w = state[f"{name}.weight"]
        assert torch.count_nonzero(w).item() == keep_count(w.numel(), 0.25), name  # exact zeros outside A
        assert torch.count_nonzero(state[f"{name}.bias"]) == state[f"{name}.bias"].numel()  # biases dense
    layers = {l["name"]: l for l in result.report["layers"]}
    assert layers["conv3d.weight"]["density"] == pytest.approx(0.25, abs=1 / 81)
    assert model.conv.weight.count_nonzero() == model.conv.weight.numel()  # the caller's model is untouched


def test_report_sizes_and_what_it_says():
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, :3] = 1.0
        model[0].weight[2, 5] = -2.0
    rep = sparsity_report(model, select_tensors(model, 0.125, 0.125))
    assert rep["overall"] == {"sparse_tensors": 1, "numel": 32, "nonzero": 4, "density": 0.125}
    b = rep["bytes"]
    assert b["sparse_tensors_dense"] == 32 * 4
    assert b["sparse_tensors_csr"] == 4 * 4 + 4 * 4 + 5 * 4  # values, int32 columns, 4 + 1 row pointers
    assert b["sparse_tensors_bitmask"] == 32 // 8 + 4 * 4
    assert b["model_compressed"] == b["sparse_tensors_bitmask"]
    assert rep["compute"] == COMPUTE_NOTE and "no FLOPs are saved" in COMPUTE_NOTE and rep["empty"] == []
    with torch.no_grad():
        model[0].weight.zero_()
    assert sparsity_report(model, select_tensors(model, 0.125, 0.125))["empty"] == ["0.weight"]
    assert "dense" in rep["backward"] and "masked" in rep["backward"]


def test_magnitude_through_the_trainer_keeps_global_density():
    torch.manual_seed(0)
    model = MixedNet()
    finetune(model, _batches(3), 5, show_progress=False, sparsity=Sparsity(method="magnitude", density=0.2))
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    total = sum(w.numel() for w in weights)
    assert sum(int(w.count_nonzero()) for w in weights) == keep_count(total, 0.2)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("raw, words", [
    ({"density": 0.2, "backward_density": 0.1}, "at least sparsity.density"),
    ({"density": 0.0}, "(0, 1]"),
    ({"density": 1.5}, "(0, 1]"),
    ({"refresh_every": 0}, ">= 1"),
    ({"layers": {"fc": 0}}, "sparsity.layers.fc"),
    ({"densty": 0.1}, "did you mean 'sparsity.density'"),
    ({"method": "rigl"}, "'topkast' or 'magnitude'"),
])
def test_bad_sparsity_configs_are_one_sentence(raw, words):
    with pytest.raises(ConfigError) as info:
        load_config({"sparsity": raw})
    assert words in str(info.value) and "\n" not in str(info.value)


def test_sparsity_defaults():
    s = load_config({"sparsity": {"density": 0.3}}).sparsity
    assert (s.method, s.backward_density, s.scope) == ("topkast", 0.6, "layer")
    s = load_config({"sparsity": {"method": "magnitude", "density": 0.3, "backward_density": 0.6}}).sparsity
    assert (s.backward_density, s.scope) == (0.3, "global")  # fixed masks: only the kept weights train
    assert load_config({}).sparsity is None


def test_a_layer_pattern_that_matches_nothing_is_refused_before_training():
    with pytest.raises(PrunekitError, match="sparsity.exclude.*'head'"):
        sparsify(MixedNet(), _batches(1), Sparsity(exclude=["head"], iterations=1), progress=False)


# --------------------------------------------------------------------------- dead filters


class ConvChain(nn.Module):
    def __init__(self, norm: bool):
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6) if norm else nn.Identity()
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.bn(self.a(x)))))
        return self.head(x.mean((2, 3)))


def test_all_zero_filters_are_removed_exactly():
    torch.manual_seed(0)
    model = ConvChain(norm=False).eval()
    with torch.no_grad():
        model.a.weight[[1, 4]] = 0
        model.a.bias[[1, 4]] = 0
        model.a.weight[2] = 0  # weights zero, bias not: a constant channel, not dead
        model.b.weight[3] = 0
        model.b.bias[3] = 0
    x = torch.randn(3, 2, 10, 10)
    smaller, found = remove_dead_filters(model, x[:1])
    assert found.zero == {"a": [1, 4], "b": [3]} and found.removable == {"a": [1, 4], "b": [3]}
    assert (smaller.a.out_channels, smaller.b.in_channels, smaller.b.out_channels, smaller.head.in_features) == (4, 4, 4, 4)
    with torch.no_grad():
        assert torch.allclose(smaller(x), model(x), atol=1e-6)
    assert model.a.out_channels == 6  # the caller's model is untouched


def test_a_zero_filter_under_batchnorm_with_a_positive_shift_is_kept():
    torch.manual_seed(0)
    model = ConvChain(norm=True).eval()
    with torch.no_grad():
        model.a.weight[[0, 3]] = 0
        model.a.bias[[0, 3]] = 0
        model.bn.bias[0] = 0.5  # BN(0) = 0.5 > 0: the channel feeds a constant on
        model.bn.bias[3] = -0.5  # BN(0) < 0: ReLU makes it zero, so it is dead
        model.bn.running_mean.zero_()
    found = dead_filters(model, torch.randn(1, 2, 10, 10))
    assert found.zero == {"a": [0, 3]} and found.removable == {"a": [3]}
    assert found.counts()["kept_reason"] and found.counts()["removable"] == 1


def test_linear_weight_gradient_is_computed_on_b_only_and_equals_the_masked_dense_one():
    torch.manual_seed(0)
    dense_path, sparse_path = nn.Sequential(nn.Linear(12, 7)), nn.Sequential(nn.Linear(12, 7))
    sparse_path.load_state_dict(dense_path.state_dict())
    tensors = select_tensors(dense_path, 0.2, 0.5)
    masked = TopKAST(dense_path, tensors, exploration_steps=5)  # "auto": a small layer computes dense
    sampled = TopKAST(sparse_path, tensors, exploration_steps=5, sparse_backward=True)
    assert masked.sparse_gradients() == [] and sampled.sparse_gradients() == ["0.weight"]
    x = torch.randn(3, 5, 12)  # extra leading dims, as a Linear takes them
    for model in (dense_path, sparse_path):
        (model(x) ** 2).sum().backward()
    with torch.no_grad():
        assert torch.allclose(dense_path(x), sparse_path(x))
    (w1, w2), b = (masked.originals()[0], sampled.originals()[0]), masked.backward_masks()[0]
    assert torch.allclose(w1.grad, w2.grad, atol=1e-5) and torch.count_nonzero(w2.grad[~b]) == 0
    assert torch.allclose(dense_path[0].bias.grad, sparse_path[0].bias.grad, atol=1e-5)
    sampled.bake()
    assert "forward" not in vars(sparse_path[0])  # the class's own forward again


def test_sparse_backward_auto_follows_the_measurement():
    from prunekit.sparse.linear import pays_off

    assert pays_off(0.1, 1024 * 4096) and pays_off(0.02, 1 << 20)
    assert not pays_off(0.2, 1024 * 4096) and not pays_off(0.05, 64 * 576)  # break-even / slower, measured
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 8))
    sparse = TopKAST(model, select_tensors(model, 0.05, 0.1), exploration_steps=2)
    assert sparse.sparse_gradients() == ["0.weight"]

