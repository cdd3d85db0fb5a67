"""`prunekit sparsify`: the files it writes, what it prints, and bad input refused before any work."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

import prunekit
from prunekit.cli import main
from prunekit.zoo import small_cnn

BUILDER = ["-b", "prunekit.zoo:small_cnn", "-k", '{"width": 4}', "-i", "1,1,16,16"]


def batches(n: int = 4, seed: int = 0):
    """Classification batches a 4-wide small CNN can learn from: the class is the bright quadrant."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 4, (16,), generator=g)
        x = torch.rand(16, 1, 16, 16, generator=g) * 0.2
        for i, c in enumerate(y.tolist()):
            r, q = divmod(c, 2)
            x[i, 0, r * 8:(r + 1) * 8, q * 8:(q + 1) * 8] += 0.8
        out.append((x, y))
    return out


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "cnn.pt"
    torch.save(small_cnn(width=4).state_dict(), weights)
    config = tmp_path / "sparse.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train": {"factory": "tests.test_cli_sparse:batches"},
                 "val": {"factory": "tests.test_cli_sparse:batches", "kwargs": {"n": 2, "seed": 1}}},
        "sparsity": {"density": 0.2, "iterations": 20, "refresh_every": 5}}))
    return weights, config


def test_sparsify_writes_an_ordinary_sparse_model_and_its_report(setup, tmp_path):
    weights, config = setup
    out = tmp_path / "out"
    result = run("sparsify", weights, "-c", config, *BUILDER, "-q", "-o", out)
    assert result.exit_code == 0, result.output
    assert "density 0.2000" in result.stdout and "no FLOPs are saved" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt", "sparsity.json", "sparsity.md"]
    state = torch.load(out / "model.pt", weights_only=True)
    model = small_cnn(width=4)
    model.load_state_dict(state)  # the user's class, an ordinary state dict
    for name in ("features.0.weight", "features.4.weight", "features.8.weight", "fc1.weight", "fc2.weight"):
        w = state[name]
        assert torch.count_nonzero(w).item() == round(0.2 * w.numel()), name  # density D exactly, per tensor
    report = json.loads((out / "sparsity.json").read_text())
    assert report["overall"]["density"] == pytest.approx(0.2, abs=1e-3)
    assert report["parameters"]["nonzero"] == sum(int(torch.count_nonzero(v)) for k, v in state.items()
                                                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert report["bytes"]["model_compressed"] < report["bytes"]["model_dense"]
    assert "metric" in report and report["settings"]["exploration_steps"] == 15  # 3/4 of 20
    text = (out / "sparsity.md").read_text()
    assert "Compute is dense with masks" in text and "| fc1.weight |" in text
    assert prunekit.load_pruned(out) is not None  # a prunekit manifest: report and load_pruned read it


@pytest.mark.slow  # two runs of the command
def test_remove_dead_filters_is_exact_and_loads(setup, tmp_path):
    weights, config = setup
    # density 0.05 keeps 2 of the first conv's 36 weights: at least two of its 4 filters end all zero
    common = ["sparsify", weights, "-c", config, *BUILDER, "--density", "0.05", "--iterations", "10", "-q"]
    kept = run(*common, "-o", tmp_path / "kept")
    cut = run(*common, "--remove-dead-filters", "-o", tmp_path / "cut")
    assert kept.exit_code == 0 and cut.exit_code == 0, kept.output + cut.output
    dead = json.loads((tmp_path / "cut" / "sparsity.json").read_text())["dead_filters"]
    assert dead["zero"] >= 2 and dead["removed"] == dead["removable"] <= dead["zero"]
    assert "--remove-dead-filters" in kept.stdout and f"removed {dead['removed']}" in cut.stdout
    full = small_cnn(width=4)
    full.load_state_dict(torch.load(tmp_path / "kept" / "model.pt", weights_only=True))
    smaller = prunekit.load_pruned(tmp_path / "cut")  # the manifest gives the cut widths
    widths = sum(m.weight.shape[0] for m in smaller.modules() if isinstance(m, torch.nn.Conv2d))
    assert widths == 4 + 8 + 16 - sum(v for k, v in _removed(dead).items() if k.startswith("features"))
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(smaller(x), full.eval()(x), atol=1e-5)  # exactly the same function


def _removed(dead: dict) -> dict:
    return {name: len(idx) for name, idx in dead["channels"].items()}


def test_magnitude_from_flags_alone(setup, tmp_path):
    weights, config = setup
    out = tmp_path / "out"
    result = run("sparsify", weights, "-c", config, *BUILDER, "--sparse-method", "magnitude", "--density", "0.1",
                 "-q", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sparsity.json").read_text())
    assert report["method"] == "magnitude" and report["settings"]["scope"] == "global"
    assert report["overall"]["nonzero"] == round(0.1 * report["overall"]["numel"])


@pytest.mark.parametrize("extra, words", [
    (["--density", "1.5"], "--density must be a density in (0, 1]"),
    (["--density", "0.2", "--backward-density", "0.1"], "at least sparsity.density"),
    (["--sparse-method", "rigl"], "'topkast' or 'magnitude'"),
])
def test_bad_values_are_one_sentence_and_write_nothing(setup, tmp_path, extra, words):
    weights, config = setup
    out = tmp_path / "out"
    result = run("sparsify", weights, "-c", config, *BUILDER, *extra, "-o", out)
    assert result.exit_code == 2 and words in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_missing_training_data_and_taken_output_are_refused(setup, tmp_path):
    weights, _ = setup
    result = run("sparsify", weights, *BUILDER, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "data.train" in result.stderr and not (tmp_path / "out").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    weights, config = setup
    result = run("sparsify", weights, "-c", config, *BUILDER, "-o", taken)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_a_layer_that_matches_nothing_is_refused(setup, tmp_path):
    weights, config = setup
    raw = yaml.safe_load(config.read_text())
    raw["sparsity"]["exclude"] = ["head"]
    config.write_text(yaml.safe_dump(raw))
    result = run("sparsify", weights, "-c", config, *BUILDER, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "'head'" in result.stderr and not (tmp_path / "out").exists()


def test_help_has_examples():
    result = run("sparsify", "--help")
    assert result.exit_code == 0 and "Examples:" in result.output and "--remove-dead-filters" in result.output


@pytest.mark.slow  # a prune, then sparse training
def test_prune_then_fine_tune_sparsely(setup, tmp_path):
    """Structured pruning first, then the delivered model's kept weights trained sparse."""
    weights, config = setup
    raw = yaml.safe_load(config.read_text())
    raw.update({"importance": {"method": "l1"}, "targets": {"flops": 0.6}, "schedule": {"steps": 1}})
    raw["sparsity"] = {"density": 0.25, "iterations": 10, "refresh_every": 3}
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    result = run("prune", weights, "-c", config, *BUILDER, "-q", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Sparse (topkast): density 0.2" in result.stdout and "compute is dense" in result.stdout
    model = prunekit.load_pruned(out)
    assert model.features[4].out_channels < 8  # structured pruning cut filters
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.count_nonzero(m.weight).item() == round(0.25 * m.weight.numel())
    assert "Compute is dense with masks" in (out / "sparsity.md").read_text()
    report = json.loads((out / "sparsity.json").read_text())
    assert report["overall"]["density"] == pytest.approx(0.25, abs=1e-3)


@pytest.mark.slow  # a prune, then sparse training
def test_a_pruned_run_directory_is_trained_sparse(setup, tmp_path):
    """`prunekit sparsify RUN_DIR`: the pruned model, its builder and shape from the manifest."""
    weights, config = setup
    pruned = tmp_path / "pruned"
    done = run("prune", weights, *BUILDER, "--flops", "0.6", "--method", "l1", "--steps", "1", "-q", "-o", pruned)
    assert done.exit_code == 0, done.output
    out = tmp_path / "sparse"
    result = run("sparsify", pruned, "-c", config, "-q", "-o", out)  # no --builder, no --input-shape
    assert result.exit_code == 0, result.output
    model = prunekit.load_pruned(out)  # the manifest records the cuts from the builder's widths
    assert model.features[4].out_channels == prunekit.load_pruned(pruned).features[4].out_channels < 8
    w = model.fc1.weight
    assert torch.count_nonzero(w).item() == round(0.2 * w.numel())
