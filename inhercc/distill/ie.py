"""IE-KD (Huang et al., CVPR 2021): inheritance and exploration losses on one feature tensor.

A "factor" auto-encoder is trained on the teacher's feature (L1 reconstruction), then frozen: its encoder
turns the teacher's feature into the factor ``φ_T``. The student's feature channels are split in two — an
inheritance part and an exploration part (fixed halves, or a seeded permutation) —, each with its own
trainable encoder of the same architecture (``φ_I``, ``φ_E``). The loss added to the KD/CE objective is

    w_inh · mean|n(φ_T) − n(φ_I)|  −  w_exp · mean|n(φ_T) − n(φ_E)|          (``explore="l1"``)
    w_inh · mean|n(φ_T) − n(φ_I)|  +  w_exp · mean_samples |cos(φ_T, φ_E)|   (``explore="cos"``)

with ``n()`` the per-sample L2 normalization of the flattened factor, scaled by √D so each normalized factor
has unit RMS (plain unit norm makes the terms shrink as 1/√D: about 0.02 on a 32×7×7 factor, invisible beside
KD, so weights of 1 did nothing), and the means over every element (the L1 form) or every sample (the cosine
form). The first form pushes the exploration factor away from the teacher's (bounded: at most 2 per element
on average), the second toward orthogonal. The encoders exist only in training: the exported student is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import ModelProto, numpy_helper
from torch import nn

from inhercc.distill.config import DistillConfig
from inhercc.distill.features import norm_outputs
from inhercc.errors import InherccError
from inhercc.verify import token_mask

FACTOR_CHANNELS = 32
AE_LR = 1e-3
_FIELD = "`distill.ie_feature`"


# -- the losses ---------------------------------------------------------------------------------------------


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``n(x)``: each sample flattened (``[batch, D]``) and scaled to L2 norm √D, i.e. unit RMS (an all-zero
    sample stays 0), so the IE terms do not shrink with the factor's size."""
    flat = x.float().reshape(x.shape[0], -1)
    return F.normalize(flat, p=2, dim=1, eps=1e-12) * flat.shape[1] ** 0.5


