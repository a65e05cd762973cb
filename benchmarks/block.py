"""One ViT block, forward and forward + backward: dino_jax vs PyTorch.

  python benchmarks/block.py --arch vit_small --batch 16 --tokens 197
  python benchmarks/block.py --arch vit_base --batch 8 --steps 20 --out b.jsonl

The transformer block is where the DINO step spends its time (12 of them,
on 197-token global crops and 37-token local crops), so this isolates the
model from the rest of the step. Both sides run the same math (pre-norm
attention and MLP, exact GELU, LayerNorm eps 1e-6) on the same shapes, fp32,
with the loss sum(y^2) / 1000 so that the backward pass has a dense input
gradient; the JAX side differentiates with respect to the parameters and the
input, as PyTorch autograd does here. PyTorch's block is the one the parity
tests check against dino_jax (tests/torch_dino.py). The sides are timed in
turns (benchmarks/timing.py); one JSON line per run.
"""

import argparse
import json
import os
import platform
import sys
import time

import timing


def parse_args(argv=None):
  from dino_jax.models import vit

  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='vit_small', choices=sorted(vit.VARIANTS))
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--tokens', type=int, default=197, help='1 + patches')
  p.add_argument('--steps', type=int, default=10, help='timed calls per side')
  p.add_argument('--attention', default='einsum', choices=['einsum', 'fused'])
  p.add_argument('--sides', default='jax,torch', help='comma list')
  p.add_argument('--out', default=None, help='append JSON lines here')
  args = p.parse_args(argv)
  for name in ('batch', 'tokens', 'steps'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be >= 1; got {getattr(args, name)}')
  unknown = set(args.sides.split(',')) - {'jax', 'torch'}
  if unknown:
    p.error(f'--sides: unknown {sorted(unknown)}; use jax and/or torch')
  return args


def jax_side(args):
  """{'jax': fwd+bwd, 'jax_fwd': fwd} callables and XLA's FLOPs of each."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dino_jax.models import vit

  arch = vit.VARIANTS[args.arch]
  block = vit.Block(arch['num_heads'], attention=args.attention)
  x = jnp.asarray(
    np.random.RandomState(0).randn(args.batch, args.tokens, arch['embed_dim']),
    jnp.float32,
  )
  params = block.init(jax.random.key(0), x)

  def loss(p, x):
    return jnp.sum(jnp.square(block.apply(p, x))) * 1e-3

  compiled = {
    'jax': jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile(),
    'jax_fwd': jax.jit(block.apply).lower(params, x).compile(),
  }
  runs, flops = {}, {}
  for side, fn in compiled.items():
    runs[side] = lambda fn=fn: jax.block_until_ready(fn(params, x))
    cost = fn.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops[side] = float((cost or {}).get('flops', 0.0))
  return runs, flops


def torch_side(args):
  import numpy as np
  import torch

  sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tests')
  )
  import torch_dino

  from dino_jax.models import vit

  arch = vit.VARIANTS[args.arch]
  block = torch_dino.Block(arch['embed_dim'], arch['num_heads'])
  x = torch.from_numpy(
    np.random.RandomState(0)
    .randn(args.batch, args.tokens, arch['embed_dim'])
    .astype(np.float32)
  ).requires_grad_(True)

  def fwd_bwd():
    block.zero_grad(set_to_none=True)
    x.grad = None
    (block(x).square().sum() * 1e-3).backward()

  def fwd():
    with torch.no_grad():
      block(x)

  return {'torch': fwd_bwd, 'torch_fwd': fwd}, torch.get_num_threads()


def measure(args):
  import jax

  from dino_jax import hostmem

  sides = args.sides.split(',')
  runs, flops, info = {}, {}, {}
  if 'jax' in sides:
    runs, flops = jax_side(args)
  if 'torch' in sides:
    torch_runs, info['torch_threads'] = torch_side(args)
    runs.update(torch_runs)
  times = timing.interleaved(runs, args.steps)
  result = {
    'benchmark': 'block',
    'date': time.strftime('%Y-%m-%d'),
    'backend': jax.default_backend(),
    'cpu': platform.processor() or platform.machine(),
    'arch': args.arch,
    'batch': args.batch,
    'tokens': args.tokens,
    'attention': args.attention,
    'malloc': hostmem.status(),  # dino_jax.hostmem
    **info,
  }
  # Forward + backward (ratio_jax_over_torch) and forward alone.
  both = {s: times[s] for s in ('jax', 'torch') if s in times}
  fwd = {s: times[s + '_fwd'] for s in ('jax', 'torch') if s in times}
  result.update(timing.summarize(both, suffix='_fwd_bwd'))
  result.update(timing.summarize(fwd, suffix='_fwd', ratio_suffix='_fwd'))
  for side, f in flops.items():
    if f:
      result[f'{side}_gflops'] = round(f / 1e9, 2)
  return result


def main(argv=None):
  args = parse_args(argv)
  row = measure(args)
  print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, 'a') as f:
      f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )
  from dino_jax import hostmem

  hostmem.configure()  # both sides run with the same malloc settings
  main()
