"""DAVIS 2017 semi-supervised metrics: region J and boundary F (SPEC §3).

As the davis2017-evaluation toolkit scores them: per object and frame,
J is the IoU (1 when both masks are empty) and F the F-measure of the two
boundaries matched within ceil(0.008 * image diagonal) pixels (boundaries
thinned to one pixel, dilated by a disk). The first and last frames are
not scored; J and F are averaged over the frames of each object, then over
all objects of all sequences; J&F is the mean of the two.
"""

import math

import numpy as np
from scipy import ndimage


def jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
  """IoU of two boolean masks; 1 when their union is empty."""
  gt, pred = gt.astype(bool), pred.astype(bool)
  union = np.logical_or(gt, pred).sum()
  if union == 0:
    return 1.0
  return float(np.logical_and(gt, pred).sum() / union)


def boundary(mask: np.ndarray) -> np.ndarray:
  """One-pixel boundary of a boolean mask: the pixels whose right, lower or
  lower-right neighbour differs (the last row and column compare along the
  border only; the corner is never a boundary)."""
  seg = mask.astype(bool)
  right = np.zeros_like(seg)
  below = np.zeros_like(seg)
  diag = np.zeros_like(seg)
  right[:, :-1] = seg[:, 1:]
  below[:-1, :] = seg[1:, :]
  diag[:-1, :-1] = seg[1:, 1:]
  edge = (seg ^ right) | (seg ^ below) | (seg ^ diag)
  edge[-1, :] = seg[-1, :] ^ right[-1, :]
  edge[:, -1] = seg[:, -1] ^ below[:, -1]
  edge[-1, -1] = False
  return edge


def disk(radius: int) -> np.ndarray:
  """Boolean disk of ``radius`` pixels: x^2 + y^2 <= r^2 on a (2r+1)^2
  grid."""
  r = np.arange(-radius, radius + 1)
  return r[:, None] ** 2 + r[None, :] ** 2 <= radius**2


def tolerance(shape: tuple[int, int], bound_th: float = 0.008) -> int:
  """Boundary match distance in pixels: ceil(bound_th * diagonal)."""
  if bound_th >= 1:
    return int(bound_th)
  return int(math.ceil(bound_th * math.hypot(*shape)))


def f_measure(gt: np.ndarray, pred: np.ndarray, bound_th=0.008) -> float:
  """Boundary F-measure of two boolean masks of one shape."""
  radius = tolerance(gt.shape, bound_th)
  gt_b, pred_b = boundary(gt), boundary(pred)
  struct = disk(radius)
  gt_dil = ndimage.binary_dilation(gt_b, struct)
  pred_dil = ndimage.binary_dilation(pred_b, struct)
  n_gt, n_pred = int(gt_b.sum()), int(pred_b.sum())
  if n_pred == 0 and n_gt == 0:
    precision, recall = 1.0, 1.0
  elif n_pred == 0:
    precision, recall = 1.0, 0.0
  elif n_gt == 0:
    precision, recall = 0.0, 1.0
  else:
    precision = float((pred_b & gt_dil).sum() / n_pred)
    recall = float((gt_b & pred_dil).sum() / n_gt)
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


def sequence_scores(gt: np.ndarray, pred: np.ndarray) -> dict:
  """Per-object mean J and F of one sequence.

  Args:
    gt: int [T, H, W] annotations (0 background, 1..n objects; n is the
      first frame's largest id).
    pred: int [T, H, W] predicted labels.

  Returns:
    {'J': [n floats], 'F': [n floats]}: each object's mean over frames
    1 .. T - 2 (the first and last are not scored).
  """
  if gt.shape != pred.shape:
    raise ValueError(f'shapes differ: gt {gt.shape}, prediction {pred.shape}')
  n = int(gt[0].max())
  scored = range(1, gt.shape[0] - 1)
  j_means, f_means = [], []
  for obj in range(1, n + 1):
    js = [jaccard(gt[t] == obj, pred[t] == obj) for t in scored]
    fs = [f_measure(gt[t] == obj, pred[t] == obj) for t in scored]
    j_means.append(float(np.mean(js)) if js else float('nan'))
    f_means.append(float(np.mean(fs)) if fs else float('nan'))
  return {'J': j_means, 'F': f_means}


def summarize(per_sequence: dict) -> dict:
  """{'J', 'F', 'J&F'}: means over all objects of all sequences."""
  js = [j for s in per_sequence.values() for j in s['J']]
  fs = [f for s in per_sequence.values() for f in s['F']]
  j = float(np.nanmean(js)) if js else float('nan')
  f = float(np.nanmean(fs)) if fs else float('nan')
  return {'J': j, 'F': f, 'J&F': (j + f) / 2}
