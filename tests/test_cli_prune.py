"""`prunekit prune` end to end: outputs, refusals, exit codes, untouched inputs."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

import prunekit
from prunekit.cli import main
from prunekit.zoo import unet

KWARGS = {"in_channels": 1, "num_classes": 2, "width": 8, "depth": 3}


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "unet.pt"
    torch.save(unet(**KWARGS).state_dict(), weights)
    config = {
        "model": {"builder": "prunekit.zoo:unet", "kwargs": KWARGS},
        "input_shape": [1, 1, 32, 32],
        "targets": {"flops": 0.5},
        "importance": {"method": "l1"},
        "limits": {"layers": {"out": 0.0}},
        "schedule": {"steps": 2},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return weights, config_path, config


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_prune_writes_a_loadable_run(files, tmp_path):
    weights, config_path, _ = files
    before = weights.read_bytes()
    out = tmp_path / "run"
    result = run("prune", weights, "--config", config_path, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert "targets met" in result.output
    assert weights.read_bytes() == before
    model = prunekit.load_pruned(out)
    x = torch.rand(1, 1, 32, 32)
    original = unet(**KWARGS)
    original.load_state_dict(torch.load(weights, weights_only=True))
    assert prunekit.count_flops_params(model, x)["flops"] <= 0.5 * prunekit.count_flops_params(original, x)["flops"]
    report = json.loads((out / "report.json").read_text())
    assert report["targets_met"] and report["ratios"]["flops"] <= 0.5


def test_refuses_existing_run_dir_without_force(files, tmp_path):
    weights, config_path, _ = files
    out = tmp_path / "run"
    assert run("prune", weights, "--config", config_path, "-o", out, "-q").exit_code == 0
    stamp = (out / "model.pt").read_bytes()
    again = run("prune", weights, "--config", config_path, "-o", out, "-q")
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    assert (out / "model.pt").read_bytes() == stamp
    assert run("prune", weights, "--config", config_path, "-o", out, "-q", "--force").exit_code == 0


@pytest.mark.parametrize("change, fragment", [
    ({"targets": {"flops": 2.0}}, "'targets.flops' must be a ratio in (0, 1]"),
    ({"targets": {"flop": 0.5}}, "did you mean 'targets.flops'"),
    ({"model": {"builder": "prunekit.zoo:unett", "kwargs": KWARGS}}, "unett"),
    ({"input_shape": None}, "needs input_shape"),
    ({"importance": {"method": "nope"}}, "importance method 'nope' is unknown"),
    ({"data": {"calibration": {"images": "/no/such/folder"}}}, "does not exist"),
])
def test_bad_configs_exit_2_without_run_dir(files, tmp_path, change, fragment):
    weights, config_path, config = files
    config.update(change)
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = run("prune", weights, "--config", config_path, "-o", out, "-q")
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_model_file_and_missing_resume(files, tmp_path):
    weights, config_path, _ = files
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    result = run("prune", garbage, "--config", config_path, "-o", tmp_path / "run", "-q")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    result = run("prune", weights, "--config", config_path, "-o", tmp_path / "other", "--resume", "-q")
    assert result.exit_code == 2 and "cannot resume" in result.output


def test_unreachable_target_exits_2_with_best_model(files, tmp_path):
    weights, config_path, config = files
    config["targets"] = {"flops": 0.05}
    config["limits"] = {"default": 0.3}
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = run("prune", weights, "--config", config_path, "-o", out, "-q")
    assert result.exit_code == 2
    assert "limits stop pruning" in result.output
    assert (out / "model.pt").is_file()  # the best model it reached is kept


def test_report_reads_run_directories(files, tmp_path):
    weights, config_path, _ = files
    out = tmp_path / "run"
    assert run("prune", weights, "--config", config_path, "-o", out, "-q").exit_code == 0
    kwargs = json.dumps(KWARGS)
    compared = run("report", weights, "-i", "1,1,32,32", "-b", "prunekit.zoo:unet", "-k", kwargs,
                   "--compare", out, "--json")
    assert compared.exit_code == 0, compared.output
    data = json.loads(compared.output)
    assert data["totals"]["flops_ratio"] <= 0.5
    alone = run("report", out / "model.pt", "-i", "1,1,32,32", "--json")
    assert alone.exit_code == 0, alone.output
    assert json.loads(alone.output)["totals"]["flops"] == data["totals"]["after"]["flops"]
