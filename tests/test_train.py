"""Feature distillation of one decoder layer: the loss, what trains, and the safety nets."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import materialised_layer
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from distill_lr import moe
from distill_lr.factorize import factorize_layer_
from distill_lr.fit import FactorSlots, FitState, fit, lr_factor, make_optimizer, param_groups, split_holdout
from distill_lr.layerwise import capture_inputs, embed, run_layer
from distill_lr.modeling.lowrank import ExpertLinears, LowRankExperts, LowRankLinear
from distill_lr.precondition import factor_grams, inverse_sqrt, preconditioned
from distill_lr.schema import TrainConfig
from distill_lr.testing import save_tiny
from distill_lr.train import MIN_LOSS, distill_layer, distill_loss, factor_modules, layer_objective, training_autocast


def test_loss_of_identical_outputs_is_minimal() -> None:
    y = torch.randn(2, 5, 16)
    assert float(distill_loss(y, y)) == pytest.approx(-math.log(1 / (1 + math.exp(-1))), abs=1e-6)
    assert MIN_LOSS == pytest.approx(0.31326, abs=1e-5)
    assert float(distill_loss(y, y + 0.1 * torch.randn_like(y))) > MIN_LOSS


def test_loss_is_l1_per_width_plus_cosine_term_and_masks_padding() -> None:
    y, y_hat = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    per_token = (y - y_hat).abs().mean(-1) - torch.nn.functional.logsigmoid(torch.nn.functional.cosine_similarity(y, y_hat, dim=-1))
    assert float(distill_loss(y, y_hat)) == pytest.approx(float(per_token.mean()), rel=1e-6)
    mask = torch.tensor([[1, 1, 0]])
    assert float(distill_loss(y, y_hat, mask)) == pytest.approx(float(per_token[0, :2].mean()), rel=1e-6)


def test_learning_rate_schedule() -> None:
    factors = [lr_factor(s, 100, 0.1, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


@pytest.mark.parametrize("relative", [True, False])
def test_relative_learning_rate_steps_by_a_share_of_each_factors_scale(relative: bool) -> None:
    g = torch.Generator().manual_seed(0)
    small, large = (torch.nn.Parameter(scale * torch.randn(8, 8, generator=g)) for scale in (0.01, 10.0))
    before = [small.detach().clone(), large.detach().clone()]
    optimizer = torch.optim.AdamW(param_groups([small, large], 0.1, relative), lr=0.1, weight_decay=0.0)
    (small.sum() + large.sum()).backward()
    optimizer.step()  # Adam's first step moves every entry by its group's lr
    for p, b in zip((small, large), before, strict=True):
        expected = 0.1 * float(b.square().mean().sqrt()) if relative else 0.1
        assert torch.allclose((b - p.detach()).abs(), torch.full_like(b, expected), rtol=1e-3)


@pytest.mark.parametrize(("n", "fraction", "held"), [(64, 0.125, 8), (10, 0.125, 2), (1, 0.5, 1)])
def test_holdout_split_is_disjoint_and_covers_every_sequence(n: int, fraction: float, held: int) -> None:
    hold, train = split_holdout(n, fraction, torch.Generator().manual_seed(0))
    assert len(hold) == held
    if n > held:
        assert sorted(hold.tolist() + train.tolist()) == list(range(n))
    else:  # a single sequence both trains and picks the best factors
        assert torch.equal(train, hold)


@pytest.fixture
def layer_setup(tiny_llama: Path):
    """Layer 0 of the tiny model, its inputs and dense outputs, and a half-rank svd student."""
    torch.manual_seed(0)
    model, layers, layer = materialised_layer(tiny_llama)
    ids = torch.randint(3, 200, (64, 16))
    _, kwargs = capture_inputs(model, layers, ids[:1])
    x = embed(model, layers, ids, 8)
    y = run_layer(layer, x, kwargs[0], 8)
    ranks = {n: 12 for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    factorize_layer_(layer, ranks, "svd", {})
    x_student = x + 0.01 * torch.randn_like(x)
    return layer, x, x_student, y, kwargs[0]


@pytest.mark.parametrize("inputs", ["teacher", "student", "teacher+student"])
def test_training_lowers_held_out_loss_and_moves_only_factors(layer_setup, inputs: str) -> None:
    layer, x, x_s, y, kwargs = layer_setup
    frozen = {n: p.detach().clone() for n, p in layer.named_parameters() if ".A." not in n and ".B." not in n}
    factors = {n: p.detach().clone() for n, p in layer.named_parameters() if ".A." in n or ".B." in n}
    cfg = TrainConfig(inputs=inputs, epochs=6, batch_size=4, lr=3e-2, patience=10)
    result = distill_layer(layer, x, x_s, y, kwargs, cfg, seed=0)
    assert result.best_holdout < result.init_holdout
    assert result.final_loss < result.init_loss  # the last steps' mean, also when the run ends on an evaluation
    assert result.rolled_back is None
    for n, p in layer.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        assert not p.requires_grad
    assert any(not torch.equal(p, factors[n]) for n, p in layer.named_parameters() if n in factors)


def test_micro_batches_give_the_same_training(layer_setup) -> None:
    layer, x, x_s, y, kwargs = layer_setup
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    a = distill_layer(layer, x, x_s, y, kwargs, TrainConfig(epochs=1, batch_size=4), seed=1)
    trained_a = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    b = distill_layer(layer, x, x_s, y, kwargs, TrainConfig(epochs=1, batch_size=4, micro_batch_size=1), seed=1)
    assert b.best_holdout == pytest.approx(a.best_holdout, rel=1e-4)
    for k, v in layer.state_dict().items():
        assert torch.allclose(v, trained_a[k], atol=1e-5), k


def test_bfloat16_autocast_trains_float32_factors_on_a_cpu(layer_setup) -> None:
    layer, x, x_s, y, kwargs = layer_setup
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    full = distill_layer(layer, x, x_s, y, kwargs, TrainConfig(epochs=2, batch_size=4), seed=1)
    layer.load_state_dict(state)
    half = distill_layer(layer, x, x_s, y, kwargs, TrainConfig(epochs=2, batch_size=4, autocast="bfloat16"), seed=1)
    assert half.best_holdout < half.init_holdout
    assert half.best_holdout != full.best_holdout  # the steps really ran in bfloat16
    assert half.best_holdout == pytest.approx(full.best_holdout, rel=2e-2)
    assert all(v.dtype == state[k].dtype for k, v in layer.state_dict().items())


@pytest.mark.parametrize(
    ("device", "mode", "enabled"),
    [("cpu", "auto", False), ("cpu", "bfloat16", True), ("cpu", "float32", False), ("cuda", "float32", False)],
)
def test_training_autocast_is_bfloat16_on_a_gpu_or_when_asked(device: str, mode: str, enabled: bool) -> None:
    autocast = training_autocast(torch.device(device), mode)
    assert autocast._enabled is enabled and autocast.fast_dtype == torch.bfloat16


def test_divergence_before_any_improvement_rolls_back_to_the_initialisation(layer_setup) -> None:
    layer, x, x_s, y, kwargs = layer_setup
    init = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(UserWarning, match="diverged"):
        result = distill_layer(layer, x, x_s, y, kwargs, TrainConfig(epochs=3, batch_size=4, lr=50.0, warmup_fraction=0.0), seed=0)
    assert result.rolled_back is not None
    for k, v in layer.state_dict().items():
        assert torch.equal(v, init[k]), k


def test_nan_loss_rolls_back(layer_setup) -> None:
    layer, x, x_s, y, kwargs = layer_setup
    init = {k: v.clone() for k, v in layer.state_dict().items()}
    module = next(m for m in layer.modules() if isinstance(m, LowRankLinear))
    hook = module.register_forward_hook(lambda _m, _a, out: out * float("nan") if torch.is_grad_enabled() else out)
    with pytest.warns(UserWarning, match="diverged"):
        result = distill_layer(layer, x, x_s, y, kwargs, TrainConfig(epochs=1, batch_size=4), seed=0)
    hook.remove()
    assert "nan" in result.rolled_back
    for k, v in layer.state_dict().items():
        assert torch.equal(v, init[k]), k


# A setting known to overfit this tiny layer: the held-out loss goes down, then up.
OVERFIT = dict(
    inputs="teacher", epochs=8, batch_size=4, lr=0.1, evals_per_epoch=4, warmup_fraction=0.0, min_lr_ratio=1.0, precondition=False
)


def test_the_installed_factors_are_the_best_held_out_ones(layer_setup) -> None:
    """Not the last step's: a training whose held-out loss goes down, then up, ends on its best evaluation."""
    layer, x, x_s, y, kwargs = layer_setup
    result = distill_layer(layer, x, x_s, y, kwargs, TrainConfig(**OVERFIT, patience=100), seed=0)
    helds = [point["holdout_loss"] for point in result.curve]
    assert result.best_holdout == min(helds) < result.init_holdout
    assert 0 < helds.index(min(helds)) < len(helds) - 1  # improved more than once, and got worse after
    assert not result.stopped_early


