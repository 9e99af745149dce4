"""Control flow: If, Loop, Scan. Their bodies are nested plans of the module (`ctx.subgraph`).

A kernel receives the node's own inputs followed by the outer-scope values its bodies read (`outer`), and
hands those to the body it runs. Only the taken branch / the iterations run, so gradients flow through
exactly what was computed. Sequence- and optional-typed values are not supported (tensors only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from inhercc.torchrt.ops.common import axis
from inhercc.torchrt.ops.registry import Kernel, NodeContext, register

if TYPE_CHECKING:
    from inhercc.torchrt.module import Body


def _device(values: Sequence[torch.Tensor | None]) -> torch.device:
    """Where the loop's own scalars go: with the first tensor it was given (CPU when none)."""
    for v in values:
        if v is not None:
            return v.device
    return torch.device("cpu")


def _truth(value: torch.Tensor) -> bool:
    return bool(value.reshape(-1)[0].item())


@register("If", since=1, static_inputs=(0,))
def if_(ctx: NodeContext) -> Kernel:
    then_branch = ctx.subgraph("then_branch")
    else_branch = ctx.subgraph("else_branch")
    ctx.require(len(then_branch.output_names) == len(else_branch.output_names), "branches with different output counts")

    def kernel(cond: torch.Tensor, *outer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        branch = then_branch if _truth(cond) else else_branch
        return tuple(branch.run([], outer))

    return kernel


@register("Loop", since=1, static_inputs=(0, 1))
def loop(ctx: NodeContext) -> Kernel:
    body = ctx.subgraph("body")
    n_inputs = len(ctx.inputs)
    carried = n_inputs - 2
    ctx.require(len(body.input_names) == carried + 2, "body inputs do not match the loop's inputs")
    n_scans = len(body.output_names) - 1 - carried
    ctx.require(n_scans >= 0, "body outputs do not match the loop's inputs")
    has_trip_count, has_cond = ctx.has_input(0), ctx.has_input(1)
    ctx.require(has_trip_count or has_cond, "a loop without trip count and condition never ends")

    def kernel(trip_count: torch.Tensor | None, cond: torch.Tensor | None, *rest: torch.Tensor) -> tuple:
        state, outer = list(rest[:carried]), rest[carried:]
        device = _device([*state, *outer])
        limit = int(trip_count.reshape(-1)[0].item()) if has_trip_count else None
        going = _truth(cond) if has_cond else True
        scans: list[list[torch.Tensor]] = [[] for _ in range(n_scans)]
        i = 0
        while going and (limit is None or i < limit):
            out = body.run(
                [torch.tensor(i, dtype=torch.int64, device=device), torch.tensor(going, device=device), *state],
                outer,
            )
            if has_cond:
                going = _truth(out[0])
            state = out[1 : 1 + carried]
            for k, value in enumerate(out[1 + carried :]):
                scans[k].append(value)
            i += 1
        stacked = [torch.stack(s) if s else torch.empty(0, device=device) for s in scans]
        return (*state, *stacked)

    return kernel


def _scan(
    body: Body,
    state: list[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    length: int,
    in_axes: Sequence[int],
    in_dirs: Sequence[int],
    outer: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Run a scan body `length` times; returns the final state and each scan output's values in order."""
    n_state = len(state)
    scans: list[list[torch.Tensor]] = [[] for _ in range(len(body.output_names) - n_state)]
    for t in range(length):
        slices = [x.select(a, length - 1 - t if d else t) for x, a, d in zip(inputs, in_axes, in_dirs)]
        out = body.run([*state, *slices], outer)
        state = out[:n_state]
        for k, value in enumerate(out[n_state:]):
            scans[k].append(value)
    return state, scans


def _stack(values: list[torch.Tensor], out_axis: int, reverse: bool) -> torch.Tensor:
    """A scan output from its per-iteration values (prepended when `reverse`)."""
    if not values:
        return torch.empty(0)
    if reverse:
        values = values[::-1]
    return torch.stack(values, dim=axis(out_axis, values[0].dim() + 1))


@register("Scan", since=9)
def scan(ctx: NodeContext) -> Kernel:
    body = ctx.subgraph("body")
    n_scan_in = ctx.attr("num_scan_inputs")
    n_inputs = len(ctx.inputs)
    n_state = n_inputs - n_scan_in
    n_scan_out = len(body.output_names) - n_state
    ctx.require(n_state >= 0 and n_scan_out >= 0, "body does not match the scan's inputs")
    in_axes = ctx.attr("scan_input_axes", None) or [0] * n_scan_in
    in_dirs = ctx.attr("scan_input_directions", None) or [0] * n_scan_in
    out_axes = ctx.attr("scan_output_axes", None) or [0] * n_scan_out
    out_dirs = ctx.attr("scan_output_directions", None) or [0] * n_scan_out
    ctx.require(len(in_axes) == len(in_dirs) == n_scan_in, "scan input attributes of the wrong length")
    ctx.require(len(out_axes) == len(out_dirs) == n_scan_out, "scan output attributes of the wrong length")

    def kernel(*args: torch.Tensor) -> tuple:
        inputs, outer = args[n_state:n_inputs], args[n_inputs:]
        axes = [axis(a, x.dim()) for a, x in zip(in_axes, inputs)]
        length = inputs[0].shape[axes[0]] if inputs else 0
        state, scans = _scan(body, list(args[:n_state]), inputs, length, axes, in_dirs, outer)
        return (*state, *(_stack(v, a, bool(d)) for v, a, d in zip(scans, out_axes, out_dirs)))

    return kernel


@register("Scan", since=8, until=8)
def scan8(ctx: NodeContext) -> Kernel:
    """Scan-8: a leading batch axis on every input and output, optional per-entry sequence_lens (input 0)."""
    body = ctx.subgraph("body")
    n_scan_in = ctx.attr("num_scan_inputs")
    n_inputs = len(ctx.inputs)
    n_state = n_inputs - 1 - n_scan_in
    ctx.require(n_state >= 0 and len(body.output_names) >= n_state, "body does not match the scan's inputs")
    dirs = ctx.attr("directions", None) or [0] * n_scan_in
    ctx.require(len(dirs) == n_scan_in, "directions of the wrong length")

    def kernel(lens: torch.Tensor | None, *args: torch.Tensor) -> tuple:
        states, inputs, outer = args[:n_state], args[n_state : n_inputs - 1], args[n_inputs - 1 :]
        steps = inputs[0].shape[1] if inputs else 0
        lengths = [steps] * (inputs[0].shape[0] if inputs else 0) if lens is None else lens.tolist()
        finals: list[list[torch.Tensor]] = []
        outputs: list[list[torch.Tensor]] = []
        for b, length in enumerate(lengths):
            state, scans = _scan(
                body, [s[b] for s in states], [x[b] for x in inputs], int(length), [0] * n_scan_in, dirs, outer
            )
            finals.append(state)
            outputs.append([_pad_steps(_stack(v, 0, False), steps) for v in scans])
        return (*(torch.stack(f) for f in zip(*finals)), *(torch.stack(o) for o in zip(*outputs)))

    return kernel


def _pad_steps(value: torch.Tensor, steps: int) -> torch.Tensor:
    """Zero-pad a per-entry scan output to the batch's sequence length."""
    if value.shape[0] == steps:
        return value
    pad = value.new_zeros((steps - value.shape[0], *value.shape[1:]))
    return torch.cat([value, pad])
