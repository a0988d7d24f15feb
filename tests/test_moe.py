"""Mixture-of-experts models: on-disk expert formats, per-expert factors, routed statistics, starved experts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fails, layer_bytes, run
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from distill_lr import moe
from distill_lr.checkpoint import compressed
from distill_lr.checkpoint.layout import INDEX_NAME, layer_file
from distill_lr.checkpoint.reader import CheckpointReader, LayerLoader, build_skeleton, decoder_layers
from distill_lr.factorize import experts_from_weights, svd_factors
from distill_lr.modeling import lowrank
from distill_lr.modeling.lowrank import LowRankExperts, is_fused_experts
from distill_lr.precondition import factor_grams
from distill_lr.testing import save_tiny, tiny_config, word_tokenizer

KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def single_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def rewrite(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def save_fused(src: Path, dst: Path) -> Path:
    """The same model with its tensors under the fused module names (``mlp.experts.gate_up_proj``), as state_dict() has them."""
    shutil.copytree(src, dst)
    for path in dst.glob("model*.safetensors*"):
        path.unlink()
    rewrite(dst, AutoModelForCausalLM.from_pretrained(src).state_dict())
    return dst


@pytest.fixture
def tiny_mixtral(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "mixtral", "mixtral")


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_low_rank_experts_compute_what_the_fused_module_does(implementation: str) -> None:
    torch.manual_seed(0)
    config = tiny_config("mixtral", num_hidden_layers=1)
    config._experts_implementation = implementation
    block = AutoModelForCausalLM.from_config(config).model.layers[0].mlp
    hidden = torch.randn(37, 64)
    _, weights, index = block.gate(hidden)
    if implementation == "eager":  # the others take transformers' expert-parallel placeholder only under expert parallelism
        index[:5, 0] = 4  # the placeholder: no expert
    expected = block.experts(hidden, index, weights)
    low = LowRankExperts.from_experts(block.experts)
    torch.testing.assert_close(low(hidden, index, weights), expected, atol=1e-6, rtol=1e-5)
    assert low.token_counts(index).tolist() == [int((index == e).sum()) for e in range(4)]
    fused = LowRankExperts.fused_state(low.state_dict())
    assert torch.equal(fused["gate_up_proj"], block.experts.gate_up_proj) and torch.equal(fused["down_proj"], block.experts.down_proj)


def test_save_pretrained_writes_per_expert_tensors(tiny_mixtral: Path) -> None:
    """What the per-expert loading path is for: transformers 5 saves Mixtral in the original layout."""
    names = json.loads((tiny_mixtral / INDEX_NAME).read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert not any("gate_up_proj" in n for n in names)


def test_per_expert_and_fused_checkpoints_load_alike(tmp_path: Path, tiny_mixtral: Path, corpus: Path) -> None:
    fused = save_fused(tiny_mixtral, tmp_path / "fused")
    reference = AutoModelForCausalLM.from_pretrained(tiny_mixtral).model.layers
    for folder in (tiny_mixtral, fused):
        reader = CheckpointReader(folder)
        prefix, layers = decoder_layers(build_skeleton(reader.config))
        loader = LayerLoader(reader, layers, prefix)  # reading ahead: the expert merges run on the worker thread
        for i in range(len(layers)):
            state, expected = loader.load(i, "cpu", torch.float32).state_dict(), reference[i].state_dict()
            assert state.keys() == expected.keys()
            assert all(torch.equal(state[k], expected[k]) for k in expected)
        loader.close()
    run(tiny_mixtral, corpus, tmp_path / "a")
    run(fused, corpus, tmp_path / "b")
    assert layer_bytes(tmp_path / "a") == layer_bytes(tmp_path / "b")


@pytest.mark.parametrize(
    ("kind", "rules"),
    [
        ("mixtral", {}),
        ("qwen2_moe", {"layers.*.mlp.experts.*.down_proj": "skip"}),  # partly dense experts
        ("qwen3_moe", {"layers.*.mlp.experts.*.gate_proj": 8}),
    ],
)
def test_compress_load_generate_and_export(tmp_path: Path, corpus: Path, kind: str, rules: dict) -> None:
    model = save_tiny(tmp_path / kind, kind)
    overrides = {"ranks.rules": json.dumps(rules), "ranks.allocation": "uniform"}  # every free matrix low-rank
    report = run(model, corpus, tmp_path / "out", export_dense=True, save_dtype="float32", **overrides)
    out = Path(report.output)
    ranks = json.loads((out / "config.json").read_text())["distill_lr"]["ranks"]
    assert "model.layers.0.mlp.experts.up_proj" in ranks and not any(".experts.0." in n for n in ranks)
    assert ("model.layers.0.mlp.experts.down_proj" in ranks) == ("qwen2" not in kind)
    saved = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.up_proj.A" in saved and "model.layers.0.mlp.gate.weight" in saved  # the router stays dense
    loaded = compressed.load_compressed(out)
    assert isinstance(loaded.model.layers[0].mlp.experts, LowRankExperts)
    ids = torch.randint(3, 200, (2, 12))
    assert loaded.generate(ids[:1], max_new_tokens=4, do_sample=False).shape == (1, 16)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    dense = AutoModelForCausalLM.from_pretrained(report.dense_export).eval()
    assert is_fused_experts(dense.model.layers[0].mlp.experts)
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.equal(remote(ids).logits, logits)
        torch.testing.assert_close(dense(ids).logits, logits, atol=1e-4, rtol=1e-4)
    per_layer = report.layers[0].experts["mlp.experts"]
    assert sum(per_layer["tokens"]) == 16 * 32 * 2 and per_layer["starved"] == []  # every calibration token, top-2
    if kind == "qwen2_moe":  # a shared expert (a plain MLP) and the router's gate of it; layer 1 a plain MLP
        assert {"model.layers.0.mlp.shared_expert.down_proj", "model.layers.1.mlp.down_proj"} <= set(ranks)
        assert "model.layers.0.mlp.shared_expert_gate" not in ranks and report.layers[1].experts is None


def copies_of_one_mlp(dense_dir: Path, folder: Path, top_k: int) -> Path:
    """A Mixtral whose experts all equal the dense Mistral's MLP: whatever the routing, the same function."""
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    same = {"sliding_window": 16, "rms_norm_eps": dense.config.rms_norm_eps, "rope_parameters": dense.config.rope_parameters}
    torch.manual_seed(1)
    moe = AutoModelForCausalLM.from_config(tiny_config("mixtral", num_experts_per_tok=top_k, **same)).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])[None].repeat(4, 1, 1)
        state[f"model.layers.{i}.mlp.experts.down_proj"] = mlp.down_proj.weight[None].repeat(4, 1, 1)
        state[f"model.layers.{i}.mlp.gate.weight"] = moe.model.layers[i].mlp.gate.weight
    moe.load_state_dict(state, strict=True)
    moe.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    shutil.copyfile(dense_dir / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


@pytest.mark.parametrize(("method", "top_k"), [("svd", 2), ("whiten", 4)])
def test_experts_that_copy_one_mlp_compress_like_the_dense_model(tmp_path: Path, corpus: Path, method: str, top_k: int) -> None:
    """Per-expert factors of identical experts are the dense MLP's factors: same errors, same perplexity.

    whiten factors each expert with the statistics of its own tokens, which are all tokens only with top_k = E.
    """
    dense_dir = save_tiny(tmp_path / "mistral", "mistral")
    moe_dir = copies_of_one_mlp(dense_dir, tmp_path / "mixtral", top_k)
    uniform = {"ranks.allocation": "uniform"}  # the same ranks for both (loss-aware prices E expert copies differently)
    dense, moe = (run(d, corpus, tmp_path / f"out-{d.name}", method=method, **uniform) for d in (dense_dir, moe_dir))
    dense_ranks, moe_ranks = (json.loads((Path(r.output) / "config.json").read_text())["distill_lr"]["ranks"] for r in (dense, moe))
    assert moe_ranks == {n.replace(".mlp.", ".mlp.experts."): r for n, r in dense_ranks.items()}
    for a, b in zip(dense.layers, moe.layers, strict=True):
        assert a.err_teacher_input == pytest.approx(b.err_teacher_input, rel=1e-4, abs=1e-6)
        assert a.err_student_input == pytest.approx(b.err_student_input, rel=1e-4, abs=1e-6)
    assert moe.perplexity.dense == pytest.approx(dense.perplexity.dense, rel=1e-5)
    assert moe.perplexity.compressed == pytest.approx(dense.perplexity.compressed, rel=1e-5)


def starve(folder: Path, expert: int) -> Path:
    """Route no token to ``expert``: a large constant feature in the residual stream that its router row hates."""
    model = AutoModelForCausalLM.from_pretrained(folder)  # a single-file checkpoint: save_pretrained replaces it
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1  # five standard deviations of the random embeddings
        for layer in model.model.layers:
            layer.mlp.gate.weight[expert, 0] = -100.0
    model.save_pretrained(folder)
    return folder


def test_an_expert_without_tokens_keeps_its_svd_init(tmp_path: Path, corpus: Path) -> None:
    """Neither whiten nor training touches it: it gets the plain SVD of its weights."""
    model = starve(save_tiny(tmp_path / "m", "mixtral", shard_size=None), expert=3)
    with pytest.warns(UserWarning, match=r"experts \[3\] received fewer than 16 calibration tokens \(0\)"):
        report = run(model, corpus, tmp_path / "out", method="distill", init="whiten", save_dtype="float32")
    for layer in report.layers:
        assert layer.experts["mlp.experts"]["tokens"][3] == 0 and layer.experts["mlp.experts"]["starved"] == [3]
    rank = json.loads((Path(report.output) / "config.json").read_text())["distill_lr"]["ranks"]["model.layers.1.mlp.experts.down_proj"]
    A, B = svd_factors(AutoModelForCausalLM.from_pretrained(model).model.layers[1].mlp.experts.down_proj[3], rank)
    saved = load_file(Path(report.output) / layer_file(1))
    torch.testing.assert_close(saved["model.layers.1.mlp.experts.down_proj.A"][3], A)
    torch.testing.assert_close(saved["model.layers.1.mlp.experts.down_proj.B"][3], B)


def test_too_few_tokens_is_a_knob(tmp_path: Path, tiny_mixtral: Path, corpus: Path) -> None:
    with pytest.warns(UserWarning, match="lower ranks.min_expert_tokens"):
        report = run(tiny_mixtral, corpus, tmp_path / "out", method="svd", **{"ranks.min_expert_tokens": 1000})
    assert report.layers[0].experts["mlp.experts"]["starved"] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("drop", "rename"),
    [("model.layers.1.block_sparse_moe.experts.2.w3.weight", None), ("model.layers.1.block_sparse_moe.experts.2.w3.weight", "w3.weights")],
)
def test_missing_or_misnamed_expert_tensor(tmp_path: Path, corpus: Path, drop: str, rename: str | None) -> None:
    model = save_tiny(tmp_path / "m", "mixtral", shard_size=None)
    tensors = single_file(model)
    tensor = tensors.pop(drop)
    if rename:
        tensors[drop.replace("w3.weight", rename)] = tensor
    rewrite(model, tensors)
    fails(model, corpus, tmp_path / "out", f"has no tensor '{drop}' (expert 2 of 'model.layers.1.mlp.experts.gate_up_proj'")


