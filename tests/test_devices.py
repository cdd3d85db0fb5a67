"""device: auto | cpu | cuda[:N]: resolved before any work, batches and the model moved where they run.

The moves are checked with the meta device, which every machine has; the CUDA run needs a GPU.
"""

from __future__ import annotations

import collections

import pytest
import torch
from click.testing import CliRunner

import prunekit
from prunekit.cli import main
from prunekit.data.devices import OnDevice, on_device, placed, resolve_device, to_device
from prunekit.zoo import small_cnn, unet

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_is_cuda_when_there_is_one_and_the_cpu_otherwise():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, says", [("tpu", "not a device"), ("mps", "not supported"), ("cuda:99", "cuda:99")])
def test_a_device_that_is_not_here_is_refused_in_one_sentence(name, says):
    if name == "cuda:99" and not torch.cuda.is_available():
        says = "no CUDA device"
    with pytest.raises(prunekit.PrunekitError, match=says):
        resolve_device(name)


def test_batches_are_moved_whole_tensors_tuples_lists_dicts_and_named_tuples():
    meta = torch.device("meta")
    Pair = collections.namedtuple("Pair", "x y")
    batch = (torch.zeros(2, 3), [torch.ones(1)], {"m": torch.zeros(1)}, Pair(torch.zeros(1), 3), "label")
    moved = to_device(batch, meta)
    assert moved[0].is_meta and moved[1][0].is_meta and moved[2]["m"].is_meta
    assert isinstance(moved[3], Pair) and moved[3].x.is_meta and moved[3].y == 3 and moved[4] == "label"
    source = [(torch.zeros(1, 1), torch.zeros(1))] * 3
    wrapped = OnDevice(source, meta)
    assert len(wrapped) == 3 and all(x.is_meta for x, _ in wrapped) and all(x.is_meta for x, _ in wrapped)
    assert not source[0][0].is_meta  # the source itself is unchanged
    assert on_device(source, torch.device("cpu")) is source and on_device(None, meta) is None


def test_the_cpu_leaves_the_model_where_it_is():
    model = small_cnn()
    with placed(model, torch.device("cpu")) as inside:
        assert inside is model


@no_cuda
def test_prune_refuses_cuda_before_any_work(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {builder: 'prunekit.zoo:small_cnn'}\ninput_shape: [1, 1, 28, 28]\n"
                      "importance: {method: l1}\ndevice: cuda\n")
    weights = tmp_path / "m.pt"
    torch.save(small_cnn().state_dict(), weights)
    result = CliRunner().invoke(main, ["prune", str(weights), "--config", str(config), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert not (tmp_path / "run").exists()


def segmentation_batches():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 2, (2, 32, 32), generator=generator))
            for _ in range(2)]


@needs_cuda
def test_a_run_on_cuda_fine_tunes_there_and_delivers_a_cpu_model():
    torch.manual_seed(0)
    factory = {"factory": f"{__name__}:segmentation_batches"}
    config = {"importance": {"method": "ipad"}, "device": "cuda", "data": {"calibration": factory, "train": factory},
              "schedule": {"steps": 2, "finetune": {"iterations": 3, "amp": True}}}
    result = prunekit.prune(unet(width=8, depth=2).eval(), torch.randn(2, 3, 32, 32), config, progress=False)
    assert result.targets_met
    assert all(p.device.type == "cpu" for p in result.model.parameters())


def test_amp_leaves_cpu_training_in_float32():
    import copy

    from prunekit.data.trainer import finetune

    torch.manual_seed(0)
    model = unet(width=4, depth=2)
    twin = copy.deepcopy(model)
    batches = segmentation_batches()
    finetune(model, batches, 3, seed=0, show_progress=False, amp=True)
    finetune(twin, batches, 3, seed=0, show_progress=False, amp=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
