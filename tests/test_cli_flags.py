"""Fewer steps: `prune` without a YAML file, flags over a config, `init-config`, `report RUN_DIR`
with no other option, examples in every `--help`, and the checks made before anything is written."""

import dataclasses
import json
import re
import typing

import pytest
import torch
import yaml
from click.testing import CliRunner

import prunekit
from prunekit.cli import main
from prunekit.config import Config, load_config
from prunekit.configtools import NOTES, _field_comments, config_keys, config_template, with_overrides
from prunekit.zoo import unet

KWARGS = {"in_channels": 1, "num_classes": 2, "width": 4, "depth": 2}
FLAGS = ["-b", "prunekit.zoo:unet", "-k", json.dumps(KWARGS), "-i", "1,1,32,32"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "unet.pt"
    torch.save(unet(**KWARGS).state_dict(), path)
    return path


# --------------------------------------------------------------------------- prune without a config


def test_prune_without_a_config_file(weights, tmp_path):
    out = tmp_path / "run"
    result = run("prune", weights, *FLAGS, "--flops", "0.5", "--method", "l1", "--steps", "2", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert "targets met" in result.stdout and "prunekit report" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["importance"]["method"] == "l1" and report["ratios"]["flops"] <= 0.5
    assert report["steps_planned"] == 2
    # the run directory alone is enough to report on it
    again = run("report", out, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["totals"]["flops"] == report["final"]["flops"]
    graph = run("graph", out, "--json")
    assert graph.exit_code == 0, graph.output


def test_a_run_from_a_trusted_whole_module_is_reported_and_loaded_with_trust_only(tmp_path):
    torch.manual_seed(0)
    original = unet(**KWARGS).eval()
    torch.save(original, tmp_path / "whole.pt")
    out = tmp_path / "run"
    result = run("prune", tmp_path / "whole.pt", "-i", "1,1,32,32", "--trusted", "--flops", "0.6", "--method", "l1",
                 "--steps", "2", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert f"prunekit report {out} --trusted" in result.stdout and (out / "module.pt").is_file()
    refused = run("report", out)
    assert refused.exit_code == 2 and "--trusted" in refused.stderr
    with pytest.raises(prunekit.PrunekitError, match="--trusted"):
        prunekit.load_pruned(out)
    again = run("report", out, "--trusted", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["totals"]["flops"] == json.loads((out / "report.json").read_text())["final"]["flops"]
    pruned = prunekit.load_pruned(out, trusted=True)
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in pruned.state_dict().items())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert pruned(x).shape == original(x).shape


def test_flags_override_the_config(weights, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"builder": "prunekit.zoo:unet", "kwargs": KWARGS},
                                      "input_shape": [1, 1, 32, 32], "targets": {"flops": 0.8},
                                      "importance": {"method": "l2"}, "schedule": {"steps": 1}}))
    out = tmp_path / "run"
    result = run("prune", weights, "-c", config, "--flops", "0.6", "--method", "l1", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["targets"]["flops"] == 0.6 and report["importance"]["method"] == "l1"


def test_with_overrides_keeps_the_dependent_defaults():
    config = with_overrides(None, {"targets.latency": 0.5})
    assert config.targets.flops == 1.0 and config.targets.priority == "latency"  # as if written in the file
    source = {"targets": {"flops": 0.7}}
    assert with_overrides(source, {"targets.params": 0.9}).targets.flops == 0.7
    assert source == {"targets": {"flops": 0.7}}  # the caller's dict is not changed


def test_flags_keep_the_config_files_folder_for_its_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"calibration": {"images": "../images"}}}))
    monkeypatch.chdir(tmp_path / "configs")  # not where a path relative to the command would point
    plain, flagged = load_config(str(config)), with_overrides(str(config), {"schedule.steps": 2})
    assert flagged.schedule.steps == 2
    assert flagged.data.root == plain.data.root == str(tmp_path / "configs")
    assert flagged.data.calibration.images == "../images"


def test_data_flag_sets_the_calibration_folder(tmp_path):
    config = with_overrides(None, {"data.calibration": {"images": str(tmp_path)}})
    assert config.data.calibration.images == str(tmp_path)


