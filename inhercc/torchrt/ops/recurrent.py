"""Recurrent layers: LSTM, GRU, RNN (all directions, sequence_lens, initial states, layout, activations).

Written as plain torch ops per time step so gradients reach every weight (W, R, B, P) and input: the input
projection of all time steps is one matmul, then each step adds the recurrent projection and applies the
gates. With `sequence_lens`, a batch entry's state stops changing after its last step (the reverse
direction starts at its last valid step) and its `Y` rows past its length are zero, as ONNX Runtime does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inhercc.torchrt.ops.registry import Kernel, NodeContext, Unsupported, one_of, register

Activation = Callable[[torch.Tensor], torch.Tensor]
_DIRECTIONS = ("forward", "reverse", "bidirectional")


def _make_activation(name: str, alpha: float | None, beta: float | None) -> Activation:
    """One of the activation functions the ONNX RNN specs list (names are case-insensitive)."""
    key = name.lower()
    if key == "relu":
        return torch.relu
    if key == "tanh":
        return torch.tanh
    if key == "sigmoid":
        return torch.sigmoid
    if key == "affine":
        a, b = 1.0 if alpha is None else alpha, 0.0 if beta is None else beta
        return lambda x: a * x + b
    if key == "leakyrelu":
        a = 0.01 if alpha is None else alpha
        return lambda x: F.leaky_relu(x, a)
    if key == "thresholdedrelu":
        a = 1.0 if alpha is None else alpha
        return lambda x: torch.where(x > a, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if key == "scaledtanh":
        a, b = 1.0 if alpha is None else alpha, 1.0 if beta is None else beta
        return lambda x: a * torch.tanh(b * x)
    if key == "hardsigmoid":
        a, b = 0.2 if alpha is None else alpha, 0.5 if beta is None else beta
        return lambda x: torch.clamp(a * x + b, 0.0, 1.0)
    if key == "elu":
        a = 1.0 if alpha is None else alpha
        return lambda x: F.elu(x, a)
    if key == "softsign":
        return F.softsign
    if key == "softplus":
        return F.softplus
    raise Unsupported(f"activation {name!r}")


# Activations that read alpha / beta from activation_alpha / activation_beta (in list order).
_USES_ALPHA = {"affine", "leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu"}
_USES_BETA = {"affine", "scaledtanh", "hardsigmoid"}


def _activations(ctx: NodeContext, defaults: Sequence[str], directions: int) -> list[list[Activation]]:
    """The activation functions per direction; alpha/beta are consumed in order by the functions that
    take them (as ONNX Runtime reads them)."""
    names = ctx.attr("activations", None) or list(defaults) * directions
    alphas = list(ctx.attr("activation_alpha", None) or [])
    betas = list(ctx.attr("activation_beta", None) or [])
    per = len(defaults)
    if len(names) != per * directions:
        if len(names) == per and directions == 2:
            names = names * 2
        else:
            raise Unsupported(f"{len(names)} activations for {directions} direction(s) of {per}")
    funcs = []
    for name in names:
        key = name.lower()
        alpha = alphas.pop(0) if key in _USES_ALPHA and alphas else None
        beta = betas.pop(0) if key in _USES_BETA and betas else None
        funcs.append(_make_activation(name, alpha, beta))
    return [funcs[d * per : (d + 1) * per] for d in range(directions)]


@dataclass(frozen=True)
class _Config:
    """What the three ops share: direction, hidden size, clip, layout, activations per direction."""

    directions: int
    reverse_only: bool
    hidden: int
    clip: float | None
    layout: int
    acts: list[list[Activation]]

    @staticmethod
    def parse(ctx: NodeContext, default_acts: Sequence[str]) -> _Config:
        direction = one_of(ctx, "direction", "forward", _DIRECTIONS)
        directions = 2 if direction == "bidirectional" else 1
        layout = ctx.attr("layout", 0) if ctx.version >= 14 else 0
        ctx.require(layout in (0, 1), f"layout={layout}")
        return _Config(
            directions=directions,
            reverse_only=direction == "reverse",
            hidden=ctx.attr("hidden_size"),
            clip=ctx.attr("clip", None),
            layout=layout,
            acts=_activations(ctx, default_acts, directions),
        )

    def clipped(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip is None else torch.clamp(x, -self.clip, self.clip)


Step = Callable[[torch.Tensor, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


def _run_direction(
    xs: torch.Tensor, step: Step, state: tuple[torch.Tensor, ...], lens: torch.Tensor | None, reverse: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Apply `step` over time (xs: [T, B, ...] precomputed input projections); returns Y [T, B, H] and the
    final state. State entry 0 is the hidden state written to Y."""
    steps = xs.shape[0]
    ys: list[torch.Tensor | None] = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        new = step(xs[t], state)
        if lens is None:
            state = new
            ys[t] = new[0]
        else:
            mask = (lens > t).unsqueeze(-1)
            state = tuple(torch.where(mask, n, o) for n, o in zip(new, state))
            ys[t] = torch.where(mask, new[0], torch.zeros((), dtype=new[0].dtype, device=new[0].device))
    if steps == 0:
        return xs.new_zeros((0, *state[0].shape)), state
    return torch.stack(ys), state  # type: ignore[arg-type]