def test_training_stops_after_patience_evaluations_without_improvement(layer_setup) -> None:
    layer, x, x_s, y, kwargs = layer_setup
    init = {k: v.clone() for k, v in layer.state_dict().items()}
    full = distill_layer(layer, x, x_s, y, kwargs, TrainConfig(**OVERFIT, patience=100), seed=0)
    layer.load_state_dict(init)
    stopped = distill_layer(layer, x, x_s, y, kwargs, TrainConfig(**OVERFIT, patience=2), seed=0)
    assert stopped.stopped_early and stopped.steps < full.steps
    helds = [point["holdout_loss"] for point in stopped.curve]
    best = helds.index(min(helds))
    assert len(helds) == best + 3 and all(h >= min(helds) for h in helds[best + 1 :])  # two evaluations no better, then stop


def test_inverse_sqrt_whitens_the_damped_gram_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g)  # correlated features
    gram = x.T @ x
    P, P_inv = inverse_sqrt(gram, 1e-2)
    eye = torch.eye(6, dtype=torch.float64)
    damped = gram.double() + 1e-2 * gram.diagonal().mean().double() * eye
    torch.testing.assert_close(P.double() @ damped @ P.double(), eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(P @ P_inv, eye.float(), atol=1e-4, rtol=0)
    P2, P2_inv = inverse_sqrt(torch.stack([gram, torch.zeros(6, 6)]), 1e-2)  # per expert; one saw no token
    torch.testing.assert_close(P2[0], P)
    assert torch.equal(P2[1], eye.float()) and torch.equal(P2_inv[1], eye.float())


def test_preconditioning_keeps_the_layer_and_leaves_plain_factors(layer_setup) -> None:
    layer, x, _, _, kwargs = layer_setup
    modules = factor_modules(layer)
    keys = set(layer.state_dict())
    before = run_layer(layer, x, kwargs, 8)
    grams = factor_grams(layer, modules, [x[:8], x[8:16]], kwargs, nullcontext(), max_features=8192)
    assert set(grams) == set(modules)
    assert grams["self_attn.q_proj"] is grams["self_attn.v_proj"]  # q/k/v read one tensor: one matrix
    normed = layer.input_layernorm(x[:16].reshape(-1, x.shape[-1]))
    torch.testing.assert_close(grams["self_attn.q_proj"], normed.T @ normed, rtol=1e-4, atol=1e-3)
    bf16 = factor_grams(layer, modules, [x[:8], x[8:16]], kwargs, torch.autocast("cpu", dtype=torch.bfloat16), 8192)
    assert bf16["mlp.down_proj"].dtype == torch.float32  # summed in float32 under the GPU's training autocast
    reference = grams["mlp.down_proj"]
    torch.testing.assert_close(bf16["mlp.down_proj"], reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))
    with preconditioned(modules, grams, 1e-2, {}):
        assert all(parametrize.is_parametrized(m.A) and not parametrize.is_parametrized(m.B) for m in modules.values())
        torch.testing.assert_close(run_layer(layer, x, kwargs, 8), before, rtol=1e-4, atol=1e-4)
    assert not any(parametrize.is_parametrized(m) for m in layer.modules()) and set(layer.state_dict()) == keys
    hidden = x.shape[-1]
    narrow = factor_grams(layer, modules, [x[:8]], kwargs, nullcontext(), max_features=hidden)
    assert set(narrow) == {n for n, m in modules.items() if m.in_features <= hidden} != set(modules)  # not down_proj


