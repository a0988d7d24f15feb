import pytest

from distill_lr.errors import UserInputError
from distill_lr.factorize import break_even_rank
from distill_lr.ranks import matches, plan_ranks
from distill_lr.schema import RankConfig


def shapes(layers: int = 4) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(layers):
        for name, shape in [
            ("self_attn.q_proj", (64, 64)),
            ("self_attn.k_proj", (32, 64)),
            ("mlp.down_proj", (64, 128)),
            ("mlp.gate", (4, 64)),
        ]:
            out[f"model.layers.{i}.{name}"] = shape
    return out


def test_patterns() -> None:
    assert matches("layers.*.mlp.down_proj", "layers.3.mlp.down_proj")
    assert matches("layers.0-3.self_attn.*", "layers.2.self_attn.q_proj")
    assert not matches("layers.0-3.self_attn.*", "layers.4.self_attn.q_proj")
    assert matches("**.gate", "layers.1.mlp.gate")
    assert matches("layers.*.**", "layers.1.mlp.experts.3.down_proj")
    assert not matches("layers.*.mlp", "layers.1.mlp.down_proj")
    assert matches("layers.*.mlp.*_proj", "layers.1.mlp.down_proj")


def test_uniform_target_is_met_and_router_stays_dense() -> None:
    plan = plan_ranks(shapes(), RankConfig(target=0.3, allocation="uniform"), name_prefix="model.")
    assert abs(plan.removed_fraction - 0.3) < 0.02
    assert not any(n.endswith(".gate") for n in plan.ranks)
    assert plan.for_layer("model.layers.2.").keys() == {"self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"}


def test_rules_last_match_wins_and_target_spreads_over_the_rest() -> None:
    rules = {"layers.*.mlp.down_proj": 40, "layers.0.mlp.down_proj": "skip", "layers.*.self_attn.k_proj": 0.5}
    plan = plan_ranks(shapes(), RankConfig(target=0.3, rules=rules, allocation="uniform"), name_prefix="model.")
    assert "model.layers.0.mlp.down_proj" not in plan.ranks
    assert plan.ranks["model.layers.1.mlp.down_proj"] == 40
    assert plan.ranks["model.layers.1.self_attn.k_proj"] == round(0.5 * break_even_rank(32, 64))
    assert abs(plan.removed_fraction - 0.3) < 0.02


def test_rank_above_min_dimension_is_an_error() -> None:
    with pytest.raises(UserInputError, match="above min"):
        plan_ranks(shapes(), RankConfig(target=None, rules={"layers.*.self_attn.k_proj": 40}), name_prefix="model.")


def test_rank_at_break_even_stays_dense_with_warning() -> None:
    with pytest.warns(UserWarning, match="break-even"):
        plan = plan_ranks(shapes(), RankConfig(target=None, rules={"layers.*.self_attn.q_proj": 32}), name_prefix="model.")
    assert plan.ranks == {}
    assert plan.removed_fraction == 0.0


def test_rule_matching_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="matches no linear"):
        plan_ranks(shapes(), RankConfig(target=0.2, rules={"layers.*.mlp.up_proj": 8}, allocation="uniform"), name_prefix="model.")


def test_unreachable_target_is_an_error() -> None:
    with pytest.raises(UserInputError, match="cannot be reached"):
        plan_ranks(shapes(), RankConfig(target=0.9, rules={"layers.*.mlp.down_proj": "skip"}, allocation="uniform"), name_prefix="model.")


def test_rank_multiple_rounds_down() -> None:
    plan = plan_ranks(shapes(), RankConfig(target=0.3, rank_multiple=8, allocation="uniform"), name_prefix="model.")
    assert all(r % 8 == 0 for r in plan.ranks.values())
