"""End-to-end invariants of the streaming driver on tiny random checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import held_out_perplexity, interrupted_then_resumed, layer_bytes, materialised_layer, run, run_files
from transformers import AutoConfig, AutoModelForCausalLM

from distill_lr import cli
from distill_lr.checkpoint import compressed, files, reader
from distill_lr.checkpoint.layout import MANIFEST_NAME, layer_file
from distill_lr.factorize import factorize_layer_
from distill_lr.layerwise import capture_inputs, run_layer
from distill_lr.modeling.lowrank import LowRankLinear
from distill_lr.moments import Moments
from distill_lr.stats import collect_stats
from distill_lr.testing import save_tiny


def test_full_rank_svd_reproduces_the_decoder_layer(tiny_llama: Path) -> None:
    model, layers, layer = materialised_layer(tiny_llama)
    ids = torch.randint(3, 200, (2, 16))
    hidden, kwargs = capture_inputs(model, layers, ids)
    dense = run_layer(layer, hidden, kwargs[0], 2)
    full = {n: min(m.in_features, m.out_features) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    factorize_layer_(layer, full, "svd", {})
    assert torch.allclose(run_layer(layer, hidden, kwargs[0], 2), dense, atol=1e-5, rtol=1e-4)


def test_moments_are_recorded_on_each_linears_smaller_side_and_shared(tiny_llama: Path) -> None:
    """Inputs, or outputs ``W x`` where there are fewer (k/v and down here); linears that read one tensor share one set."""
    model, layers, layer = materialised_layer(tiny_llama)
    ids = torch.randint(3, 200, (6, 16))
    hidden, kwargs = capture_inputs(model, layers, ids)
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    outputs = {n for n, m in linears.items() if m.out_features < m.in_features}
    assert outputs == {"self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"}
    own = {n: Moments.empty(m.out_features if n in outputs else m.in_features) for n, m in linears.items()}
    hooks = [m.register_forward_hook(lambda _m, args, y, n=n: own[n].update(y if n in outputs else args[0])) for n, m in linears.items()]
    run_layer(layer, hidden, kwargs[0], 4)
    for hook in hooks:
        hook.remove()
    stats, _ = collect_stats(layer, list(linears), hidden, kwargs[0], batch_size=4)
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert len({id(s) for s in stats.values()}) == len(linears) - 1
    for name, expected in own.items():
        assert stats[name].of_outputs == (name in outputs)
        assert stats[name].count == expected.count == ids.numel()
        assert torch.allclose(stats[name].sum_xxT, expected.sum_xxT)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_architectures_compress_load_and_generate(tmp_path: Path, corpus: Path, kind: str) -> None:
    model_dir = save_tiny(tmp_path / kind, kind)
    tokenizer = save_tiny(tmp_path / "tok", "llama")  # the tiny word tokenizer, loaded as such
    report = run(model_dir, corpus, tmp_path / "out", tokenizer=tokenizer)
    out = Path(report.output)
    assert 0.28 < report.params.removed_fraction < 0.32
    loaded = compressed.load_compressed(out)
    ids = torch.randint(3, 200, (1, 8))
    assert loaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 12)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(remote(ids).logits, loaded(ids).logits)


def test_saved_then_loaded_equals_streamed_student(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    """The perplexity the driver computed from its in-memory student equals the reloaded model's."""
    report = run(tiny_llama, corpus, tmp_path / "out", save_dtype="float32")
    loaded = compressed.load_compressed(report.output)
    assert held_out_perplexity(loaded, tiny_llama, corpus) == pytest.approx(report.perplexity.compressed, rel=1e-4)
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert held_out_perplexity(dense, tiny_llama, corpus) == pytest.approx(report.perplexity.dense, rel=1e-4)


def test_dense_export_matches_low_rank_model(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    report = run(tiny_llama, corpus, tmp_path / "out", export_dense=True, save_dtype="float32")
    dense = AutoModelForCausalLM.from_pretrained(report.dense_export).eval()
    low = compressed.load_compressed(report.output)
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, low(ids).logits, atol=1e-4)
    assert "distill_lr" not in json.loads((Path(report.dense_export) / "config.json").read_text())