@pytest.mark.parametrize("args, fragment", [
    (["--flops", "2"], "--flops must be a ratio in (0, 1], got 2.0."),
    (["--flops", "half"], "--flops must be a number, got 'half'."),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--method", "nope"], "importance method 'nope' is unknown"),
    (["-i", "1,0,32"], "Input shape '1,0,32' has a dimension that is not positive"),
])
def test_bad_flags_exit_2_before_anything_is_written(weights, tmp_path, args, fragment):
    out = tmp_path / "run"
    base = [a for a in FLAGS if a not in ("-i", "1,1,32,32")] if "-i" in args else FLAGS
    result = run("prune", weights, *base, "--method", "l1", *args, "-o", out, "-q")
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_builder_or_shape_says_which_flag(weights, tmp_path):
    result = run("prune", weights, "-i", "1,1,32,32", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "--builder" in result.stderr
    result = run("prune", weights, "-b", "prunekit.zoo:unet", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "--input-shape" in result.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- checks before any work


def test_a_limit_matching_no_layer_is_an_error_naming_the_nearest(weights, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"limits": {"layers": {"dec1.blocks.*": 0.0}}, "importance": {"method": "l1"}}))
    out = tmp_path / "run"
    result = run("prune", weights, *FLAGS, "-c", config, "-o", out, "-q")
    assert result.exit_code == 2, result.output
    assert "limits.layers 'dec1.blocks.*' matches no layer" in result.stderr
    assert "'dec1.block" in result.stderr  # the nearest names
    assert not out.exists()


def test_an_output_path_that_is_a_file_says_so(weights, tmp_path):
    target = tmp_path / "some_file.yaml"
    target.write_text("x: 1\n")
    result = run("prune", weights, *FLAGS, "--method", "l1", "-o", target, "-q")
    assert result.exit_code == 2
    assert "is a file" in result.stderr and "--force" not in result.stderr
    assert target.read_text() == "x: 1\n"


# --------------------------------------------------------------------------- init-config


