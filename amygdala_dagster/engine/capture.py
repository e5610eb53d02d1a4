"""The one way activations leave a model: forward hooks on the hooked blocks.

What is read at layer ``idx`` is the raw output of block ``idx``: the residual
stream after that block, as a ReadoutManager hooking the same block sees it
(for the last block this is before the final norm, unlike Hugging Face's
``hidden_states[-1]``).

:func:`capture` registers one hook per block for the duration of a ``with``
block and hands each block's hidden-state output to a callback. With
``stop_after`` set, the hook of that slot raises :class:`StopForward` once its
callback ran, so no later block, final norm or head is computed;
:func:`run_until_captured` calls the model and swallows that exception. The
activation engine (pooled and per-token activations), the runtime reference's
prefill and its per-step generation all read the model through these two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

#: ``on_output(slot, hidden)``: ``hidden`` is block ``slot``'s output ``[batch, positions, hidden]``.
OnOutput = Callable[[int, torch.Tensor], None]


class StopForward(Exception):
    """Raised from the deepest hooked block to end a forward pass early."""


def block_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder/encoder block's output (a tensor, a tuple or a ModelOutput)."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(hidden, torch.Tensor):
        hidden = getattr(output, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"layer output of type {type(output).__name__} holds no hidden-state tensor")
    return hidden


@contextlib.contextmanager
def capture(modules: Sequence[torch.nn.Module], on_output: OnOutput, *,
            stop_after: int | None = None) -> Iterator[None]:
    """Within the block, every forward of ``modules[slot]`` calls ``on_output(slot, hidden)``.

    ``stop_after``: the slot after whose callback the pass ends (raise :class:`StopForward`); None lets
    the model run to its end (generation).
    """
    def hook(slot: int) -> Callable[..., None]:
        def fn(module: torch.nn.Module, args: Any, output: Any) -> None:
            on_output(slot, block_output(output))
            if slot == stop_after:
                raise StopForward
        return fn

    handles = [m.register_forward_hook(hook(s)) for s, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_until_captured(model: torch.nn.Module, modules: Sequence[torch.nn.Module], on_output: OnOutput,
                       deepest: int, **inputs: Any) -> None:
    """One forward pass of ``model(**inputs)`` under :func:`capture`, ended after slot ``deepest``."""
    with capture(modules, on_output, stop_after=deepest), torch.inference_mode(), contextlib.suppress(StopForward):
        model(**inputs)
