"""Several ranks, one run: two gloo processes (started as torchrun starts them) give what one process gives.

Each test starts tests/_distributed_worker.py twice with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), bounded in time, and compares what the ranks wrote with a run in this process.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import _distributed_worker as worker
import prunekit
from prunekit import rundir
from prunekit.data.batches import Batches
from prunekit.distributed import SINGLE, World, current, joined
from prunekit.importance import ipad, score_units

HERE = Path(__file__).parent
ROOT = HERE.parent


@pytest.fixture(autouse=True)
def one_thread():
    """This process's reference runs on one thread, as each rank's (two ranks share the machine's cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world: int = 2, timeout: float = 60) -> list[dict]:
    """Run ``scenario`` on ``world`` ranks; what each rank returned, in rank order."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("PRUNEKIT_TEST_STOP", None)
    procs = [subprocess.Popen([sys.executable, str(HERE / "_distributed_worker.py"), scenario, str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r in range(world):
        path = out / f"rank{r}.pt"
        assert path.is_file(), f"rank {r} wrote nothing:\n" + "\n".join(logs)
        payload = torch.load(path, weights_only=False)
        assert "crash" not in payload, f"rank {r} failed:\n{payload['crash']}"
        results.append(payload)
    return results


def assert_same_states(a: dict, b: dict, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def test_two_ranks_score_plan_and_prune_as_one_process(tmp_path):
    """IPAD on sharded calibration data, its sums all-reduced: scores within 1e-6, the same plans, the
    same pruned model bit for bit; rank 0 alone writes the run directory; a caller's group stays; a
    custom scorer without ``reduce`` and a validate function run on rank 0 and their results are shared."""
    ranks = launch("scores", tmp_path)
    model, example = worker.small_unet(), torch.rand(1, 1, worker.SIZE, worker.SIZE)
    graph = prunekit.build_graph(model, example)
    data = [x for x, _ in worker.seg_data(n=6)]
    raw, lone = ipad(model, graph, data), ipad(model, graph, data[:1])
    units = score_units(model, graph, "ipad", data)
    single = worker.summary(prunekit.prune(model, example, worker.seg_config(), progress=False))
    for rank in ranks:
        assert rank["raw"].keys() == raw.keys()
        for name in raw:
            torch.testing.assert_close(rank["raw"][name], raw[name], rtol=1e-6, atol=0.0)
            torch.testing.assert_close(rank["lone"][name], lone[name], rtol=1e-6, atol=0.0)  # an empty shard
        np.testing.assert_array_equal(rank["units"], units)
        assert rank["history"] == single["history"] and rank["modules"] == single["modules"]
        assert rank["best_step"] == single["best_step"] and rank["final"]["flops"] == single["final"]["flops"]
        assert_same_states(rank["state"], single["state"])
        assert rank["still_initialised"]
    assert single["history"][-1][4] is not None  # the validation metric, summed over both ranks' shards
    custom = worker.summary(prunekit.prune(model, example, worker.custom_config(), progress=False))
    for rank in ranks:  # a scorer without reduce and a validate function run on rank 0, on all the data
        assert rank["custom"]["history"] == custom["history"] and rank["custom"]["history"][0][4] == 1.0
        assert_same_states(rank["custom"]["state"], custom["state"])
    loaded = prunekit.load_pruned(tmp_path / "run", model=worker.small_unet())
    assert_same_states(loaded.state_dict(), single["state"])


def test_two_ranks_fine_tune_in_ddp_as_one_process_with_twice_the_batch(tmp_path):
    """Taylor scores, DDP fine-tuning after every cut and the final one, the reduced validation accuracy:
    two ranks reading batches of 2 in turn give one process's run on batches of 4 (within float rounding)."""
    ranks = launch("tune", tmp_path)
    single = worker.summary(prunekit.prune(worker.plain_cnn(), torch.rand(1, 1, worker.SIZE, worker.SIZE),
                                           worker.tune_config(train_batch=4), progress=False))
    for rank in ranks:
        assert [h[:4] for h in rank["history"]] == [h[:4] for h in single["history"]]
        assert rank["modules"] == single["modules"]
        np.testing.assert_allclose([h[4] for h in rank["history"]], [h[4] for h in single["history"]])
        assert_same_states(rank["state"], single["state"], rtol=1e-4, atol=1e-5)
    assert_same_states(ranks[0]["state"], ranks[1]["state"])  # bit for bit across the ranks


@pytest.mark.slow
def test_resume_two_ranks_on_one_and_one_on_two(tmp_path, monkeypatch):
    """A run interrupted on 2 ranks continues on 1, and one interrupted on 1 continues on 2; both end where
    an uninterrupted run ends."""
    example = torch.rand(1, 1, worker.SIZE, worker.SIZE)
    whole = worker.summary(prunekit.prune(worker.small_unet(), example, worker.stop_config(), progress=False))

    stopped = launch("stop", tmp_path / "a")
    assert stopped[0] == {"interrupted": "Interrupted", "resumable": True}
    assert stopped[1]["interrupted"] == "KeyboardInterrupt"
    assert rundir.inspect(tmp_path / "a" / "run") == "interrupted"
    resumed = worker.summary(prunekit.prune(worker.small_unet(), example, worker.stop_config(),
                                            run_dir=tmp_path / "a" / "run", resume=True, progress=False))
    assert resumed["history"] == whole["history"]
    assert_same_states(resumed["state"], whole["state"])

    monkeypatch.setenv("PRUNEKIT_TEST_STOP", "1")
    monkeypatch.setitem(worker.CALLS, "n", 0)
    with pytest.raises(rundir.Interrupted):
        prunekit.prune(worker.small_unet(), example, worker.stop_config(), run_dir=tmp_path / "b" / "run",
                       progress=False)
    monkeypatch.delenv("PRUNEKIT_TEST_STOP")
    for rank in launch("resume", tmp_path / "b"):
        assert rank["history"] == whole["history"]
        assert_same_states(rank["state"], whole["state"])


@pytest.mark.slow
def test_a_latency_target_is_measured_on_rank_0_and_planned_alike_everywhere(tmp_path):
    first, second = launch("latency", tmp_path)
    assert first["latency"] == second["latency"] and all(r is not None for r in first["latency"])
    assert first["history"] == second["history"] and first["modules"] == second["modules"]
    assert_same_states(first["state"], second["state"])


def test_ranks_that_disagree_stop_with_an_error(tmp_path):
    """Ranks given different weights refuse to prune (never a silent divergence)."""
    for rank in launch("disagree", tmp_path):
        assert rank["error"] is not None and "the ranks disagree on the model" in rank["error"]


# -- one process: every helper does nothing --------------------------------------------------


def test_single_world_helpers_are_identity():
    assert current() == SINGLE and not SINGLE.many and SINGLE.main
    with joined("cpu") as world:
        assert world == SINGLE
    sums, counts = {"a": torch.ones(2)}, {"a": 3}
    assert SINGLE.sum_over_ranks(sums, counts) == (sums, counts)
    assert SINGLE.from_main(lambda x: x + 1, 1) == 2 and SINGLE.gather(5) == [5]
    SINGLE.check_same("anything", object())


def test_shards_deal_every_batch_once():
    batches = Batches(lambda: iter(range(7)), length=7)
    shards = [list(batches.shard(r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [batches.shard(r, 3).length for r in range(3)] == [3, 2, 2]
    assert batches.shard(0, 1) is batches
    assert World(1, 2).shard([10, 11, 12]) == [11]


def test_a_rank_device_is_its_local_gpu():
    world = World(rank=1, size=2, local_rank=1)
    assert world.device(torch.device("cpu")) == torch.device("cpu")
    assert world.device(torch.device("cuda")) == torch.device("cuda", 1)
    with pytest.raises(prunekit.PrunekitError, match="names one GPU"):
        world.device(torch.device("cuda", 0))


# -- the command line under torchrun ------------------------------------------------------------


CLI_CONFIG = """\
model: {builder: "prunekit.zoo:unet", kwargs: {in_channels: 1, num_classes: 2, width: 4, depth: 2}}
input_shape: [1, 1, 16, 16]
targets: {flops: 0.5}
schedule: {steps: 3, finetune: {iterations: 1, function: "_distributed_worker:slow_tune"}}
data:
  calibration: {factory: "_distributed_worker:seg_data", kwargs: {n: 6}}
device: cpu
"""


def torchrun(tmp_path, *args, slow=False):
    (tmp_path / "cfg.yaml").write_text(CLI_CONFIG)
    if not (tmp_path / "m.pt").exists():
        torch.save(worker.small_unet().state_dict(), tmp_path / "m.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("PRUNEKIT_TEST_SLOW", None)
    if slow:
        env["PRUNEKIT_TEST_SLOW"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "prunekit", "prune", "m.pt", "-c", "cfg.yaml", "-q", *args]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _rank_pids(root: int) -> dict:
    """The rank of every process below ``root`` (torchrun's workers), read from their environment."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    below, ranks = {root}, {}
    for _ in range(4):
        below |= {pid for pid, parent in parents.items() if parent in below}
    for pid in below - {root}:
        with contextlib.suppress(OSError):
            rank = [e for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0][5:])] = pid
    return ranks


@pytest.mark.slow
def test_torchrun_prune_and_ctrl_c_on_one_rank_leaves_a_resumable_run(tmp_path):
    """``torchrun -m prunekit prune``: a complete run from 2 ranks; Ctrl-C on rank 1 alone during a step
    (torchrun then stops rank 0 with SIGTERM) leaves the run resumable, and --resume finishes it."""
    done = torchrun(tmp_path, "-o", "run")
    log = done.communicate(timeout=120)[0].decode()
    assert done.returncode == 0, log
    assert log.count("Best model: step") == 1, log  # the summary is rank 0's alone
    assert rundir.inspect(tmp_path / "run") == "complete"
    pruned = prunekit.load_pruned(tmp_path / "run")
    single = prunekit.prune(worker.small_unet(), torch.rand(1, 1, 16, 16), tmp_path / "cfg.yaml", progress=False)
    assert_same_states(pruned.state_dict(), single.model.state_dict())

    long = torchrun(tmp_path, "-o", "run2", slow=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "run2" / "checkpoint.pt").exists():
            time.sleep(0.2)
        os.kill(_rank_pids(long.pid)[1], signal.SIGINT)
        log = long.communicate(timeout=120)[0].decode()
    finally:
        if long.poll() is None:
            os.killpg(long.pid, signal.SIGKILL)
    assert long.returncode != 0
    assert "Interrupted" in log and "--resume" in log, log
    assert rundir.inspect(tmp_path / "run2") == "interrupted"
    resumed = torchrun(tmp_path, "-o", "run2", "--resume")
    log = resumed.communicate(timeout=120)[0].decode()
    assert resumed.returncode == 0, log
    assert_same_states(prunekit.load_pruned(tmp_path / "run2").state_dict(), single.model.state_dict())