def _dataclass_fields(cls=Config, prefix=""):
    """(key path, (dataclass, field name)) for every field of the config, nested ones included."""
    out = []
    for f in dataclasses.fields(cls):
        out.append((prefix + f.name, (cls, f.name)))
        tp = typing.get_type_hints(cls)[f.name]
        inner = tp if dataclasses.is_dataclass(tp) else next(
            (a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
        if inner is not None:
            out += _dataclass_fields(inner, prefix + f.name + ".")
    return out


def _dataclass_paths():
    return [path for path, _ in _dataclass_fields()]


def yaml_key_paths(text: str) -> set[str]:
    """Every key path written in a YAML text, commented-out keys included (by their indentation)."""
    paths, stack = set(), []
    for line in text.splitlines():
        match = re.match(r"^(\s*)(?:#(\s*))?([A-Za-z_][\w]*):(?:\s|$)", line)
        if not match or (line.lstrip().startswith("#") and match.group(2) is None):
            continue
        indent = len(match.group(1)) + (1 + len(match.group(2)) if match.group(2) is not None else 0)
        if line.lstrip().startswith("#"):
            indent -= 2  # '# ' stands where the key would be
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(3)))
        paths.add(".".join(name for _, name in stack))
    # flow mappings ({iterations: 60, lr: 0.0005}) hold keys too
    data = yaml.safe_load(text) or {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                paths.add(prefix + str(key))
                if not prefix.endswith("layers.") and str(key) not in ("kwargs", "layers"):
                    walk(value, prefix + str(key) + ".")

    walk(data, "")
    return paths


def test_config_keys_are_every_dataclass_field():
    assert config_keys() == _dataclass_paths()


def test_init_config_writes_every_key_and_the_file_loads(tmp_path):
    out = tmp_path / "prunekit.yaml"
    result = run("init-config", "-b", "prunekit.zoo:unet", "-k", json.dumps(KWARGS), "-i", "1,1,32,32",
                 "--flops", "0.4", "-o", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    missing = set(_dataclass_paths()) - yaml_key_paths(text)
    assert not missing, sorted(missing)
    config = load_config(out)
    assert config.model.builder == "prunekit.zoo:unet" and config.targets.flops == 0.4
    assert config.model.kwargs == KWARGS and config.input_shape == [1, 1, 32, 32]
    assert load_config(str(out)).targets.priority == "flops"
    # again: the file exists
    again = run("init-config", "-o", out)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert run("init-config", "-o", out, "--force").exit_code == 0


def test_init_config_uncommented_sections_load():
    """Every commented-out section, switched on as it stands, is a valid config."""
    text = config_template()
    on = re.sub(r"^(\s*)# (\s*\w+:.*)$", r"\1\2", text, flags=re.M)
    on = "\n".join(line for line in on.splitlines() if not re.match(r"^\s*(finetune|final_finetune|calibration|"
                                                                     r"train|val): null", line))
    config = load_config(yaml.safe_load(on))
    assert config.schedule.finetune is not None and config.data.train.images == "path/to/images"


def test_every_key_has_a_comment():
    text = config_template()
    for line in text.splitlines():
        if re.match(r"^\s*(#\s*)?\w+:", line) and not line.lstrip().startswith(("# prunekit", "#   ")):
            if re.match(r"^\s*# \w+:$", line):  # the heading of a commented-out section
                continue
            assert "  # " in line, f"no comment on {line.strip()!r}: add one beside the field in config.py or in NOTES"


def test_init_config_prints_to_stdout():
    result = run("init-config")
    assert result.exit_code == 0 and result.stdout.startswith("# prunekit pruning config")
    assert NOTES and _field_comments(Config)  # the comment sources are there


def test_the_method_help_and_the_template_name_every_built_in_method():
    from prunekit.importance import SCORERS

    help_text = " ".join(run("prune", "--help").stdout.split())
    for name in SCORERS:
        assert re.search(rf"\b{name}\b", help_text), name
        assert re.search(rf"\b{name}\b", NOTES["importance.method"]), name


def test_shipped_unet_config_documents_every_key():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "configs" / "unet.yaml").read_text()
    written = yaml_key_paths(text)
    # a field of a section written twice (data.train / data.val, final_finetune) is documented once
    documented = {owner for path, owner in _dataclass_fields() if path in written}
    missing = {path for path, owner in _dataclass_fields() if owner not in documented}
    assert not missing, f"configs/unet.yaml does not document {sorted(missing)}"
    load_config(yaml.safe_load(text))


# --------------------------------------------------------------------------- help


COMMANDS = sorted(main.commands)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_has_an_example_and_nothing_is_cut(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    body = result.stdout.split("Usage:", 1)[1].split("\n", 1)[1]
    assert "..." not in body.replace("layer2, ...", ""), body  # click cuts long short-help with "..."
    for line in result.stdout.split("Examples:", 1)[1].splitlines():
        assert len(line) <= 80, line


def test_report_run_dir_needs_nothing_else(weights, tmp_path):
    model = unet(**KWARGS).eval()
    prunekit.prune(model, torch.randn(1, 1, 32, 32), {"importance": {"method": "l1"}, "schedule": {"steps": 1}},
                   run_dir=tmp_path / "run", builder="prunekit.zoo:unet", builder_kwargs=KWARGS, progress=False)
    result = run("report", tmp_path / "run")
    assert result.exit_code == 0, result.output
    compared = run("report", weights, "-b", "prunekit.zoo:unet", "-k", json.dumps(KWARGS),
                   "--compare", tmp_path / "run", "--json")
    assert compared.exit_code == 0, compared.output  # the input shape comes from the compared run
    assert json.loads(compared.stdout)["totals"]["flops_ratio"] < 1
    none = run("report", weights, "-b", "prunekit.zoo:unet")
    assert none.exit_code == 2 and "--input-shape" in none.stderr


def test_a_model_that_does_not_fit_the_configs_data_leaves_no_run_directory(tmp_path):
    """The README's old example: a 3-channel U-Net with the 1-channel configs/unet.yaml."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "unet.yaml"
    with pytest.raises(prunekit.PrunekitError, match="cannot run the first batch"):
        prunekit.prune(unet(num_classes=2).eval(), torch.randn(1, 3, 64, 64), str(config),
                       run_dir=tmp_path / "out" / "run", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_resume_hint_repeats_the_flags():
    from prunekit.cli_config import FLAGS, Overrides, command_line

    given = Overrides(list(FLAGS), {"builder": "prunekit.zoo:unet", "kwargs": '{"num_classes": 2}',
                                    "input_shape": None, "flops": "0.5", "params": None, "latency": None,
                                    "method": None, "steps": None, "data": None, "trusted": True})
    line = command_line("prunekit", "prune", "m.pt", *given.argv(), "-o", "out", "--resume")
    assert line == "prunekit prune m.pt --builder prunekit.zoo:unet --kwargs '{\"num_classes\": 2}' --flops 0.5 " \
                   "--trusted -o out --resume"
    assert given.values()["model.trusted_pickle"] is True and given.flags["targets.flops"] == "--flops"