def ie_terms(
    teacher: torch.Tensor, inherit: torch.Tensor, explore: torch.Tensor, form: str = "l1"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inheritance term ``mean|n(φ_T) − n(φ_I)|`` and the exploration term: ``mean|n(φ_T) − n(φ_E)|``
    (``form="l1"``) or ``mean over samples of |cos(φ_T, φ_E)|`` (``form="cos"``), both unweighted."""
    nt, ni, ne = l2_normalize(teacher), l2_normalize(inherit), l2_normalize(explore)
    inh = (nt - ni).abs().mean()
    exp = (nt * ne).mean(1).abs().mean() if form == "cos" else (nt - ne).abs().mean()
    return inh, exp


def ie_loss(
    teacher: torch.Tensor,
    inherit: torch.Tensor,
    explore: torch.Tensor,
    *,
    inherit_weight: float = 1.0,
    explore_weight: float = 1.0,
    explore_form: str = "l1",
) -> tuple[torch.Tensor, dict[str, float]]:
    """``w_inh·inherit − w_exp·explore`` (L1 form: the exploration factor pushed away from the teacher's) or
    ``w_inh·inherit + w_exp·|cos|`` (cosine form: pushed toward orthogonal); and the two terms as floats."""
    inh, exp = ie_terms(teacher, inherit, explore, explore_form)
    sign = 1.0 if explore_form == "cos" else -1.0
    total = inherit_weight * inh + sign * explore_weight * exp
    return total, {"ie_inherit": float(inh.detach()), "ie_explore": float(exp.detach())}


def split_channels(channels: int, how: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inheritance and exploration channel indices: the first ``channels // 2`` and the rest
    (``half``), or the same sizes drawn from a permutation seeded by ``seed`` (``random``)."""
    if channels < 2:
        raise InherccError(f"{_FIELD}: the student's feature has {channels} channel(s); the split needs at least 2")
    if how == "random":
        order = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(channels)
    k = channels // 2
    return order[:k].clone(), order[k:].clone()


# -- the encoders -------------------------------------------------------------------------------------------


def _coder(widths: list[int], spatial: bool, plain_last: bool = False) -> nn.Sequential:
    """Layers ``widths[0] → widths[1] → …``: 3×3 conv + BatchNorm + LeakyReLU(0.1) (``spatial``, channels on
    axis 1) or Linear + LayerNorm + LeakyReLU(0.1) (channels last). ``plain_last``: the last layer a bare conv /
    linear with a bias, so that a decoder can reproduce signed values of any scale."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(widths, widths[1:])):
        last = plain_last and k == len(widths) - 2
        if spatial:
            layers.append(nn.Conv2d(a, b, 3, padding=1, bias=last))
        else:
            layers.append(nn.Linear(a, b, bias=last))
        if not last:
            layers += [nn.BatchNorm2d(b) if spatial else nn.LayerNorm(b), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


def factor_encoder(channels: int, spatial: bool, factor: int = FACTOR_CHANNELS) -> nn.Sequential:
    """Three layers ``channels → channels → factor → factor`` (see :func:`_coder`): the factor encoder."""
    return _coder([channels, channels, factor, factor], spatial)


class FactorAutoEncoder(nn.Module):
    """The teacher's factor auto-encoder: :func:`factor_encoder` and the mirrored decoder (its last layer
    plain). Inputs are divided by ``scale`` (the RMS of the first training batch), so one learning rate fits
    features of any magnitude."""

    def __init__(self, channels: int, spatial: bool) -> None:
        super().__init__()
        self.encoder = factor_encoder(channels, spatial)
        self.decoder = _coder([FACTOR_CHANNELS, FACTOR_CHANNELS, channels, channels], spatial, plain_last=True)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factor and the reconstruction of ``x / scale``."""
        factor = self.encoder(x / self.scale)
        return factor, self.decoder(factor)


# -- which feature ------------------------------------------------------------------------------------------


def _reduce_axes(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> set[int] | None:
    """The axes of a ReduceMean (attribute before opset 18, a constant input after), None when unknown."""
    for a in node.attribute:
        if a.name == "axes":
            return set(a.ints)
    if len(node.input) > 1 and node.input[1] in constants:
        return {int(v) for v in constants[node.input[1]].reshape(-1)}
    return None


def global_pool_inputs(model: ModelProto) -> list[str]:
    """Inputs of the global average poolings, in graph order: ``GlobalAveragePool`` and ``ReduceMean`` over the
    spatial axes of an NCHW tensor (axes {2, 3} or {-2, -1})."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value":
            constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    out = []
    for n in model.graph.node:
        if n.op_type == "GlobalAveragePool" or (
            n.op_type == "ReduceMean" and _reduce_axes(n, constants) in ({2, 3}, {-2, -1})
        ):
            out.append(n.input[0])
    return out


def _computed(model: ModelProto) -> set[str]:
    """Tensors computed by a node of ``model``, its graph outputs left out."""
    graph_out = {o.name for o in model.graph.output}
    return {o for n in model.graph.node for o in n.output if o and o not in graph_out}


def default_ie_feature(student: ModelProto, teacher: ModelProto) -> str:
    """The input of the student's last global pooling that the teacher computes too (a CNN's last feature map; a
    gated-heads pooling reads a bottleneck the teacher lacks, so it is passed over), else the last such
    normalization output (a transformer's final hidden state)."""
    both = _computed(student) & _computed(teacher)
    for found, where in (
        (global_pool_inputs(student), "the input of a global pooling"),
        (norm_outputs(student), "a normalization output"),
    ):
        shared = [name for name in found if name in both]
        if shared:
            return shared[-1]
        if found:
            raise InherccError(f"{_FIELD}: no {where} of the student is computed by the teacher too; name a tensor")
    raise InherccError(f"{_FIELD}: the student has no global pooling nor normalization; name a tensor")


def resolve_ie_feature(student: ModelProto, teacher: ModelProto, name: str | None) -> str:
    """``name`` checked to be computed by both graphs (not a graph output), or :func:`default_ie_feature`."""
    if name is None:
        return default_ie_feature(student, teacher)
    if name not in _computed(student) or name not in _computed(teacher):
        raise InherccError(f"{_FIELD} {name!r} is not a tensor computed by both the student and the teacher")
    return name


# -- the training-time module -------------------------------------------------------------------------------


def _first_last(values: list[float]) -> dict[str, float | None]:
    return {"first": values[0] if values else None, "last": values[-1] if values else None}


class IEKD(nn.Module):
    """The frozen teacher auto-encoder, the student's two trainable encoders and the channel split, for one
    feature tensor (rank 4: NCHW, conv encoders; rank 2 or 3: channels last, linear encoders)."""

    def __init__(
        self,
        feature: str,
        teacher_shape: tuple[int, ...],
        student_shape: tuple[int, ...],
        cfg: DistillConfig,
    ) -> None:
        super().__init__()
        if len(teacher_shape) != len(student_shape) or len(teacher_shape) not in (2, 3, 4):
            raise InherccError(
                f"{_FIELD} {feature!r}: shapes {list(student_shape)} (student) and {list(teacher_shape)} (teacher); "
                "IE-KD takes [batch, C, H, W], [batch, seq, C] or [batch, C] features of the same rank"
            )
        self.feature, self.spatial = feature, len(teacher_shape) == 4
        self.axis = 1 if self.spatial else -1
        others = [k for k in range(1, len(teacher_shape)) if k != self.axis % len(teacher_shape)]
        if any(teacher_shape[k] != student_shape[k] for k in others):
            raise InherccError(
                f"{_FIELD} {feature!r}: shapes {list(student_shape)} (student) and {list(teacher_shape)} (teacher); "
                "all dims but the channels must agree"
            )
        self.channels = {"student": int(student_shape[self.axis]), "teacher": int(teacher_shape[self.axis])}
        self.split, self.form = cfg.ie_split, cfg.ie_explore
        self.weights = (cfg.ie_inherit_weight, cfg.ie_explore_weight)
        inh, exp = split_channels(self.channels["student"], cfg.ie_split, cfg.seed)
        self.register_buffer("inherit_idx", inh)
        self.register_buffer("explore_idx", exp)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.teacher_ae = FactorAutoEncoder(self.channels["teacher"], self.spatial)
            self.encoders = nn.ModuleDict(
                {"inherit": factor_encoder(len(inh), self.spatial), "explore": factor_encoder(len(exp), self.spatial)}
            )
        self.ae_l1: list[float] = []
        self.terms: dict[str, list[float]] = {"inherit": [], "explore": []}

    def _masked(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Padding tokens of a per-token tensor set to 0 (out of n() and of the differences)."""
        w = token_mask(x.shape, mask) if not self.spatial else None
        return x if w is None else x * w.to(x.dtype)

    def train_teacher_ae(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], steps: int) -> None:
        """``steps`` Adam steps of L1 reconstruction on the teacher's feature batches, then frozen (eval mode,
        no gradients): its weights and BatchNorm statistics never change again."""
        ae = self.teacher_ae
        ae.train()
        opt = torch.optim.Adam(ae.parameters(), lr=AE_LR)
        for k, (feat, mask) in enumerate(batches):
            if k >= steps:
                break
            feat = feat.float()
            if k == 0:
                ae.scale.fill_(float(feat.pow(2).mean().sqrt().clamp_min(1e-12)))
            _, rec = ae(feat)
            loss = (self._masked(rec, mask) - self._masked(feat / ae.scale, mask)).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.ae_l1.append(float(loss.detach()))
        self.freeze()

    def freeze(self) -> None:
        """The teacher auto-encoder fixed: eval mode, no gradients."""
        self.teacher_ae.eval()
        self.teacher_ae.requires_grad_(False)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The IE loss for a batch of student and teacher features (see :func:`ie_loss`), its terms recorded."""
        with torch.no_grad():
            phi_t = self.teacher_ae.encoder(teacher.float() / self.teacher_ae.scale)
        student = student.float()
        phi_i = self.encoders["inherit"](student.index_select(self.axis, self.inherit_idx))
        phi_e = self.encoders["explore"](student.index_select(self.axis, self.explore_idx))
        if phi_i.shape != phi_t.shape:
            raise InherccError(
                f"{_FIELD} {self.feature!r}: the student's factor is {list(phi_i.shape)} and the teacher's "
                f"{list(phi_t.shape)}; their batch and spatial (token) dims must agree"
            )
        phi_t, phi_i, phi_e = (self._masked(p, mask) for p in (phi_t, phi_i, phi_e))
        total, parts = ie_loss(
            phi_t,
            phi_i,
            phi_e,
            inherit_weight=self.weights[0],
            explore_weight=self.weights[1],
            explore_form=self.form,
        )
        self.terms["inherit"].append(parts["ie_inherit"])
        self.terms["explore"].append(parts["ie_explore"])
        return total, parts

    def report(self) -> dict[str, Any]:
        """The report's ``training.ie`` entry: what was compared, how, and the terms first and last."""
        inh, exp = len(self.inherit_idx), len(self.explore_idx)
        return {
            "feature": self.feature,
            "channels": {**self.channels, "inherit": inh, "explore": exp},
            "split": self.split,
            "explore_form": self.form,
            "weights": {"inherit": self.weights[0], "explore": self.weights[1]},
            "ae_steps": len(self.ae_l1),
            "ae_l1": _first_last(self.ae_l1),
            "inherit": _first_last(self.terms["inherit"]),
            "explore": _first_last(self.terms["explore"]),
            "encoder_params": int(sum(p.numel() for p in self.encoders.parameters())),
        }