def _to_time_major(cfg: _Config, x: torch.Tensor, *states: torch.Tensor | None) -> list[torch.Tensor | None]:
    """layout=1 inputs ([batch, seq, ...], states [batch, dirs, hidden]) in layout 0's order."""
    if cfg.layout == 0:
        return [x, *states]
    return [x.transpose(0, 1), *(None if s is None else s.transpose(0, 1) for s in states)]


def _from_time_major(cfg: _Config, y: torch.Tensor, *finals: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Y [seq, dirs, batch, hidden] and final states [dirs, batch, hidden] in the node's layout."""
    if cfg.layout == 0:
        return (y, *finals)
    return (y.permute(2, 0, 1, 3), *(f.transpose(0, 1) for f in finals))


def _initial(state: torch.Tensor | None, d: int, x: torch.Tensor, hidden: int) -> torch.Tensor:
    if state is not None:
        return state[d]
    return x.new_zeros((x.shape[1], hidden))


def _recurrent(
    cfg: _Config,
    gates: int,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    lens: torch.Tensor | None,
    states: Sequence[torch.Tensor | None],
    make_step: Callable[[int, torch.Tensor | None], Step],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The shared driver: per direction, project the inputs, run the steps; returns Y [T, dirs, B, H] and
    the final states stacked over directions (one per state entry)."""
    hidden = cfg.hidden
    if lens is not None:
        lens = lens.to(device=x.device, dtype=torch.int64)
    ys, finals = [], []
    for d in range(cfg.directions):
        xw = torch.matmul(x, w[d].transpose(0, 1))
        if b is not None:
            xw = xw + b[d, : gates * hidden]
        state = tuple(_initial(s, d, x, hidden) for s in states)
        reverse = d == 1 or cfg.reverse_only
        rb = None if b is None else b[d, gates * hidden :]
        y, final = _run_direction(xw, make_step(d, rb), state, lens, reverse)
        ys.append(y)
        finals.append(final)
    y = torch.stack(ys, dim=1)
    stacked = [torch.stack([f[i] for f in finals]) for i in range(len(states))]
    return y, stacked


@register("RNN", since=7)
def rnn(ctx: NodeContext) -> Kernel:
    cfg = _Config.parse(ctx, ("Tanh",))

    def kernel(
        x: torch.Tensor,
        w: torch.Tensor,
        r: torch.Tensor,
        b: torch.Tensor | None = None,
        lens: torch.Tensor | None = None,
        h0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, h0 = _to_time_major(cfg, x, h0)

        def make_step(d: int, rb: torch.Tensor | None) -> Step:
            f = cfg.acts[d][0]
            rt = r[d].transpose(0, 1)

            def step(xt: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                pre = xt + torch.matmul(state[0], rt)
                if rb is not None:
                    pre = pre + rb
                return (f(cfg.clipped(pre)),)

            return step

        y, (h,) = _recurrent(cfg, 1, x, w, b, lens, [h0], make_step)
        return _from_time_major(cfg, y, h)  # type: ignore[return-value]

    return kernel


@register("GRU", since=7)
def gru(ctx: NodeContext) -> Kernel:
    cfg = _Config.parse(ctx, ("Sigmoid", "Tanh"))
    linear_before_reset = bool(ctx.attr("linear_before_reset", 0))
    hidden = cfg.hidden

    def kernel(
        x: torch.Tensor,
        w: torch.Tensor,
        r: torch.Tensor,
        b: torch.Tensor | None = None,
        lens: torch.Tensor | None = None,
        h0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, h0 = _to_time_major(cfg, x, h0)

        def make_step(d: int, rb: torch.Tensor | None) -> Step:
            f, g = cfg.acts[d]
            r_zr = r[d, : 2 * hidden].transpose(0, 1)
            r_h = r[d, 2 * hidden :].transpose(0, 1)
            rb_zr = None if rb is None else rb[: 2 * hidden]
            rb_h = None if rb is None else rb[2 * hidden :]

            def step(xt: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                h = state[0]
                zr = xt[:, : 2 * hidden] + torch.matmul(h, r_zr)
                if rb_zr is not None:
                    zr = zr + rb_zr
                zr = f(cfg.clipped(zr))
                z, reset = zr[:, :hidden], zr[:, hidden:]
                if linear_before_reset:
                    rec = torch.matmul(h, r_h)
                    if rb_h is not None:
                        rec = rec + rb_h
                    pre = xt[:, 2 * hidden :] + reset * rec
                else:
                    pre = xt[:, 2 * hidden :] + torch.matmul(reset * h, r_h)
                    if rb_h is not None:
                        pre = pre + rb_h
                candidate = g(cfg.clipped(pre))
                return ((1 - z) * candidate + z * h,)

            return step

        y, (h,) = _recurrent(cfg, 3, x, w, b, lens, [h0], make_step)
        return _from_time_major(cfg, y, h)  # type: ignore[return-value]

    return kernel


@register("LSTM", since=7)
def lstm(ctx: NodeContext) -> Kernel:
    cfg = _Config.parse(ctx, ("Sigmoid", "Tanh", "Tanh"))
    input_forget = bool(ctx.attr("input_forget", 0))
    hidden = cfg.hidden

    def kernel(
        x: torch.Tensor,
        w: torch.Tensor,
        r: torch.Tensor,
        b: torch.Tensor | None = None,
        lens: torch.Tensor | None = None,
        h0: torch.Tensor | None = None,
        c0: torch.Tensor | None = None,
        p: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, h0, c0 = _to_time_major(cfg, x, h0, c0)

        def make_step(d: int, rb: torch.Tensor | None) -> Step:
            f, g, act_h = cfg.acts[d]
            rt = r[d].transpose(0, 1)
            p_i = p_o = p_f = None
            if p is not None:
                p_i, p_o, p_f = p[d, :hidden], p[d, hidden : 2 * hidden], p[d, 2 * hidden :]

            def step(xt: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                h, c = state
                pre = xt + torch.matmul(h, rt)
                if rb is not None:
                    pre = pre + rb
                pre_i, pre_o, pre_f, pre_c = pre.split(hidden, dim=1)
                if p_i is not None:
                    pre_i = pre_i + p_i * c
                    pre_f = pre_f + p_f * c
                i = f(cfg.clipped(pre_i))
                forget = 1 - i if input_forget else f(cfg.clipped(pre_f))
                c_new = forget * c + i * g(cfg.clipped(pre_c))
                if p_o is not None:
                    pre_o = pre_o + p_o * c_new
                o = f(cfg.clipped(pre_o))
                return o * act_h(c_new), c_new

            return step

        y, (h, c) = _recurrent(cfg, 4, x, w, b, lens, [h0, c0], make_step)
        return _from_time_major(cfg, y, h, c)  # type: ignore[return-value]

    return kernel
