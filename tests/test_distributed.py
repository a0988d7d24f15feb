"""Several processes on one compression (``distill_lr.distributed``): 2 processes with gloo on the CPU, launched by torchrun
as a user would, against the single-process run of the same settings."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import layer_bytes, overrides_for, run, run_files
from safetensors.torch import load_file

from distill_lr.checkpoint.layout import E2E_STATE
from distill_lr.distributed import Group, block_owners, interleaved, owners
from distill_lr.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]
COMPRESS, DYING = ROOT / "scripts" / "compress.py", Path(__file__).parent / "helpers" / "dying_compress.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(args: list[str], script: Path = COMPRESS, processes: int = 2, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**ENV, **env}, cwd=ROOT)


def accelerate_launch(args: list[str]) -> subprocess.CompletedProcess:
    """accelerate's launcher for several processes (``--multi_gpu``: torch's elastic launch; gloo where no GPU is visible)."""
    launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1", "--mixed_precision=no"]
    command = [sys.executable, "-m", *launcher, "--dynamo_backend=no", str(COMPRESS), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def max_relative_difference(a: Path, b: Path) -> float:
    """The largest difference of two runs' saved tensors, relative to each tensor's largest entry."""
    worst = 0.0
    for name in layer_bytes(a):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        for key in x:
            scale = x[key].float().abs().max().clamp_min(1e-12)
            worst = max(worst, float((x[key].float() - y[key].float()).abs().max() / scale))
    return worst


def test_shards_cover_every_sequence_once_and_differ_by_at_most_one() -> None:
    blocks = [Group(rank=r, world=3).shard(10) for r in range(3)]
    assert [list(range(10))[b] for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def test_owners_balance_the_cost_and_agree_everywhere() -> None:
    costs = {"a": 8.0, "b": 5.0, "c": 4.0, "d": 3.0, "e": 1.0}
    owner = owners(costs, 2)
    load = [sum(c for n, c in costs.items() if owner[n] == r) for r in range(2)]
    assert sorted(load) == [10.0, 11.0] and owners(dict(reversed(costs.items())), 2) == owner


def test_experts_are_owned_in_the_blocks_sequences_are_sharded_in_and_fixed_jobs_load_their_owner() -> None:
    assert block_owners(10, 3) == [r for r in range(3) for _ in range(10)[Group(rank=r, world=3).shard(10)]]
    assert block_owners(3, 4) == [1, 2, 3]  # fewer experts than processes: process 0 owns none
    costs = {"expert:0": 4.0, "expert:1": 4.0, "a": 5.0, "b": 3.0}
    owner = owners(costs, 2, fixed={"expert:0": 0, "expert:1": 0})
    assert owner == {"expert:0": 0, "expert:1": 0, "a": 1, "b": 1}  # process 0 already carries 8


def test_interleaved_order_is_a_permutation_with_an_even_share_of_each_block_per_batch() -> None:
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    assert torch.equal(interleaved(order, [0, 23], 4), order)  # one process: the order is the single-process one
    bounds = [0, 11, 23]
    out = interleaved(order, bounds, 4)
    assert sorted(out.tolist()) == list(range(23))
    first = [(out[i : i + 4] < 11).sum().item() for i in range(0, 20, 4)]
    assert first == [2] * 5  # both blocks still have sequences for the first 5 batches
    for r in range(2):  # each block's sequences keep their drawn order
        mine = [i for i in order.tolist() if bounds[r] <= i < bounds[r + 1]]
        assert [i for i in out.tolist() if bounds[r] <= i < bounds[r + 1]] == mine


# GPTQ of whiten's factors and dense linears, and of every expert of a dense-quantized Mixtral (int4, group 16)
GPTQ = {"quant.bits": 4, "quant.group_size": 16}


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("llama", {"method": "whiten"}),
        ("llama", {"method": "distill"}),
        ("mixtral", {"method": "distill"}),
        ("llama", {"method": "whiten", **GPTQ}),
        ("mixtral", {"method": "dense", **GPTQ}),
    ],
)
def test_two_processes_give_the_single_process_checkpoint(tmp_path: Path, corpus: Path, kind: str, settings: dict) -> None:
    model = save_tiny(tmp_path / kind, kind)
    method = settings["method"]
    single = run(model, corpus, tmp_path / "single", **settings)
    done = torchrun(overrides_for(model, corpus, tmp_path / "two", **settings))
    assert done.returncode == 0, done.stderr[-3000:]
    two = report(tmp_path / "two")
    # The moments (and GPTQ's Hessians) are float64 sums over each process's sequences, summed again: the same values in
    # another order. A training batch takes an even share of each process's block (``interleaved``), so the batches are
    # made of other sequences than a single process's: the trained factors differ a little, the held-out loss hardly at all.
    tolerance = 1e-2 if method == "distill" else 1e-6
    if "quant.bits" in settings:  # each weight's GPTQ ran in one process, from the summed Hessian: the same integers
        assert run_files(tmp_path / "two") == run_files(tmp_path / "single")
    assert max_relative_difference(tmp_path / "single", tmp_path / "two") <= tolerance
    assert two["perplexity"]["compressed"] == pytest.approx(single.perplexity.compressed, rel=tolerance)
    assert two["perplexity"]["dense"] == pytest.approx(single.perplexity.dense, rel=1e-6)
    phases = ([] if method == "dense" else ["init"]) + (["quant"] if "quant.bits" in settings else [])  # steps that talked
    assert all(layer["comm"][phase]["bytes"] > 0 for layer in two["layers"] for phase in phases)
    assert (method == "distill") == all(layer["comm"].get("train.step", {}).get("bytes", 0) > 0 for layer in two["layers"])
    assert set(run_files(tmp_path / "two")) == set(run_files(tmp_path / "single"))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])  # qwen2_moe: a shared expert, and a layer with a plain MLP
def test_expert_parallel_statistics_hold_a_share_of_the_moments_and_give_the_single_process_factors(
    tmp_path: Path, corpus: Path, kind: str
) -> None:
    """Each process records the moments of its own experts (2 of 4) over every process's tokens, sent to it per batch; 17
    sequences in batches of 4 make blocks of 8 and 9, so 2 and 3 batches: the process with fewer joins the last exchange
    with nothing to send."""
    model = save_tiny(tmp_path / kind, kind)
    settings = {"method": "whiten", "data.num_sequences": 17}
    single = run(model, corpus, tmp_path / "single", **settings)
    done = torchrun(overrides_for(model, corpus, tmp_path / "two", **settings))
    assert done.returncode == 0, done.stderr[-3000:]
    two = report(tmp_path / "two")
    # the same rows per expert, summed in another order (float64): the factors agree to float32 rounding
    assert max_relative_difference(tmp_path / "single", tmp_path / "two") <= 1e-5
    assert two["perplexity"]["compressed"] == pytest.approx(single.perplexity.compressed, rel=1e-5)
    routed = [(one.experts, both.get("experts")) for one, both in zip(single.layers, two["layers"], strict=True) if one.experts]
    assert routed and all(both is not None and both.keys() == one.keys() for one, both in routed)
    for one, both in routed:
        for path, entry in both.items():
            assert entry["tokens"] == one[path]["tokens"] and entry["starved"] == one[path]["starved"]
            assert entry["moment_bytes_per_process"] == one[path]["moment_bytes_per_process"] // 2 > 0


# The stage's whole training set in every step (12 of 16 sequences; the blocks are 8 and 8), so the step's batch is the
# same set of sequences whatever the order: each process runs its share and pads to the other's micro-batch count.
STAGE = {"method": "svd", "ranks.target": 0.5, "e2e.enabled": "true", "e2e.epochs": 3, "e2e.batch_size": 12, "e2e.micro_batch_size": 2}
STAGE |= {"e2e.holdout_fraction": 0.25, "e2e.lr": 3e-2, "e2e.evals_per_epoch": 1, "e2e.patience": 4}


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_two_processes_train_the_end_to_end_stage_sharded_as_one_does(tmp_path: Path, corpus: Path, kind: str) -> None:
    model = save_tiny(tmp_path / kind, kind, initializer_range=0.2)
    single = run(model, corpus, tmp_path / "single", **STAGE)
    done = torchrun(overrides_for(model, corpus, tmp_path / "two", **STAGE))
    assert done.returncode == 0, done.stderr[-3000:]
    two = report(tmp_path / "two")["e2e"]
    assert two["steps"] == single.e2e["steps"] == 3 and two["best_step"] == single.e2e["best_step"]
    assert single.e2e["best_holdout"] < single.e2e["init_holdout"]
    # the same sums in another order (FSDP averages the gradients, the processes' losses are summed): float rounding apart
    for a, b in zip(single.e2e["curve"], two["curve"], strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    assert max_relative_difference(tmp_path / "single", tmp_path / "two") <= 1e-4
    assert report(tmp_path / "two")["perplexity"]["compressed"] == pytest.approx(single.perplexity.compressed, rel=1e-4)
    assert set(run_files(tmp_path / "two")) == set(run_files(tmp_path / "single"))
    assert two["processes"] == 2 and two["layer_bytes_per_process"] <= 0.55 * single.e2e["layer_bytes_per_process"]


def test_a_process_killed_in_the_sharded_stage_resumes_to_the_unbroken_result(tmp_path: Path, corpus: Path) -> None:
    model = save_tiny(tmp_path / "llama", initializer_range=0.2)
    args = lambda out: overrides_for(model, corpus, out, **{**STAGE, "e2e.batch_size": 4})  # noqa: E731
    unbroken = torchrun(args(tmp_path / "unbroken"))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    killed = torchrun(args(tmp_path / "resumed"), script=DYING, DYING_RANK="1", DYING_E2E_SAVE="2")
    assert killed.returncode != 0 and (tmp_path / "resumed" / E2E_STATE).exists()
    shutil.copytree(tmp_path / "resumed", tmp_path / "alone")
    resumed = torchrun(args(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "end-to-end stage: resumed at step 6" in resumed.stderr
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "unbroken")
    # the state holds whole tensors: one process takes the stage on from the same step (its batches are drawn alike, but
    # made of other sequences than the two processes' interleaved ones: the last steps differ a little)
    alone = subprocess.run([sys.executable, str(COMPRESS), *args(tmp_path / "alone")], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert alone.returncode == 0 and "end-to-end stage: resumed at step 6" in alone.stderr, alone.stderr[-3000:]
    assert report(tmp_path / "alone")["e2e"]["curve"][:2] == report(tmp_path / "unbroken")["e2e"]["curve"][:2]
    assert max_relative_difference(tmp_path / "alone", tmp_path / "unbroken") <= 1e-2


def test_accelerate_launch_runs_the_same_processes(tmp_path: Path, corpus: Path) -> None:
    model = save_tiny(tmp_path / "llama")
    single = run(model, corpus, tmp_path / "single")
    done = accelerate_launch(overrides_for(model, corpus, tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(layer["comm"]["init"]["bytes"] > 0 for layer in report(tmp_path / "two")["layers"])  # two processes talked
    assert max_relative_difference(tmp_path / "single", tmp_path / "two") <= 1e-6
    assert report(tmp_path / "two")["perplexity"]["compressed"] == pytest.approx(single.perplexity.compressed, rel=1e-6)


def test_a_killed_process_stops_the_launch_and_the_run_resumes_to_the_unbroken_result(tmp_path: Path, corpus: Path) -> None:
    model = save_tiny(tmp_path / "llama")
    args = lambda out: overrides_for(model, corpus, out, method="distill")  # noqa: E731
    unbroken = torchrun(args(tmp_path / "unbroken"))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    killed = torchrun(args(tmp_path / "resumed"), script=DYING, DYING_RANK="1", DYING_LAYER="2")
    assert killed.returncode != 0 and not (tmp_path / "resumed" / "config.json").exists()
    resumed = torchrun(args(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert report(tmp_path / "resumed")["layers"][0]["resumed"]
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "unbroken")


@pytest.mark.parametrize("where", ["layer", "stage"])
def test_without_a_launcher_a_dead_peer_ends_the_other_process_in_one_line(tmp_path: Path, corpus: Path, where: str) -> None:
    """Processes started by hand (no torchrun to stop the others): the survivor's collective fails, it does not hang; in the
    sharded end-to-end stage the collective that fails is FSDP's own."""
    model = save_tiny(tmp_path / "llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DYING_RANK": "1"}
    env |= {"DYING_LAYER": "1"} if where == "layer" else {"DYING_E2E_SAVE": "1"}
    settings = {"method": "distill"} if where == "layer" else {**STAGE, "e2e.batch_size": 4}
    args = overrides_for(model, corpus, tmp_path / "out", dist_timeout_s=60, **settings)
    procs = [
        subprocess.Popen(
            [sys.executable, str(DYING), *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert procs[1].returncode == 9 and procs[0].returncode == 2
    last = errors[0].strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2: a collective failed") and "resumes" in last, errors[0][-2000:]
    assert "Traceback" not in errors[0]


def test_what_does_not_run_spread_is_refused_by_every_process_in_one_line(tmp_path: Path, corpus: Path) -> None:
    model = save_tiny(tmp_path / "llama")
    done = torchrun(overrides_for(model, corpus, tmp_path / "out", method="qlr", **{"quant.bits": 4}))
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and lines[0] == lines[1] and "do not run in several processes yet" in lines[0], done.stderr[-2000:]
