"""Several processes on one compression, launched by ``torchrun`` or ``accelerate launch`` (``torch.distributed``).

Data parallel per layer: every process holds the current decoder layer, the calibration and held-out sequences
are split in contiguous blocks (``shard``), and with them the activation caches. Statistics, held-out losses
and gradients are summed over the processes; the eigen-decompositions and SVDs of the initialisation are spread
over the processes by owner (``owners``, bin-packed by cost) and broadcast; process 0 writes every file.

The launcher's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) decides: without it,
or with one process, nothing here talks to anybody and ``group()`` is the single process. Every collective goes
through a ``Group`` method, which counts its bytes and seconds per phase of the layer (``traffic``) and turns a
timed-out or broken collective into a one-line error.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partialmethod
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import std as tqdm_std

from distill_lr.errors import UserInputError, first_line
from distill_lr.runtime import PHASE_LISTENERS

log = logging.getLogger("distill_lr")


@dataclass
class Group:
    """This process's place among the processes of one run, and the collectives the run uses."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = 0.0
    traffic: dict[str, list[float]] = field(default_factory=dict)  # phase -> [bytes sent into collectives, seconds in them]
    phase: str = "setup"

    @property
    def main(self) -> bool:
        """The process that writes files, logs and reports."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous block of ``n`` sequences (the blocks differ by at most one)."""
        return blocks(n, self.world)[self.rank]

    def sum_(self, tensors: list[torch.Tensor], tag: str = "") -> None:
        """Sum each tensor over the processes, in place; tensors of one dtype and device travel in one message.
        ``tag`` counts the traffic apart within the phase (``<phase>.<tag>``)."""
        if self.world == 1 or not tensors:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        wire = self._wire_device()
        for same in groups.values():
            flat = torch.cat([t.reshape(-1) for t in same]).to(wire if wire.type == "cuda" else same[0].device)  # NCCL: GPU only
            self._collective(lambda flat=flat: dist.all_reduce(flat), flat.numel() * flat.element_size(), tag)
            for t, part in zip(same, flat.split([t.numel() for t in same]), strict=True):
                t.copy_(part.view(t.shape))

    def sum_floats(self, values: list[float]) -> list[float]:
        """Numbers summed over the processes (float64)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._wire_device())
        self.sum_([t])
        return t.tolist()

    def gather_ints(self, value: int) -> list[int]:
        """One integer from every process, in rank order."""
        if self.world == 1:
            return [value]
        mine = torch.tensor([value], dtype=torch.int64, device=self._wire_device())
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self._collective(lambda: dist.all_gather(out, mine), 8)
        return [int(t) for t in out]

    def all_to_all(self, parts: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
        """Send ``parts[r]`` (1-D, one dtype and device) to process r and receive ``sizes[s]`` entries from each process s,
        in one message each way (uneven sizes: the receiver knows them, e.g. from an exchange of counts before)."""
        if self.world == 1:
            return list(parts)
        wire = self._wire_device()
        device = wire if wire.type == "cuda" else parts[0].device
        out = torch.empty(sum(sizes), dtype=parts[0].dtype, device=device)
        data = torch.cat(parts).to(device)
        sent = [p.numel() for p in parts]
        self._collective(lambda: dist.all_to_all_single(out, data, sizes, sent), data.numel() * data.element_size())
        return list(out.split(sizes))

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        """Overwrite ``tensors`` with process ``src``'s (same shapes everywhere)."""
        if self.world == 1:
            return
        for t in tensors:
            buffer = t if t.is_contiguous() else t.contiguous()
            self._collective(lambda b=buffer: dist.broadcast(b, src), buffer.numel() * buffer.element_size())
            if buffer is not t:
                t.copy_(buffer)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """A picklable object as process ``src`` has it."""
        if self.world == 1:
            return obj
        box = [obj]
        self._collective(lambda: dist.broadcast_object_list(box, src, device=self._wire_device()), 0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self._collective(dist.barrier, 0)

    def _wire_device(self) -> torch.device:
        """Where small messages live: the GPU with NCCL, the host with gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def _collective(self, call: Any, nbytes: int, tag: str = "") -> None:
        start = time.perf_counter()
        try:
            call()
        except RuntimeError as err:  # gloo/NCCL: a peer that died or a timeout (DistBackendError is a RuntimeError)
            raise self._failed(err) from None
        spent = self.traffic.setdefault(f"{self.phase}.{tag}" if tag else self.phase, [0.0, 0.0])
        spent[0] += nbytes
        spent[1] += time.perf_counter() - start

    @contextmanager
    def failures(self) -> Iterator[None]:
        """Around code whose collectives are torch's own (FSDP's): one that fails ends in the same one line as ours."""
        try:
            yield
        except RuntimeError as err:
            backend = isinstance(err, dist.DistBackendError) or any(k in str(err).lower() for k in ("gloo", "nccl"))
            if self.world == 1 or not backend:
                raise
            raise self._failed(err) from None

    def _failed(self, err: RuntimeError) -> UserInputError:
        return UserInputError(
            f"process {self.rank} of {self.world}: a collective failed ({first_line(err)}); another process stopped "
            f"(see its message) or did not answer within {self.timeout_s:.0f} s (dist_timeout_s): fix that and run "
            "the same command again, it resumes after the finished layers"
        )

    def take_traffic(self) -> dict[str, dict[str, float]]:
        """The bytes and seconds of the collectives per phase since the last call (a layer's), and start counting anew."""
        taken, self.traffic = self.traffic, {}
        return {phase: {"bytes": int(b), "seconds": round(s, 3)} for phase, (b, s) in taken.items()}

    def _on_phase(self, name: str, starting: bool) -> None:
        self.phase = name if starting else "other"


_GROUP = Group()


def group() -> Group:
    """The processes of the current run (a single one unless launched with several)."""
    return _GROUP


def launched_world() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among those the launcher started (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def launched(device: str, timeout_s: float) -> Iterator[Group]:
    """Join the launcher's process group for the block (NCCL for GPUs, gloo otherwise), or stay a single process."""
    global _GROUP
    world = launched_world()
    if world == 1:
        yield _GROUP
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    gpus = device != "cpu" and torch.cuda.is_available()
    if gpus:
        torch.cuda.set_device(local)
    ours = not dist.is_initialized()  # a caller's own process group (an accelerate script calling compress) is used as it is
    try:
        if ours:
            dist.init_process_group("nccl" if gpus else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise UserInputError(
            f"process {rank} of {world} cannot join its process group ({first_line(err)}): launch with torchrun or accelerate "
            "launch, which set MASTER_ADDR and MASTER_PORT, or run one process without a launcher"
        ) from None
    _GROUP = Group(dist.get_rank(), dist.get_world_size(), local, timeout_s)
    PHASE_LISTENERS.append(_GROUP._on_phase)
    bars, level = tqdm_std.tqdm.__init__, log.level
    if not _GROUP.main:  # one voice: process 0 logs and shows progress (tqdm reads TQDM_DISABLE only at its import)
        log.setLevel(logging.WARNING)
        tqdm_std.tqdm.__init__ = partialmethod(bars, disable=True)  # type: ignore[method-assign]
    try:
        yield _GROUP
    finally:
        PHASE_LISTENERS.remove(_GROUP._on_phase)
        tqdm_std.tqdm.__init__, _GROUP = bars, Group()  # type: ignore[method-assign]
        log.setLevel(level)
        if ours:
            dist.destroy_process_group()


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole on every process (a collective for a sharded one: every process calls it, in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (the tensor itself when it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def in_block(idx: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The positions, in a process's caches, of the global sequence indices ``idx`` that fall in its block [start, end)."""
    start, end = block
    return idx[(idx >= start) & (idx < end)] - start


def blocks(n: int, world: int) -> list[slice]:
    """``n`` items split in ``world`` contiguous blocks that differ by at most one: each process's sequences (``Group.shard``),
    each process's experts under expert parallelism (``block_owners``)."""
    return [slice(n * r // world, n * (r + 1) // world) for r in range(world)]


def block_owners(n: int, world: int) -> list[int]:
    """The process owning each of ``n`` items split in ``blocks``."""
    return [r for r, block in enumerate(blocks(n, world)) for _ in range(block.start, block.stop)]


def owners(costs: dict[str, float], world: int, fixed: dict[str, int] | None = None) -> dict[str, int]:
    """Each job's process, the largest first onto the least loaded process (LPT bin-packing): the same answer everywhere.
    ``fixed`` jobs already have their process (one that alone holds their data); they load it before the others are placed."""
    fixed = fixed or {}
    load = [0.0] * world
    owner: dict[str, int] = {}
    for name, r in fixed.items():
        owner[name] = r
        load[r] += costs[name]
    for name in sorted(set(costs) - set(fixed), key=lambda n: (-costs[n], n)):
        owner[name] = min(range(world), key=lambda r: (load[r], r))
        load[owner[name]] += costs[name]
    return owner


def interleaved(order: torch.Tensor, bounds: list[int], batch_size: int) -> torch.Tensor:
    """``order`` (global sequence indices) rearranged so that every batch takes an even share from each process's block.

    Process r owns the indices in ``[bounds[r], bounds[r+1])``; each process's indices keep their order. A batch takes
    ``batch_size / processes`` from each while they last, the rest from whoever still has some: the processes do the
    same work at every step. With one process the order is unchanged.
    """
    world = len(bounds) - 1
    if world == 1:
        return order
    owner = torch.bucketize(order, torch.tensor(bounds[1:-1]), right=True)
    queues = [order[owner == r].tolist() for r in range(world)]
    share = [batch_size // world + (r < batch_size % world) for r in range(world)]
    taken, out = [0] * world, []
    while len(out) < len(order):
        for r in range(world):
            n = min(share[r], len(queues[r]) - taken[r])
            out += queues[r][taken[r] : taken[r] + n]
            taken[r] += n
        short = batch_size - (len(out) % batch_size or batch_size)
        for r in range(world):  # an exhausted process's share, from the others
            n = min(short, len(queues[r]) - taken[r])
            out += queues[r][taken[r] : taken[r] + n]
            taken[r], short = taken[r] + n, short - n
    return torch.tensor(out, dtype=order.dtype)