def test_pairs_near_break_even_multiplied_out_at_load_compute_the_same(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    """``dense_above`` (and the remote code's ``distill_lr_dense_above``) turns the pairs keeping at least that share of their
    weight into their dense product: only those, and the model computes the same."""
    report = run(tiny_llama, corpus, tmp_path / "out", save_dtype="float32", method="whiten", **{"ranks.target": 0.3})
    low = compressed.load_compressed(report.output)
    pairs = {n: m for n, m in low.named_modules() if isinstance(m, LowRankLinear)}
    kept = {n: m.rank * (m.in_features + m.out_features) / (m.in_features * m.out_features) for n, m in pairs.items()}
    above = sorted(kept.values())[len(kept) // 2]  # half of them, or so
    mixed = compressed.load_compressed(report.output, dense_above=above)
    remote = AutoModelForCausalLM.from_pretrained(report.output, trust_remote_code=True, distill_lr_dense_above=above)
    for model in (mixed, remote):
        left = {n for n, m in model.named_modules() if type(m).__name__ == "LowRankLinear"}  # the remote code's own class
        assert left == {n for n, k in kept.items() if k < above} and len(left) < len(pairs)
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        assert torch.allclose(mixed(ids).logits, low(ids).logits, atol=1e-4)
        assert torch.allclose(remote(ids).logits, low(ids).logits, atol=1e-4)


def test_sharded_and_single_file_inputs_give_identical_files(tmp_path: Path, corpus: Path) -> None:
    sharded = save_tiny(tmp_path / "sharded", shard_size="60KB")
    single = save_tiny(tmp_path / "single", shard_size=None)
    assert len(list(sharded.glob("*.safetensors"))) > 1 and len(list(single.glob("*.safetensors"))) == 1
    a = run(sharded, corpus, tmp_path / "a")
    b = run(single, corpus, tmp_path / "b")
    assert layer_bytes(Path(a.output)) == layer_bytes(Path(b.output))


@pytest.mark.parametrize(
    ("kind", "method", "teacher_cache"),
    [("llama", "whiten", False), ("llama", "distill", False), ("llama", "distill", True), ("mixtral", "distill", False)],
)
def test_resumed_run_equals_unbroken_run(tmp_path: Path, corpus: Path, kind: str, method: str, teacher_cache: bool, monkeypatch) -> None:
    model = save_tiny(tmp_path / kind, kind)
    unbroken = run(model, corpus, tmp_path / "unbroken", method=method)
    extra = {"teacher_cache": str(tmp_path / "teacher")} if teacher_cache else {}
    resumed = interrupted_then_resumed(monkeypatch, model, corpus, tmp_path / "resumed", method=method, **extra)
    assert [r.resumed for r in resumed.layers] == [True, True, False]
    assert run_files(tmp_path / "unbroken") == run_files(tmp_path / "resumed")
    assert resumed.perplexity == unbroken.perplexity
    if teacher_cache:  # the two finished layers' outputs were stored before the crash and read back
        assert resumed.teacher_cache["files_read"] == 4


def test_activation_aware_inits_beat_svd(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    errs = {
        m: run(tiny_llama, corpus, tmp_path / m, method=m, **{"ranks.target": 0.5}).layers[0].err_teacher_input
        for m in ("svd", "pca", "whiten")
    }
    assert errs["whiten"] < errs["svd"] and errs["pca"] < errs["svd"]


def test_distillation_improves_on_its_init(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    extra = {"ranks.target": 0.5, "init": "svd", "train.epochs": 4, "train.lr": 3e-2, "data.num_sequences": 32}
    trained = run(tiny_llama, corpus, tmp_path / "d", method="distill", **extra)
    for layer in trained.layers:
        assert layer.train["best_holdout"] < layer.train["init_holdout"]


def test_a_failed_layer_write_stops_the_run_and_is_never_marked_done(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    real = files.save_tensors_atomic

    def disk_full_at_layer_1(tensors, path, metadata=None):
        if path.name == layer_file(1):
            raise OSError("No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(files, "save_tensors_atomic", disk_full_at_layer_1)
    with pytest.raises(OSError, match="No space left"):
        run(tiny_llama, corpus, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert list(manifest["layers"]) == ["0"] and not manifest["complete"]
    assert not (tmp_path / "out" / layer_file(1)).exists()


def test_reading_ahead_reads_each_layer_once_and_changes_nothing(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    reads = []
    real = reader.CheckpointReader.read_state

    def counted(self, expected, device="cpu"):
        reads.append(next(iter(expected)).split(".")[2])  # model.layers.<i>.…
        return real(self, expected, device)

    monkeypatch.setattr(reader.CheckpointReader, "read_state", counted)
    uniform = {"ranks.allocation": "uniform"}  # the loss-aware pre-pass reads each layer twice more, before the loop
    ahead = run(tiny_llama, corpus, tmp_path / "ahead", method="distill", **uniform)
    assert sorted(reads, key=int) == [str(i) for i in range(len(ahead.layers))]
    run(tiny_llama, corpus, tmp_path / "plain", method="distill", read_ahead=False, **uniform)
    assert layer_bytes(tmp_path / "ahead") == layer_bytes(tmp_path / "plain")


REMOTE_LOAD = """
import sys
sys.modules["distill_lr"] = None  # not importable: only the folder's own files may serve the load
import torch
from transformers import AutoConfig, AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_remote_code_loads_with_the_folders_files_only(tmp_path: Path, corpus: Path) -> None:
    """A copy of the compressed folder, elsewhere, in a Python where distill_lr cannot be imported."""
    report = run(save_tiny(tmp_path / "mixtral", "mixtral"), corpus, tmp_path / "out", method="distill")
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(report.output, copy)
    ids = torch.randint(3, 200, (1, 12))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(copy), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    with torch.no_grad():
        expected = compressed.load_compressed(report.output)(input_ids=ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_without_remote_code_a_compressed_folder_does_not_load(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    """Not as a dense model with random projections: transformers' own request for trust_remote_code."""
    out = Path(run(tiny_llama, corpus, tmp_path / "out").output)
    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="trust_remote_code"):
            load(out)
    assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)).__name__ == "LlamaConfig"


def test_a_methods_stages_run_after_the_layers_and_before_the_folder_is_complete(
    tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch
) -> None:
    from distill_lr import methods
    from distill_lr.methods.base import Factorize, Method, RunStage

    seen = []

    class Look(RunStage):
        name = "look"

        def run(self, run) -> None:
            seen.append((sorted(p.name for p in run.out.glob("model-layer-*")), (run.out / "config.json").exists()))

    monkeypatch.setitem(
        methods.REGISTRY, "svd-and-look", lambda cfg: Method("svd-and-look", (Factorize("svd"),), {"method": "svd"}, (Look(),))
    )
    report = run(tiny_llama, corpus, tmp_path / "out", method="svd-and-look")
    assert seen == [([f"model-layer-0000{i}.safetensors" for i in range(3)], False)]
    assert (Path(report.output) / "config.json").exists()


# A tiny seeded run's numbers, as this code computed them (float32, one thread, the suite's settings). A change that
# moves them is a change of results: say so in the commit, and store the new values only after checking why they moved.
# rel 1e-3 on the errors and losses lets summation order vary across CPUs and torch versions; a method change moves
# them by far more (whiten and distill differ by 4% in layer 0's error). Perplexity of a random model is near the
# vocabulary size for every method, so it is pinned tighter.
PINNED = {
    "whiten": {"err": [0.0634659, 0.0836697, 0.0947939], "holdout": None, "ppl": 253.90317},
    "distill": {"err": [0.0607237, 0.0819726, 0.0934842], "holdout": [0.3149058, 0.6309968, 0.6314649], "ppl": 253.83211},
}


@pytest.mark.parametrize("method", sorted(PINNED))
def test_a_tiny_seeded_run_gives_its_stored_numbers(tmp_path: Path, tiny_llama: Path, corpus: Path, method: str) -> None:
    report = run(tiny_llama, corpus, tmp_path / "out", method=method)
    pinned = PINNED[method]
    assert [layer.err_student_input for layer in report.layers] == pytest.approx(pinned["err"], rel=1e-3)
    if pinned["holdout"] is not None:
        assert [layer.train["best_holdout"] for layer in report.layers] == pytest.approx(pinned["holdout"], rel=1e-3)
    assert report.perplexity.dense == pytest.approx(253.73759, rel=2e-5)
    assert report.perplexity.compressed == pytest.approx(pinned["ppl"], rel=2e-5)


def test_the_run_picture_is_drawn_the_same_by_a_resumed_run_and_redrawn_from_report_json(
    tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch
) -> None:
    pytest.importorskip("matplotlib")
    run(tiny_llama, corpus, tmp_path / "whole", method="distill", plot="true")
    interrupted_then_resumed(monkeypatch, tiny_llama, corpus, tmp_path / "resumed", method="distill", plot="true")
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "whole") and "report.png" in run_files(tmp_path / "whole")
    picture = (tmp_path / "whole" / "report.png").read_bytes()
    (tmp_path / "whole" / "report.png").unlink()
    assert cli.main(["plot", str(tmp_path / "whole")]) == 0 and (tmp_path / "whole" / "report.png").read_bytes() == picture
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2