def test_missing_fused_expert_tensor(tmp_path: Path, tiny_mixtral: Path, corpus: Path) -> None:
    fused = save_fused(tiny_mixtral, tmp_path / "fused")
    tensors = single_file(fused)
    del tensors["model.layers.2.mlp.experts.down_proj"]
    rewrite(fused, tensors)
    fails(fused, corpus, tmp_path / "out", "has no tensor 'model.layers.2.mlp.experts.down_proj'")


def test_rules_must_give_all_experts_of_a_layer_one_rank(tmp_path: Path, tiny_mixtral: Path, corpus: Path) -> None:
    rules = json.dumps({"layers.1.mlp.experts.*.up_proj": 8, "layers.1.mlp.experts.2.up_proj": "skip"})
    fails(tiny_mixtral, corpus, tmp_path / "out", "different up_proj ranks (expert 0: 8, expert 2: dense)", **{"ranks.rules": rules})


def routed_block(kind: str, ranks: dict[str, int]) -> tuple[torch.nn.Module, torch.Tensor]:
    """One MoE block of a tiny random model with its experts as ``LowRankExperts`` (``ranks`` per projection), and tokens."""
    torch.manual_seed(0)
    block = AutoModelForCausalLM.from_config(tiny_config(kind, num_hidden_layers=1)).model.layers[0].mlp
    low = LowRankExperts.from_experts(block.experts)
    for name, rank in ranks.items():
        setattr(low, name, experts_from_weights(getattr(low, name).weight, rank))
    block.experts = low
    return block, torch.randn(1, 53, low.hidden_dim)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_and_padded_experts_compute_the_same_outputs_and_gradients(kind: str, autocast: bool) -> None:
    """The grouped matmul path (sorted pairs, no padding, no host read) against the padded batched one, placeholder included."""
    block, hidden = routed_block(kind, {"gate_proj": 8, "down_proj": 16})  # widths of whole 16-byte units: grouped_fits
    experts, tokens = block.experts, hidden[0]
    assert experts.grouped_fits(torch.bfloat16) and not routed_block(kind, {"gate_proj": 12})[0].experts.grouped_fits(torch.bfloat16)
    _, weights, index = block.gate(tokens)
    index[:3, -1] = experts.num_experts  # transformers' expert-parallel placeholder: no expert
    results = []
    for forward in (experts.grouped_forward, experts.padded_forward):
        x = tokens.clone().requires_grad_()
        experts.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(x, index, weights.detach())
        out.float().square().sum().backward()
        results.append([out.float(), x.grad, *(p.grad for p in experts.parameters())])
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-6, "rtol": 1e-5}
    for grouped, padded in zip(*results, strict=True):
        torch.testing.assert_close(grouped, padded, **tolerance)


