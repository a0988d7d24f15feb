"""Automatic rank allocation: the budget is met on every family, the plan is deterministic, rules win,
the streamed pre-pass measures what the whole model's backward pass gives, and the greedy is optimal where it can be checked."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import run, run_files
from transformers import AutoModelForCausalLM

from distill_lr import allocation, prepass
from distill_lr.allocation import Budget, kept
from distill_lr.checkpoint.reader import CheckpointReader, build_skeleton, decoder_layers, load_non_layer_
from distill_lr.errors import UserInputError
from distill_lr.ranks import free_matrices, linear_shapes, plan_ranks
from distill_lr.schema import RankConfig
from distill_lr.testing import save_tiny


def saved_ranks(output: str) -> dict[str, int]:
    return json.loads((Path(output) / "config.json").read_text())["distill_lr"]["ranks"]


@pytest.mark.parametrize("kind", ["llama", "mistral", "mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("how", ["loss-aware", "bottom"])
def test_the_budget_is_met_on_every_family(tmp_path: Path, corpus: Path, kind: str, how: str) -> None:
    model = save_tiny(tmp_path / kind, kind)
    for target in (0.2, 0.4):
        settings = {"ranks.allocation": how, "ranks.target": target}
        report = run(model, corpus, tmp_path / f"out-{target}", method="svd", evaluate=False, **settings)
        assert report.params.removed_fraction == pytest.approx(target, abs=0.005)
        assert report.allocation is not None and report.allocation["allocation"] == how
        ranks = saved_ranks(report.output)
        assert ranks and not any(".experts.0." in n for n in ranks)  # experts of one layer share a rank per projection


def test_loss_aware_plan_is_deterministic_and_rules_win(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    a, b = (run(tiny_llama, corpus, tmp_path / name, method="svd", evaluate=False) for name in "ab")
    assert saved_ranks(a.output) == saved_ranks(b.output)
    assert a.allocation["kept"] == b.allocation["kept"] and "prepass_seconds" in a.allocation
    rules = {"layers.1.self_attn.q_proj": 5, "layers.2.mlp.down_proj": "skip"}
    ruled = run(tiny_llama, corpus, tmp_path / "ruled", method="svd", evaluate=False, **{"ranks.rules": json.dumps(rules)})
    ranks = saved_ranks(ruled.output)
    assert ranks["model.layers.1.self_attn.q_proj"] == 5 and "model.layers.2.mlp.down_proj" not in ranks
    assert ruled.params.removed_fraction == pytest.approx(0.3, abs=0.005)


def test_a_resumed_run_reuses_the_plan_and_writes_the_same_files(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    whole = run(tiny_llama, corpus, tmp_path / "whole")
    calls = []
    real = prepass.measure
    monkeypatch.setattr(prepass, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run(tiny_llama, corpus, tmp_path / "resumed")
    (tmp_path / "resumed" / "config.json").unlink()  # as if stopped before the end
    next(iter(sorted((tmp_path / "resumed").glob("model-layer-*")))).unlink()
    again = run(tiny_llama, corpus, tmp_path / "resumed")
    assert calls == [1] and again.allocation.get("reused") and again.allocation["kept"] == first.allocation["kept"]
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "whole") and whole.allocation["kept"] == first.allocation["kept"]


def test_streamed_gradient_weights_equal_the_whole_model_backward(tmp_path: Path) -> None:
    """The pre-pass's per-matrix mean squared output gradients equal those of one backward through the whole model."""
    folder = save_tiny(tmp_path / "llama", "llama")
    reader = CheckpointReader(folder)
    model = build_skeleton(reader.config)
    prefix, layers = decoder_layers(model)
    load_non_layer_(model, reader, prefix, torch.device("cpu"), torch.float32)
    shapes = linear_shapes(layers, prefix)
    ids = torch.randint(3, reader.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    names = free_matrices(shapes, RankConfig(), "model.")
    found = prepass.measure(model, reader, prefix, layers, names, ids, (torch.device("cpu"), torch.float32), 2, lambda *_: "overflow")

    dense = AutoModelForCausalLM.from_pretrained(folder).float()
    energy: dict[str, torch.Tensor] = {}

    def watch(name: str, out: torch.Tensor) -> None:
        out.register_hook(lambda g: energy.__setitem__(name, g))

    hooks = [m.register_forward_hook(lambda _m, _a, out, n=n: watch(n, out)) for n, m in dense.named_modules() if n in names]
    dense(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    for name in names:
        g = energy[name]
        assert found.weights[name] == pytest.approx(float(g.double().pow(2).mean()), rel=1e-4)
    assert set(found.spectra) == names


def test_loss_aware_greedy_is_optimal_on_a_small_problem() -> None:
    """On three small matrices, the greedy plan's damage equals the best of every plan within the budget."""
    shapes = {"a": (6, 4), "b": (5, 5), "c": (4, 7)}
    spectra = {
        "a": torch.tensor([9.0, 3.0, 1.0, 0.2], dtype=torch.float64),
        "b": torch.tensor([4.0, 3.5, 3.0, 0.5, 0.1], dtype=torch.float64),
        "c": torch.tensor([20.0, 1.0, 0.5, 0.4], dtype=torch.float64),
    }
    weights = {"a": 1.0, "b": 2.0, "c": 0.5}
    budget = Budget(params=45, floor=0.01)
    chosen = allocation.loss_aware(shapes, spectra, weights, budget)

    def damage(ranks: dict[str, int | None]) -> float:
        return sum(0.0 if r is None else weights[n] * float(spectra[n][r:].sum()) for n, r in ranks.items())

    options = {n: [*range(1, allocation.max_factor_rank(*s) + 1), None] for n, s in shapes.items()}
    feasible = [dict(zip(shapes, combo, strict=True)) for combo in itertools.product(*options.values())]
    feasible = [p for p in feasible if sum(kept(shapes[n], r) for n, r in p.items()) <= budget.params]
    assert sum(kept(shapes[n], r) for n, r in chosen.items()) <= budget.params
    assert damage(chosen) == pytest.approx(min(damage(p) for p in feasible))


def test_bottom_cuts_the_lowest_layers_first_down_to_the_floor() -> None:
    shapes = {f"layers.{i}.{m}": (64, 64) for i in range(4) for m in ("q", "o")}
    layer_of = {n: int(n.split(".")[1]) for n in shapes}
    dense = sum(kept(s, None) for s in shapes.values())
    ranks = allocation.bottom(shapes, layer_of, Budget(params=int(0.75 * dense), floor=0.25), step_fraction=0.25)
    used = sum(kept(shapes[n], r) for n, r in ranks.items())
    assert 0.75 * dense - 128 <= used <= 0.75 * dense
    assert all(ranks[f"layers.0.{m}"] == 8 for m in ("q", "o"))  # layer 0 at the floor (a quarter of break-even 32)
    assert ranks["layers.3.q"] is None and ranks["layers.3.o"] is None  # the top layers untouched


def test_a_floor_above_the_budget_is_a_clear_error() -> None:
    shapes = {f"layers.{i}.q": (64, 64) for i in range(2)}
    cfg = RankConfig(target=0.9, allocation="bottom", floor=0.5)
    with pytest.raises(UserInputError, match=r"removes \d+\.\d%, not ranks.target=90.0%: .* lower ranks.floor or ranks.target") as err:
        plan_ranks(shapes, cfg)
    assert "raise" not in str(err.value)  # a higher target removes more: the floor is further out of reach


def test_more_allocation_sequences_than_calibration_sequences_is_said(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    with pytest.warns(UserWarning, match=r"ranks.allocation_sequences=64 is more than the 16 calibration sequences"):
        report = run(tiny_llama, corpus, tmp_path / "out", **{"ranks.allocation_sequences": 64})
    assert report.allocation["prepass_sequences"] == 16
