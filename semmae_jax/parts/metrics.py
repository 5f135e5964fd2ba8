"""Agreement of predicted parts with ground-truth part maps, on the patch grid.

Both sides are per-patch labels [N, L]: the ground truth reduced by majority vote, as the
pretraining pipeline reduces part maps (-1 = unlabelled: ignored), and predicted ids >= 0
(a background part is an id like the others). Predicted ids need not mean anything: the
scores are invariant to renaming them.

* mIoU after Hungarian matching: one matching for the whole set (scipy's
  `linear_sum_assignment` on the IoU matrix), so a part must mean the same thing in every
  image to score; the mean runs over the true parts, an unmatched one counting 0.
* ARI (sklearn's `adjusted_rand_score`) over all patches of the set pooled, which also
  asks the ids to be consistent across images; and its mean over images, which asks
  only each image's grouping to be right.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score


class PartScores(NamedTuple):
    miou: float
    ari: float
    ari_per_image: float
    iou: tuple[float, ...]  # per true part, after matching
    matching: tuple[int, ...]  # the predicted id matched to each true part (-1: none)


def _labelled(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"predicted labels {pred.shape} and true labels {true.shape} differ in shape")
    if pred.size and pred.min() < 0:
        raise ValueError("predicted part ids must be >= 0 (give a background part an id of its own)")
    keep = true >= 0
    return pred[keep].astype(np.int64), true[keep].astype(np.int64)


def confusion(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Counts [predicted id, true id] over the labelled positions."""
    pred, true = _labelled(pred, true)
    counts = np.zeros((pred.max(initial=0) + 1, true.max(initial=0) + 1), np.int64)
    np.add.at(counts, (pred, true), 1)
    return counts


def hungarian_iou(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU per true id, matched predicted id per true id or -1) under the IoU-maximising one-to-one matching."""
    counts = confusion(pred, true)
    union = counts.sum(axis=1, keepdims=True) + counts.sum(axis=0, keepdims=True) - counts
    iou = counts / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    per_true, matched = np.zeros(counts.shape[1]), np.full(counts.shape[1], -1)
    per_true[cols], matched[cols] = iou[rows, cols], rows
    return per_true, matched


def part_scores(pred: np.ndarray, true: np.ndarray) -> PartScores:
    """All the scores of predicted per-patch part ids [N, L] against the true ones [N, L]."""
    iou, matched = hungarian_iou(pred, true)
    pooled_pred, pooled_true = _labelled(pred, true)
    per_image = [adjusted_rand_score(t, p) for p, t in (_labelled(p, t) for p, t in zip(pred, true, strict=True))
                 if t.size]
    return PartScores(
        miou=float(iou.mean()),
        ari=float(adjusted_rand_score(pooled_true, pooled_pred)),
        ari_per_image=float(np.mean(per_image)),
        iou=tuple(float(x) for x in iou),
        matching=tuple(int(x) for x in matched),
    )