def test_routed_moments_and_gram_matrices_do_not_depend_on_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Statistics hooked on expert projections read each expert's real rows from either layout."""
    names = ["experts.gate_proj", "experts.up_proj", "experts.down_proj"]
    seen = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(lowrank, "_GROUPED_MM", None)
        block, hidden = routed_block("mixtral", {"gate_proj": 8, "up_proj": 8, "down_proj": 16})
        with moe.record_routing(block, names, torch.device("cpu"), batches=1, inputs=True) as routing:
            block(hidden)
        modules = {n: m for n, m in block.named_modules() if n in names}
        grams = factor_grams(block, modules, [hidden], {}, torch.autocast("cpu", enabled=False), 1 << 20)
        seen.append((routing, grams))
    (grouped, grams_grouped), (padded, grams_padded) = seen
    assert grouped.tokens.keys() == padded.tokens.keys() and all(torch.equal(grouped.tokens[k], padded.tokens[k]) for k in grouped.tokens)
    for name in names:
        for a, b in zip(grouped.stats[name], padded.stats[name], strict=True):
            assert a.count == b.count
            torch.testing.assert_close(a.second_moment(), b.second_moment())
        torch.testing.assert_close(grams_grouped[name], grams_padded[name], atol=1e-5, rtol=1e-5)


def test_a_distilled_moe_run_is_the_same_with_grouped_or_padded_experts(
    tmp_path: Path, tiny_mixtral: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole pipeline (routed statistics, whitened init, preconditioned training, student pass) on either path: the
    factors agree to float32 rounding amplified by a few training steps."""
    rules = json.dumps({"layers.*.mlp.experts.*.*": 8})  # widths of whole 16-byte units: the grouped path applies
    settings = {"method": "distill", "init": "whiten", "ranks.rules": rules, "ranks.allocation": "uniform", "save_dtype": "float32"}
    grouped = run(tiny_mixtral, corpus, tmp_path / "grouped", **settings)
    monkeypatch.setattr(lowrank, "_GROUPED_MM", None)
    padded = run(tiny_mixtral, corpus, tmp_path / "padded", **settings)
    a, b = (compressed.load_compressed(report.output).state_dict() for report in (grouped, padded))
    assert any(".experts.down_proj.A" in k for k in a) and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3, msg=key)
    assert grouped.perplexity.compressed == pytest.approx(padded.perplexity.compressed, rel=1e-4)
