"""Several ranks (torchrun --nproc_per_node 2, gloo on CPU): calibration shards all-reduced give the masks of one
process on all the data; data-parallel sparse fine-tuning keeps masks, selections and optimizer state identical on every
rank, and the gradient averaging matches one process on the whole batch."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

import prunekit
from conftest import tiny, torch_threads
from prunekit.distributed import shard
from prunekit.errors import PrunekitError

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saved."""
    out = tmp_path_factory.mktemp("ranks")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    run = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
                            str(HERE / "distributed_worker.py"), str(out)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, stderr = run.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        run.terminate()  # torchrun stops its ranks on SIGTERM (each runs in a session of its own): none outlives this
        _, stderr = run.communicate(timeout=60)
        pytest.fail(f"the two ranks did not finish in 300 s; saved: {sorted(p.name for p in out.iterdir())}; "
                    f"torchrun's stderr ends:\n{stderr[-4000:]}")
    assert run.returncode == 0, stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("importance,allocator,budget,order", worker.PRUNE_CONFIGS)
def test_shards_give_the_masks_of_one_process_on_all_the_data(ranks, importance, allocator, budget, order):
    key = f"{importance}-{allocator}-{budget}-{order}"
    model = tiny("llama")
    with torch_threads(1):  # as the ranks run: float32 products round differently on other thread counts
        report = prunekit.prune(model, budget, importance=importance, allocator=allocator, order=order,
                                calibration=worker.all_calibration(), progress=False)
    expected = prunekit.masks(model)
    for got in ranks:
        assert got["prune"][key]["exact"]
        assert got["prune"][key]["calibration"] == report.calibration  # every rank's shard counted
        assert got["prune"][key]["masks"].keys() == expected.keys()
        for name, keep in expected.items():
            assert torch.equal(got["prune"][key]["masks"][name], keep), name


def test_disagreeing_or_refused_ranks_all_stop_before_any_change(ranks):
    for got in ranks:
        message, masked = got["errors"]["budget"]
        assert "ranks disagree on the plan" in message and masked == 0
        message, masked = got["errors"]["data"]
        assert "token ids (torch.long)" in message and masked == 0
    assert "rank 1 refused its input" in ranks[0]["errors"]["data"][0]


@pytest.mark.parametrize("method", ["lift", "lift-static", "spt", "s2ft", "ist-ddp"])
def test_data_parallel_tuning_keeps_every_rank_identical(ranks, method):
    first, second = (got["tune"][method] for got in ranks)
    for part in ("weights", "masks", "selections", "moments"):
        assert first[part].keys() == second[part].keys(), part
        for name in first[part]:
            assert torch.equal(first[part][name], second[part][name]), (part, name)
    assert first["moments"] and first["trainable"] == second["trainable"] > 0
    for name, keep in first["masks"].items():  # pruned entries still zero after the steps
        assert not first["weights"][f"{name}.weight"][~keep].any(), name
    if method.startswith(("lift", "spt")):
        assert first["selections"]  # sparse selections, with AdamW's moments for them
    if method == "ist-ddp":
        assert torch.equal(first["scores"], second["scores"]) and first["scores"].abs().sum() > 0


def test_averaged_gradients_match_one_process_on_the_whole_batch(ranks):
    """LIFT without refreshes: two ranks averaging their half-batch gradients take the steps one process takes on
    the full batch (equal token counts, so the mean of the halves' mean losses is the full batch's mean loss)."""
    model = worker.pruned_model()
    torch.manual_seed(1)
    tuned = prunekit.tuning.prepare(model, "lift", rank=2, filter_rank=2, interval=0)
    optimizer = tuned.optimizer(lr=1e-2)
    batches = worker.all_batches()
    for step in range(worker.STEPS):
        both = {k: torch.cat([batches[2 * step][k], batches[2 * step + 1][k]]) for k in batches[0]}
        model(**both).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    reference = worker.state_of(tuned, model, optimizer)
    got = ranks[0]["tune"]["lift-static"]
    for name in reference["selections"]:
        assert torch.equal(got["selections"][name], reference["selections"][name])
    for name, weight in reference["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, rtol=1e-5, atol=1e-6)


def test_shard_cuts_whole_batches_in_rank_order():
    windows = torch.arange(20 * 3).view(20, 3)
    parts = [shard(windows, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [8, 12] and torch.equal(torch.cat(parts), windows)  # batches of 8: 1 + 2 (ceil)
    assert [len(shard(windows[:6], r, 4)) for r in range(4)] == [1, 2, 1, 2]  # too few for whole batches: rows
    assert shard(list(range(5)), 1, 2) == [2, 3, 4]
    with pytest.raises(PrunekitError, match="cannot give each of 8 ranks one"):
        shard(windows[:4], 0, 8)


def test_distributed_needs_an_initialised_process_group():
    with pytest.raises(PrunekitError, match="init_process_group"):
        prunekit.prune(tiny("llama"), 0.5, importance="magnitude", distributed=True, progress=False)
