"""Partial forward passes: one decoder layer at a time, with the arguments the model itself builds.

Masks (causal, sliding-window, per layer type), rotary embeddings and position ids are never
re-implemented here: the model's own ``forward`` runs with its decoder layers swapped for stand-ins
that record what each layer receives, so every decoder-only architecture of transformers works as
long as its layers are called ``layer(hidden_states, **kwargs)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from distill_lr.errors import UserInputError

LayerKwargs = dict[str, Any]


class _Stop(Exception):
    """Raised by the last stand-in to end a forward pass early."""


class _StandIn(nn.Module):
    """Takes a decoder layer's place; reads attributes through to it (``attention_type``...)."""

    def __init__(self, original: nn.Module, action: Callable[[torch.Tensor, LayerKwargs], torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_action", action)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return object.__getattribute__(self, "_action")(hidden_states, kwargs)


@contextmanager
def _stand_ins(layers: nn.ModuleList, actions: list[Callable[[torch.Tensor, LayerKwargs], torch.Tensor]]) -> Iterator[None]:
    originals = list(layers)
    for i, action in enumerate(actions):
        layers[i] = _StandIn(originals[i], action)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _handing_over(layers: nn.ModuleList, final_hidden: torch.Tensor) -> AbstractContextManager[None]:
    """Stand-ins that pass ``final_hidden`` on as the last layer's outputs: the model's forward then runs only
    its embedding (ignored), final norm, head and loss on them."""
    return _stand_ins(layers, [lambda _h, _k: final_hidden] + [lambda h, _k: h] * (len(layers) - 1))


def capture_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerKwargs]]:
    """Run the model's own forward up to the decoder layers: layer 0's hidden states and every layer's kwargs."""
    seen: list[LayerKwargs] = []
    first: list[torch.Tensor] = []

    def record(hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        if not first:
            first.append(hidden)
        seen.append(kwargs)
        if len(seen) == len(layers):
            raise _Stop
        return hidden

    with _stand_ins(layers, [record] * len(layers)), torch.no_grad():
        try:
            model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
    return first[0], seen


def embed(
    model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Layer-0 inputs for a batch of sequences (embedding scale and all, as the model computes it).

    With ``out`` (an activation cache, anywhere) each batch is written there as soon as it is made.
    """
    parts = []

    def stop(hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        parts.append(hidden)
        raise _Stop

    with _stand_ins(layers, [stop]), torch.no_grad():
        for start in range(0, len(input_ids), batch_size):
            try:
                model(input_ids=input_ids[start : start + batch_size], use_cache=False)
            except _Stop:
                pass
            if out is not None:
                out[start : start + batch_size] = parts.pop().to(out.dtype)
    return torch.cat(parts) if out is None else out


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
    """One decoder layer on a batch; layers that return tuples give their hidden states."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    inputs: torch.Tensor,
    kwargs: LayerKwargs,
    batch_size: int,
    out: torch.Tensor | None = None,
    overflow: Callable[[], str] | None = None,
) -> torch.Tensor:
    """The layer's outputs for every cached sequence, batch by batch on the layer's device.

    ``inputs`` and ``out`` may live anywhere (see ``distill_lr.cache``); ``out`` may alias ``inputs``.
    With ``overflow``, outputs with inf or NaN raise ``UserInputError(overflow())`` (one check at the end).
    """
    result = torch.empty_like(inputs) if out is None else out
    device = layer_device(layer)
    finite = torch.ones((), dtype=torch.bool, device=device)
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size].to(device, non_blocking=True)
        outputs = call_layer(layer, batch, kwargs)
        if overflow is not None:
            finite &= torch.isfinite(outputs).all()
        result[start : start + batch_size] = outputs.to(result.dtype)
    if overflow is not None and not bool(finite):
        raise UserInputError(overflow())
    return result


class SharedInputs:
    """Which module first read a tensor during the current forward of ``layer``, so that linears reading one
    tensor (q/k/v, gate/up) share one statistic of it, computed once. ``hook`` forgets at each forward; remove it after.
    """

    def __init__(self, layer: nn.Module) -> None:
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # by identity; the tensor is kept so its id stays unique
        self.hook = layer.register_forward_pre_hook(lambda *_: self._seen.clear())

    def first_reader(self, name: str, x: torch.Tensor) -> str | None:
        """The module that already read ``x`` in this forward, or None (``name`` is then recorded as its reader)."""
        first = self._seen.get(id(x))
        if first is not None and first[0] is x:
            return first[1]
        self._seen[id(x)] = (x, name)
        return None


