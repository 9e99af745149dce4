"""Detector post-processing: NonMaxSuppression.

Data-dependent and not differentiable, so it runs in numpy on the host, following ONNX's reference
(greedy per batch and class, score order with ties to the lower index, suppression when IoU > threshold).
"""

from __future__ import annotations

import numpy as np
import torch

from inhercc.torchrt.dtypes import to_numpy
from inhercc.torchrt.ops.common import scalar
from inhercc.torchrt.ops.registry import Kernel, NodeContext, register


def _corners(boxes: np.ndarray, center_point_box: int) -> np.ndarray:
    """(y_min, x_min, y_max, x_max) per box, from corner pairs in any order or from centre/size."""
    if center_point_box:
        x, y, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2] / 2, boxes[:, 3] / 2
        return np.stack([y - h, x - w, y + h, x + w], 1)
    y = np.sort(boxes[:, [0, 2]], 1)
    x = np.sort(boxes[:, [1, 3]], 1)
    return np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], 1)


def _iou(corners: np.ndarray) -> np.ndarray:
    """Pairwise IoU; 0 where boxes do not overlap or an area is not positive (never suppresses)."""
    y0, x0, y1, x1 = (corners[:, i] for i in range(4))
    height = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
    width = np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None])
    inter = np.where((height > 0) & (width > 0), height * width, 0)
    area = (y1 - y0) * (x1 - x0)
    union = area[:, None] + area[None] - inter
    valid = (inter > 0) & (area[:, None] > 0) & (area[None] > 0) & (union > 0)
    return np.where(valid, inter / np.where(union > 0, union, 1), 0)


@register("NonMaxSuppression", since=10)
def non_max_suppression(ctx: NodeContext) -> Kernel:
    center_point_box = ctx.attr("center_point_box", 0)

    def kernel(
        boxes: torch.Tensor,
        scores: torch.Tensor,
        max_per_class: torch.Tensor | None = None,
        iou_threshold: torch.Tensor | None = None,
        score_threshold: torch.Tensor | None = None,
    ) -> torch.Tensor:
        limit = 0 if max_per_class is None or max_per_class.numel() == 0 else max(int(scalar(max_per_class)), 0)
        iou_limit = 0.0 if iou_threshold is None or iou_threshold.numel() == 0 else float(scalar(iou_threshold))
        has_floor = score_threshold is not None and score_threshold.numel() > 0
        floor = float(scalar(score_threshold)) if has_floor else 0.0
        all_boxes, all_scores = to_numpy(boxes), to_numpy(scores)
        selected: list[tuple[int, int, int]] = []
        for b in range(all_boxes.shape[0]):
            iou = _iou(_corners(all_boxes[b], center_point_box))
            for c in range(all_scores.shape[1]):
                class_scores = all_scores[b, c]
                candidates = np.flatnonzero(class_scores > floor) if has_floor else np.arange(len(class_scores))
                order = candidates[np.argsort(-class_scores[candidates], kind="stable")]
                kept: list[int] = []
                for i in order:
                    if len(kept) >= limit:
                        break
                    if all(iou[i, j] <= iou_limit for j in kept):
                        kept.append(int(i))
                        selected.append((b, c, int(i)))
        out = np.array(selected, dtype=np.int64).reshape(-1, 3)
        return torch.from_numpy(out).to(boxes.device)

    return kernel