def test_expert_grams_are_per_expert_and_frozen_experts_stay_exact() -> None:
    torch.manual_seed(0)
    experts = ExpertLinears(3, 8, 6, rank=2)
    torch.nn.init.normal_(experts.A)
    torch.nn.init.normal_(experts.B)
    x = torch.randn(3, 5, 8)
    x[1] = 0.0  # expert 1 was routed no token: every row is padding
    modules = {"mlp.experts.down_proj": experts}
    grams = factor_grams(experts, modules, [x], {}, nullcontext(), max_features=8192)
    torch.testing.assert_close(grams["mlp.experts.down_proj"], torch.bmm(x.mT, x))
    init, before = experts.A.detach().clone(), experts(x).detach()
    with preconditioned(modules, grams, 1e-2, {"mlp.experts": [2]}):
        torch.testing.assert_close(experts(x), before, rtol=1e-4, atol=1e-4)
    assert torch.equal(experts.A[2], init[2]) and torch.equal(experts.A[1], init[1])  # frozen; no tokens: identity
    torch.testing.assert_close(experts.A, init, rtol=1e-4, atol=1e-5)


def test_fit_keeps_the_best_held_out_factors_through_a_divergence() -> None:
    """Steps that improve, then a NaN loss: the loop stops there and the best factors are those of the last good evaluation."""
    linear = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(linear.weight)
    factors = FactorSlots({"w": linear})

    class Toy:
        name, steps = "loss", 0

        def error(self) -> torch.Tensor:
            return (linear.weight - 1).square().mean()

        def loss(self, idx: torch.Tensor, backward: bool) -> torch.Tensor:
            self.steps += 1
            value = self.error() * (float("nan") if self.steps == 4 else 1.0)
            value.backward()
            return value.detach()

        def evaluate(self, idx: torch.Tensor) -> dict[str, float]:
            return {"loss": float(self.error())}

    cfg = TrainConfig(epochs=10, batch_size=1, lr=0.1, relative_lr=False, warmup_fraction=0.0, evals_per_epoch=1, patience=10)
    ids = torch.tensor([0])
    state = FitState.start(Toy(), ids, factors.snapshot())
    with pytest.warns(UserWarning, match="diverged"):
        fit(Toy(), factors, (ids, ids, lambda _epoch: ids), cfg, make_optimizer(factors.params, cfg, 10), state)
    assert state.step == 3 and state.best_step == 3 and "nan" in state.rolled_back
    assert [point["holdout_loss"] for point in state.curve] == sorted((p["holdout_loss"] for p in state.curve), reverse=True)
    factors.restore(state.best_factors)
    assert float((linear.weight - 1).square().mean()) == pytest.approx(state.best["loss"])


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (``.item()``, ``float()``, ``bool()``): each one waits for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_a_training_step_of_a_moe_layer_reads_nothing_back_to_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped expert matmuls and losses kept on the device: a step runs without a host synchronisation."""
    torch.manual_seed(0)
    model, layers, layer = materialised_layer(save_tiny(tmp_path / "mixtral", "mixtral"))
    ids = torch.randint(3, 200, (8, 16))
    _, kwargs = capture_inputs(model, layers, ids[:1])
    x = embed(model, layers, ids, 8)
    y = run_layer(layer, x, kwargs[0], 8)
    ranks = moe.module_ranks({n: 8 for n in moe.expert_shapes(layer)} | {"self_attn.q_proj": 8}, moe.fused_experts(layer))
    moe.unfuse_experts_(layer, ranks)
    factorize_layer_(layer, ranks, "svd", {})
    assert any(isinstance(m, LowRankExperts) and m.grouped_fits(torch.float32) for m in layer.modules())
    objective = layer_objective(layer, (x, x, y), kwargs[0], TrainConfig(batch_size=4))
    for module in factor_modules(layer).values():
        module.requires_grad_(True)
    tolist = torch.Tensor.tolist
    listed = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: listed.append(t.shape) or tolist(t))
    with HostReads() as reads:
        loss = objective.loss(torch.arange(4), backward=True)
    assert reads.count == 0 and not listed
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize(("check_every", "stopped_at"), [(1, 4), (3, 5)])
def test_the_loss_is_read_every_check_every_steps_and_a_divergence_stops_at_the_next_read(check_every: int, stopped_at: int) -> None:
    linear = torch.nn.Linear(4, 1, bias=False)
    factors = FactorSlots({"w": linear})

    class Toy:
        name, calls = "loss", 0

        def loss(self, idx: torch.Tensor, backward: bool) -> torch.Tensor:
            self.calls += 1
            value = linear.weight.square().mean() * (float("nan") if self.calls == 5 else 1.0)
            value.backward()
            return value.detach()

        def evaluate(self, idx: torch.Tensor) -> dict[str, float]:
            return {"loss": float(linear.weight.detach().square().mean())}

    cfg = TrainConfig(epochs=1, batch_size=1, lr=0.01, warmup_fraction=0.0, evals_per_epoch=1, check_every=check_every)
    ids = torch.arange(10)
    state = FitState.start(Toy(), ids[:1], factors.snapshot())
    with pytest.warns(UserWarning, match="diverged"):
        fit(Toy(), factors, (ids, ids[:1], lambda _epoch: ids), cfg, make_optimizer(factors.params, cfg, 10), state)
    assert state.step == stopped_at and "nan at step 4" in state.rolled_back
