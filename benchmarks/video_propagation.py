"""DAVIS label propagation, seconds per frame: dino_jax vs the official code.

  python benchmarks/video_propagation.py            # ViT-S/16 at 480x832
  python benchmarks/video_propagation.py --grid 60 104 --repeats 3  # S/8

Both sides get the same random features (a grid of patch tokens, 384-d by
default), the first frame's one-hot labels and ``n_last_frames`` previous
soft predictions, so every frame after the 8th has a full context of 8;
that steady state is what is timed. The official ``label_propagation`` is
loaded by path from ``$DINO_OFFICIAL_REPO`` or ``../shared/official-dino``
(its neighbourhood mask built once, as it caches it, and timed apart);
dino_jax's ``propagate`` is jitted (compiled before timing) and its result
awaited. Feature extraction is outside both timings. Prints one JSON line
and the ratio.
"""

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--grid', type=int, nargs=2, default=(30, 52), help='h w')
  p.add_argument('--dim', type=int, default=384)
  p.add_argument('--classes', type=int, default=4, help='labels incl. bg')
  p.add_argument('--n_last_frames', type=int, default=7)
  p.add_argument('--size_mask_neighborhood', type=int, default=12)
  p.add_argument('--topk', type=int, default=5)
  p.add_argument('--repeats', type=int, default=5, help='timed frames')
  p.add_argument(
    '--official_repo',
    default=os.environ.get(
      'DINO_OFFICIAL_REPO',
      os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino'),
    ),
  )
  p.add_argument('--skip_official_mask', action='store_true')
  args = p.parse_args(argv)
  for name in ('dim', 'classes', 'topk', 'repeats'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be >= 1; got {getattr(args, name)}')
  if min(args.grid) < 1:
    p.error(f'--grid must be positive; got {args.grid}')
  path = os.path.join(args.official_repo, 'eval_video_segmentation.py')
  if not os.path.isfile(path):
    p.error(f'no eval_video_segmentation.py in {args.official_repo}')
  return args


def load_official(repo: str):
  """The official module by path; cv2 / torchvision stubbed where absent
  (nothing timed here uses them), .cuda() a no-op."""
  import torch

  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import convergence

  convergence._stub_torchvision()
  try:
    import cv2  # noqa: F401
  except ImportError:
    sys.modules['cv2'] = types.ModuleType('cv2')
  if repo not in sys.path:
    sys.path.insert(0, repo)
  path = os.path.join(repo, 'eval_video_segmentation.py')
  spec = importlib.util.spec_from_file_location('official_video', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  torch.Tensor.cuda = lambda self, *a, **k: self
  return module


class _Model:
  def __init__(self, tokens, patch):
    self.tokens = tokens
    self.patch_embed = types.SimpleNamespace(patch_size=patch)

  def get_intermediate_layers(self, x, n=1):
    import torch

    cls = torch.zeros(1, self.tokens.shape[1])
    return [torch.cat([cls, self.tokens])[None]]


def main(argv=None):
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from dino_jax.evaluation import video

  h, w = args.grid
  n, d, c = h * w, args.dim, args.classes
  k = 1 + args.n_last_frames
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(k, n, d)).astype(np.float32)
  target = rng.normal(size=(n, d)).astype(np.float32)
  segs = rng.random((k, n, c)).astype(np.float32)
  segs[0] = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
  size = args.size_mask_neighborhood

  # dino_jax: mask once (vectorised), then the jitted propagation.
  start = time.perf_counter()
  mask = video.neighborhood_mask(h, w, size).block_until_ready()
  jax_mask_s = time.perf_counter() - start
  inputs = [jnp.asarray(x) for x in (target, feats, segs)]
  got = video.propagate(*inputs, mask, args.topk).block_until_ready()
  start = time.perf_counter()
  for _ in range(args.repeats):
    video.propagate(*inputs, mask, args.topk).block_until_ready()
  jax_s = (time.perf_counter() - start) / args.repeats

  official = load_official(args.official_repo)
  official.args = argparse.Namespace(
    size_mask_neighborhood=size, topk=args.topk
  )
  official_mask_s = None
  if args.skip_official_mask:
    torch_mask = torch.from_numpy(np.asarray(mask))[None]
  else:
    start = time.perf_counter()
    torch_mask = official.restrict_neighborhood(h, w)[None]
    official_mask_s = time.perf_counter() - start
  patch = 16
  model = _Model(torch.from_numpy(target), patch)
  frame = torch.zeros(3, h * patch, w * patch)
  list_feats = [torch.from_numpy(f).T for f in feats]
  list_segs = [torch.from_numpy(s.T.reshape(1, c, h, w).copy()) for s in segs]
  with torch.no_grad():
    official.label_propagation(
      official.args, model, frame, list_feats, list_segs, torch_mask
    )
    start = time.perf_counter()
    for _ in range(args.repeats):
      want = official.label_propagation(
        official.args, model, frame, list_feats, list_segs, torch_mask
      )[0]
    official_s = (time.perf_counter() - start) / args.repeats
  want = want[0].reshape(c, n).T.numpy()
  row = {
    'grid': [h, w],
    'dim': d,
    'context': k,
    'topk': args.topk,
    'size_mask_neighborhood': size,
    'jax_sec_per_frame': jax_s,
    'official_sec_per_frame': official_s,
    'official_over_jax': official_s / jax_s,
    'jax_mask_sec': jax_mask_s,
    'official_mask_sec': official_mask_s,
    'max_abs_diff': float(np.abs(np.asarray(got) - want).max()),
    'device': jax.devices()[0].device_kind,
    'cpu_count': os.cpu_count(),
    'platform': platform.platform(),
    'torch_threads': torch.get_num_threads(),
  }
  print(json.dumps(row))
  print(
    f'{h}x{w} grid, {d}-d, context {k}: dino_jax {jax_s:.3f} s/frame, '
    f'official {official_s:.3f} s/frame: {official_s / jax_s:.1f}x'
  )
  return row


if __name__ == '__main__':
  main()
