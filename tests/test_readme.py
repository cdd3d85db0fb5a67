"""The README's examples run as written.

Every code block of README.md is fenced (```sh or ```python). The fast tests check that each
`prunekit` command in them parses (its command and options exist), that each `make` target exists
and that the Python compiles; the slow walk runs every block in README order in a fresh directory,
as a reader would: shell lines through bash (optional parts in [brackets] left out), Python in a
fresh interpreter.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks() -> list[tuple[str, str, int]]:
    """(language, text, line number) of every fenced block of the README."""
    found, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if match:
            start = i + 1
            i += 1
            while not lines[i].startswith("```"):
                i += 1
            found.append((match.group(1), "\n".join(lines[start:i]) + "\n", start + 1))
        i += 1
    return found


def commands(text: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments and [optional parts] left out."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        out.append(" ".join(re.sub(r"\[[^\]]*\]", "", line).split()))
    return out


def test_every_code_block_is_fenced_with_a_language():
    assert blocks(), "the README has no code blocks"
    assert {lang for lang, _, _ in blocks()} <= {"sh", "python", "yaml", "text"}  # text: output, not run
    inside, previous = False, ""
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
        elif not inside and previous == "" and line.startswith("    ") and line.strip():
            raise AssertionError(f"README.md:{number}: an indented code block; fence it with ```sh, ```python "
                                 "or ```yaml")
        previous = line.strip() if not inside else "x"


def test_every_yaml_block_is_a_valid_config():
    import yaml

    import prunekit

    for lang, text, line in blocks():
        if lang == "yaml":
            prunekit.load_config(yaml.safe_load(text))  # raises, naming the key, when one is wrong


def test_every_command_parses_and_every_make_target_exists():
    from prunekit.cli import main

    makefile = (ROOT / "Makefile").read_text()
    seen = set()
    for lang, text, line in blocks():
        if lang != "sh":
            continue
        for command in commands(text):
            words = shlex.split(command)
            if words[0] == "make":
                targets = [w for w in words[1:] if "=" not in w]
                for target in targets:
                    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"README.md:{line}: make {target}"
                continue
            if words[0] == "torchrun":  # torchrun's own options, then -m prunekit and a prunekit command
                words = ["prunekit", *words[words.index("prunekit") + 1:]]
            assert words[0] == "prunekit", f"README.md:{line}: {command!r} is not a prunekit, torchrun or make command"
            name, args = words[1], words[2:]
            assert name in main.commands, f"README.md:{line}: no command {name!r}"
            main.commands[name].make_context(name, list(args))  # unknown options and bad values fail here
            seen.add(name)
    assert {"prune", "report", "graph", "init-config"} <= seen


def test_python_blocks_compile():
    for lang, text, line in blocks():
        if lang == "python":
            compile(text, f"README.md:{line}", "exec")


# --------------------------------------------------------------------------- the walk


def _workspace(ws: Path) -> None:
    """What the README's examples read: the configs, a U-Net's weights (model.pt, and the demo's
    out/demo/unet.pt), a pruned and a whole pickled module, and a folder of images."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    import prunekit
    from prunekit.zoo import unet

    shutil.copytree(ROOT / "configs", ws / "configs")
    torch.manual_seed(0)
    model = unet(num_classes=2).eval()
    torch.save(model.state_dict(), ws / "model.pt")
    (ws / "out" / "demo").mkdir(parents=True)
    torch.save(unet(in_channels=1, num_classes=2, width=8, depth=3).state_dict(), ws / "out" / "demo" / "unet.pt")
    pruned = prunekit.remove_channels(model, torch.randn(1, 3, 64, 64), {"enc1.block.0": [0, 3]})
    torch.save(pruned, ws / "out" / "pruned_module.pt")
    torch.save(torchvision.models.resnet18().eval(), ws / "whole_model.pt")
    (ws / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(ws / "images" / f"{i}.png")
    (ws / "bin").mkdir()
    shim = ws / "bin" / "prunekit"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m prunekit \"$@\"\n")
    shim.chmod(0o755)


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    ws = tmp_path / "fresh"
    ws.mkdir()
    _workspace(ws)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{ws / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "COLUMNS": "100"}
    for lang, text, line in blocks():
        if lang == "python":
            done = subprocess.run([sys.executable, "-c", text], cwd=ws, env=env, capture_output=True, text=True,
                                  timeout=1500)
            assert done.returncode == 0, f"README.md:{line}:\n{done.stderr[-3000:]}"
            continue
        if lang != "sh":
            continue  # yaml (checked as configs above) and text (output) are not run
        for command in commands(text):
            if command.startswith("make "):
                continue  # the targets are checked above; `make demo` and the suites run on their own
            if command.startswith("torchrun "):
                continue  # several processes, GPUs, other machines: tests/test_distributed.py runs torchrun
            done = subprocess.run(["bash", "-c", command], cwd=ws, env=env, capture_output=True, text=True,
                                  timeout=1500)
            assert done.returncode == 0, f"README.md:{line}: {command}\n{done.stderr[-3000:]}"
    assert (ws / "out" / "quick" / "report.md").is_file() and (ws / "prunekit.yaml").is_file()
