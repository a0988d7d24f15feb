"""Loading code for compressed checkpoints, saved beside the weights as ``modeling_distill_lr.py``.

It imports only torch, transformers and the ``lowrank.py`` saved next to it, so a compressed folder
loads on a machine without distill_lr::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The original architecture class is built first, the linears listed in ``config.distill_lr["ranks"]``
are swapped for empty ``LowRankLinear`` modules, and then transformers loads the factors as usual.
"""

from __future__ import annotations

import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .lowrank import LowRankLinear, replace_linears_

CONFIG_KEY = "distill_lr"


def apply_low_rank_(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace the named linears by uninitialised low-rank modules of the given ranks."""

    def factory(name: str, linear: nn.Linear) -> nn.Module:
        return LowRankLinear(
            linear.in_features,
            linear.out_features,
            ranks[name],
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    swapped = replace_linears_(model, factory, predicate=lambda name, _: name in ranks)
    missing = sorted(set(ranks) - set(swapped))
    if missing:
        raise ValueError(f"compressed checkpoint names linears the model does not have: {missing[:3]}")


def low_rank_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A subclass of the original architecture whose constructor installs the low-rank modules."""

    def __init__(self: PreTrainedModel, config: transformers.PretrainedConfig, *args: object, **kwargs: object) -> None:
        base.__init__(self, config, *args, **kwargs)
        apply_low_rank_(self, getattr(config, CONFIG_KEY)["ranks"])

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def base_architecture(config: transformers.PretrainedConfig) -> type[PreTrainedModel]:
    return getattr(transformers, getattr(config, CONFIG_KEY)["base_architecture"])


class DistillLRForCausalLM(PreTrainedModel):
    """Entry point named in ``auto_map``: dispatches to the low-rank variant of the original class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):  # type: ignore[override]
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("adapter_kwargs", None)
        if config is None:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        model_class = low_rank_class(base_architecture(config))
        return model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
