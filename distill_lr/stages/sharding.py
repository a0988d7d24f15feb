"""The end-to-end stage over several processes: torch's FSDP (``fully_shard``) splits each decoder layer's parameters,
their gradients and the optimizer's state over the processes, and gathers a layer's parameters only while it computes.

The layers outside the stage stay as they are (plain modules on meta): the stage trains FSDP copies of them and hands
the trained tensors back whole (``Shards.full``). A state file holds whole tensors whatever the number of processes, so
a stopped stage resumes with another number of processes; ``Shards.part`` takes this process's part of them again.
With one process nothing is sharded and every function here is the identity.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from distill_lr.distributed import whole


def sharded_copy(
    skeleton: nn.Module,
    load: Callable[[nn.Module], None],
    trained: Callable[[nn.Module], list[nn.Module]],
    compute: tuple[DeviceMesh, torch.dtype],
) -> nn.Module:
    """A copy of a layer's skeleton, materialised by ``load``, with the modules ``trained`` names in float32 and the whole
    sharded over the processes of ``compute``'s mesh. Computation runs in its dtype (the parameters are gathered in it),
    gradients are reduced in float32; the copy's whole tensors are freed once sharded."""
    mesh, dtype = compute
    layer = copy.deepcopy(skeleton)  # on meta: nothing is copied but the structure
    load(layer)
    for module in trained(layer):
        module.float()
    # every layer is its own FSDP root: resharded after each forward too (a root keeps its whole parameters by default)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return layer


def process_mesh(device: torch.device, processes: int) -> DeviceMesh:
    """All the processes of the launch, on the device type the run computes on (the GPUs with NCCL, else the host)."""
    return init_device_mesh(device.type, (processes,))


class Shards:
    """Between the whole tensors of the trained parameters (what a state file holds) and this process's parts of them
    (its FSDP shards, which the optimizer steps and the snapshots copy); in a single process both are the same."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def full(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole tensors, on the host, from this process's parts (``FactorSlots.snapshot``) of each parameter."""
        pairs = zip(parts, self.params, strict=True)
        return [self._dtensor(part, p).full_tensor().cpu() if isinstance(p, DTensor) else part for part, p in pairs]

    def part(self, fulls: list[torch.Tensor]) -> list[torch.Tensor]:
        """This process's part of each whole tensor (what ``FactorSlots.restore`` installs)."""
        return [self._split(t, p).to_local().cpu() if isinstance(p, DTensor) else t for t, p in zip(fulls, self.params, strict=True)]

    def full_optimizer(self, state: dict[str, Any]) -> dict[str, Any]:
        """An optimizer's ``state_dict`` with every sharded state tensor whole, on the host."""
        states = {i: {k: whole(v).cpu() if isinstance(v, DTensor) else v for k, v in s.items()} for i, s in state["state"].items()}
        return {**state, "state": states}

    def part_optimizer(self, state: dict[str, Any]) -> dict[str, Any]:
        """``full_optimizer``'s inverse: each state tensor shaped like its sharded parameter sharded like it."""

        def split(v: Any, p: nn.Parameter) -> Any:
            return self._split(v, p) if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v

        return {**state, "state": {i: {k: split(v, self.params[int(i)]) for k, v in s.items()} for i, s in state["state"].items()}}

    @staticmethod
    def _dtensor(part: torch.Tensor, p: DTensor) -> DTensor:
        return DTensor.from_local(part.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    @staticmethod
    def _split(t: torch.Tensor, p: DTensor) -> DTensor:
        """Each process cuts its own part from the whole tensor it holds (no message)."""
        return distribute_tensor(t.detach().to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