@contextmanager
def hooks_removed(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Keep the given module hooks while inside, and remove every one of them on the way out, error or not."""
    handles = list(handles)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def error_sums(pred: torch.Tensor, target: torch.Tensor, chunk: int = 8) -> list[float]:
    """``[‖pred − target‖², ‖target‖²]``, a few sequences at a time: no float32 copy of a whole cache. Sums add up over
    the processes that hold parts of a cache."""
    err = ref = 0.0
    for start in range(0, len(target), chunk):
        t, p = target[start : start + chunk].float(), pred[start : start + chunk].float()
        err += float((p - t).square().sum())
        ref += float(t.square().sum())
    return [err, ref]


def ratio(sums: list[float]) -> float:
    """``error_sums`` as the relative error."""
    return math.sqrt(sums[0]) / max(math.sqrt(sums[1]), 1e-12)


@torch.no_grad()
def head_nll(model: nn.Module, layers: nn.ModuleList, final_hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token loss and token count from the last layer's outputs, via the model's own head.

    The decoder layers are stand-ins that hand over the cached final hidden states, so the final
    norm, the head, any logit soft-capping and the loss are exactly the model's.
    """
    total, count = 0.0, 0
    for i in range(len(input_ids)):
        hidden = final_hidden[i : i + 1].to(input_ids.device)
        with _handing_over(layers, hidden):
            ids = input_ids[i : i + 1]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        tokens = ids.shape[1] - 1
        total += float(loss) * tokens
        count += tokens
    return total, count


def head_loss_gradient(model: nn.Module, layers: nn.ModuleList, final_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """∂L/∂h of the mean next-token loss over all sequences w.r.t. the last layer's outputs, via the model's own head."""
    grads = torch.empty_like(final_hidden)
    tokens = input_ids.numel() - len(input_ids)
    for i in range(len(input_ids)):
        hidden = final_hidden[i : i + 1].to(input_ids.device).detach().requires_grad_()
        with _handing_over(layers, hidden), torch.enable_grad():
            ids = input_ids[i : i + 1]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss * (ids.shape[1] - 1) / tokens
            (grad,) = torch.autograd.grad(loss, hidden)
        grads[i : i + 1] = grad.to(grads.dtype)
    return grads


@torch.no_grad()
def head_logits(model: nn.Module, layers: nn.ModuleList, final_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits from given last-layer outputs (its final norm, head and any soft-capping), for a batch."""
    with _handing_over(layers, final_hidden):
        return model(input_ids=input_ids, use_cache=False).logits


@torch.no_grad()
def head_span_logprobs(
    model: nn.Module, layers: nn.ModuleList, final_hidden: torch.Tensor, input_ids: torch.Tensor, spans: list[tuple[int, int]]
) -> list[float]:
    """Per row, the summed ``log p(token | the tokens before it)`` over its ``[start, end)`` tokens, via the model's own head.

    Only the needed positions go through the head (``logits_to_keep``): a choice of a few tokens costs
    a few vocabulary-sized rows, not one per token of the row.
    """
    sums = []
    for row, (start, end) in enumerate(spans):
        hidden = final_hidden[row : row + 1, :end].to(input_ids.device)
        with _handing_over(layers, hidden):
            sums.append(span_logprob(model, input_ids[row], start, end))
    return sums


def span_logprob(model: nn.Module, ids: torch.Tensor, start: int, end: int) -> float:
    """``Σ log p(ids[t] | ids[:t])`` for t in [start, end), from one forward of ``ids[:end]`` with only those positions' logits."""
    row = ids[None, :end]
    positions = torch.arange(start - 1, end - 1, device=ids.device)
    logits = model(input_ids=row, use_cache=False, logits_to_keep=positions).logits[0].float()
    return float(logits.log_softmax(-1).gather(-1, row[0, start:end, None]).sum())
