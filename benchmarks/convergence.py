"""Convergence of dino_jax against the official DINO code (issue 17).

Trains one recipe (default ``configs/fashion_mnist.py:parity``) several
times per side on the same data with the same hyperparameters and compares
the k-NN accuracy of the teachers, seed against seed:

- dino_jax: the real program, ``python -m dino_jax.main --config=...
  --config.seed=S``, once per evaluation step in the same workdir (each run
  resumes the last one's checkpoint, so the runs make one training), and its
  own end-of-training k-NN (``WORKDIR/eval/knn.json``).
- official: the objects of the official ``main_dino.py``, ``utils.py`` and
  ``vision_transformer.py``, loaded by path from ``--official_repo``:
  ``VisionTransformer`` with the config's dims, ``DINOHead``,
  ``MultiCropWrapper``, ``DINOLoss``, ``cosine_scheduler``,
  ``get_params_groups`` + AdamW, and ``main_dino.train_one_epoch`` itself.
  Only the data loading is written here: the config's multi-crop recipe with
  torchvision's semantics in PIL + torch (torchvision is not installed), the
  official ``utils.GaussianBlur`` / ``utils.Solarization``, and a sampler of
  ``steps_per_epoch`` batches per epoch. Its teacher backbone's CLS features
  on the eval preprocessing of ``dino_jax.evaluation.features`` are scored
  by ``dino_jax.evaluation.knn.knn_classify``, so both sides are scored by
  one code.

A ResNet recipe (``--config.model.arch=resnet18`` and other
``--config.a.b=c`` overrides, which reach both sides): the official side
builds torchvision's model (tests/torch_resnet.py, ``model.resnet_width``)
under ``DINOHead(use_bn=model.use_bn_in_head)`` as ``main_dino.train_dino``
does, with ``optim.name`` sgd, lars (the official ``utils.LARS``) or adamw,
and its pooled features are scored. ``--baselines`` also scores each
seed's random init (official: the teacher before step 1; dino_jax:
``eval.baselines``, with raw pixels). docs/parity.md has the ResNet
command.

Prints the k-NN tables side by side with the seed spread (mean, min, max,
sample std) and JSON lines (one per run and step, then one per summary) to
stdout and ``--out``. Logs of both trainings go to stderr. Rerunning a
stopped command continues it: evaluations already in ``--out`` (same recipe)
are not trained again, and dino_jax's runs resume from their checkpoints in
``--workdir``; an official seed restarts unless all of its evaluations are
recorded.

The schedules span --epochs (default: the config's 5 x 72 steps, or more
epochs to fit --steps); a run stops at --steps and is evaluated at each of
--eval_steps:

  python benchmarks/convergence.py --official_repo ../shared/official-dino \\
      --steps 360 --seeds 0,1,2 --threads 2 --out /tmp/convergence_360.jsonl
  python benchmarks/convergence.py --official_repo ../shared/official-dino \\
      --steps 1080 --eval_steps 360,720,1080 --seeds 0,1,2 --threads 2 \\
      --out /tmp/convergence_1080.jsonl

On a 2-core CPU it is faster to run the two sides at once, one core each
(--threads picks the first N cores the process may use), then print the
tables of both files:

  taskset -c 0 python benchmarks/convergence.py --sides jax --steps 360 \\
      --seeds 0,1,2 --threads 1 --workdir /tmp/conv --out /tmp/jax.jsonl &
  taskset -c 1 python benchmarks/convergence.py --sides official \\
      --official_repo ../shared/official-dino --steps 360 --seeds 0,1,2 \\
      --threads 1 --out /tmp/official.jsonl
  python benchmarks/convergence.py --summarize /tmp/jax.jsonl \\
      /tmp/official.jsonl

Smoke run (minutes):

  python benchmarks/convergence.py --official_repo ../shared/official-dino \\
      --steps 6 --seeds 0 --max_train_images 2000 --max_test_images 500
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import types
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageEnhance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, 'tests')):  # tests: torch_resnet
  if _path not in sys.path:
    sys.path.insert(0, _path)

try:  # the shell package (issue 41); dino_jax.workdir held these before it
  from dino_jax.cli import flags as config_files  # noqa: E402
except ImportError:
  from dino_jax import workdir as config_files  # noqa: E402
from dino_jax.config import RESNET_ARCHS  # noqa: E402
from dino_jax.data import multicrop, sources  # noqa: E402
from dino_jax.evaluation import features, knn  # noqa: E402

# main_dino.py DataAugmentationDINO: ColorJitter(0.4, 0.4, 0.2, 0.1) with
# p = 0.8, RandomGrayscale(0.2), RandomHorizontalFlip(0.5) (SPEC §5.1).
JITTER = (0.4, 0.4, 0.2, 0.1)
RATIO = (3 / 4, 4 / 3)


# ---------------------------------------------------------------------------
# The official side's data: torchvision semantics, PIL + torch RNG.


def crop_box(width, height, scale, ratio=RATIO):
  """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w)."""
  area = height * width
  log_ratio = torch.log(torch.tensor(ratio))
  for _ in range(10):
    target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]))
    aspect = aspect.item()
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = torch.randint(0, height - h + 1, size=(1,)).item()
      left = torch.randint(0, width - w + 1, size=(1,)).item()
      return top, left, h, w
  in_ratio = width / height  # fallback: central crop
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def adjust_hue(image: Image.Image, hue: float) -> Image.Image:
  """torchvision's PIL hue: 8-bit H += int(hue * 255) modulo 256."""
  h, s, v = image.convert('HSV').split()
  shifted = (np.asarray(h, np.int32) + int(hue * 255)) % 256
  h = Image.fromarray(shifted.astype(np.uint8), 'L')
  return Image.merge('HSV', (h, s, v)).convert(image.mode)


def color_jitter(image: Image.Image, strengths=JITTER) -> Image.Image:
  """torchvision ``ColorJitter``: the four ops in a random order."""
  b, c, s, h = strengths
  order = torch.randperm(4).tolist()
  factors = [
    torch.empty(1).uniform_(1 - b, 1 + b).item(),
    torch.empty(1).uniform_(1 - c, 1 + c).item(),
    torch.empty(1).uniform_(1 - s, 1 + s).item(),
    torch.empty(1).uniform_(-h, h).item(),
  ]
  ops = [
    lambda x, f: ImageEnhance.Brightness(x).enhance(f),
    lambda x, f: ImageEnhance.Contrast(x).enhance(f),
    lambda x, f: ImageEnhance.Color(x).enhance(f),
    adjust_hue,
  ]
  for i in order:
    image = ops[i](image, factors[i])
  return image


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
  """``ToTensor`` then ``Normalize(ImageNet)``: RGB [H, W] -> [3, H, W]."""
  x = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1)
  mean = torch.tensor(multicrop.MEAN)[:, None, None]
  std = torch.tensor(multicrop.STD)[:, None, None]
  return (x.float() / 255.0 - mean) / std


class CropTransform:
  """One DINO crop type: RandomResizedCrop (bicubic), flip, jitter, gray,
  the official ``utils.GaussianBlur`` and ``utils.Solarization``.

  Torch's global RNG draws the torchvision choices and Python's ``random``
  the blur and solarization, as in the official code.
  """

  def __init__(
    self,
    utils,
    size: int,
    scale,
    blur_prob: float,
    solarize_prob: float = 0.0,
    sigma=(0.1, 2.0),
    flip_prob: float = 0.5,
    jitter_prob: float = 0.8,
    gray_prob: float = 0.2,
  ):
    self.size, self.scale = size, tuple(scale)
    self.flip_prob, self.jitter_prob = flip_prob, jitter_prob
    self.gray_prob = gray_prob
    self.blur = utils.GaussianBlur(blur_prob, sigma[0], sigma[1])
    self.solarize = utils.Solarization(solarize_prob) if solarize_prob else None

  def __call__(self, image: Image.Image) -> torch.Tensor:
    top, left, h, w = crop_box(*image.size, self.scale)
    x = image.crop((left, top, left + w, top + h))
    x = x.resize((self.size, self.size), Image.BICUBIC)
    if torch.rand(1) < self.flip_prob:
      x = x.transpose(Image.FLIP_LEFT_RIGHT)
    if not self.jitter_prob < torch.rand(1):  # torchvision RandomApply
      x = color_jitter(x)
    if torch.rand(1) < self.gray_prob:
      x = x.convert('L').convert('RGB')
    x = self.blur(x)
    if self.solarize is not None:
      x = self.solarize(x)
    return to_normalized_tensor(x)


class MultiCropTransform:
  """``DataAugmentationDINO`` with the sizes, scales and blur of a config."""

  def __init__(self, utils, crops):
    g = dict(size=crops.global_size, scale=crops.global_scale)
    sigma = tuple(crops.blur_sigma)
    self.global1 = CropTransform(utils, **g, blur_prob=1.0, sigma=sigma)
    self.global2 = CropTransform(
      utils, **g, blur_prob=0.1, solarize_prob=0.2, sigma=sigma
    )
    self.local = CropTransform(
      utils,
      crops.local_size,
      crops.local_scale,
      blur_prob=0.5,
      sigma=sigma,
    )
    self.local_number = crops.local_number

  def __call__(self, image: Image.Image) -> list[torch.Tensor]:
    out = [self.global1(image), self.global2(image)]
    return out + [self.local(image) for _ in range(self.local_number)]


def to_pil(record: dict) -> Image.Image:
  """A source record as PIL RGB (``ImageFolder`` loads ``convert('RGB')``)."""
  array = np.asarray(record['image'], np.uint8)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return Image.fromarray(array).convert('RGB')


class CropDataset(torch.utils.data.Dataset):
  """A dino_jax source as ``(crops, label)``, like ``ImageFolder``."""

  def __init__(self, source, transform):
    self.source, self.transform = source, transform

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    record = self.source[index]
    return self.transform(to_pil(record)), record['label']


class StreamSampler(torch.utils.data.Sampler):
  """``per_epoch`` indices per epoch from a stream of seeded permutations.

  Epoch e takes positions [e * per_epoch, (e + 1) * per_epoch) of
  perm(0) + perm(1) + ..., one permutation of the data per pass, as
  dino_jax's shuffle-then-repeat pipeline does with short epochs.
  """

  def __init__(self, size: int, per_epoch: int, seed: int):
    self.size, self.per_epoch, self.seed = size, per_epoch, seed
    self.epoch = 0

  def set_epoch(self, epoch: int) -> None:
    self.epoch = epoch

  def __len__(self):
    return self.per_epoch

  def __iter__(self):
    data_pass, offset = divmod(self.epoch * self.per_epoch, self.size)
    out = []
    while len(out) < self.per_epoch:
      perm = np.random.default_rng([self.seed, data_pass]).permutation(
        self.size
      )
      out += perm[offset : offset + self.per_epoch - len(out)].tolist()
      data_pass, offset = data_pass + 1, 0
    return iter(out)


# ---------------------------------------------------------------------------
# The official code, loaded by path.


def _stub_torchvision() -> None:
  """Registers an empty ``torchvision`` if the real one cannot be imported.

  main_dino.py imports ``datasets``, ``transforms`` and ``models`` from
  torchvision at module level and only lists ``models.__dict__`` at import
  time (for its ``--arch`` choices); nothing used here needs torchvision. PyPI's
  torchvision does not import beside torch 2.13 CPU, so empty modules with
  those three names stand in for it.
  """
  try:
    import torchvision  # noqa: F401

    return
  except Exception:  # noqa: BLE001 - missing or broken: both mean "stub"
    for name in [m for m in sys.modules if m.split('.')[0] == 'torchvision']:
      del sys.modules[name]
  package = types.ModuleType('torchvision')
  package.__path__ = []
  for name in ('datasets', 'transforms', 'models'):
    module = types.ModuleType(f'torchvision.{name}')
    setattr(package, name, module)
    sys.modules[module.__name__] = module
  sys.modules['torchvision'] = package


def load_official(repo: str) -> types.SimpleNamespace:
  """main_dino, utils and vision_transformer from ``repo`` (not copied)."""
  repo = os.path.abspath(repo)
  path = os.path.join(repo, 'main_dino.py')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no main_dino.py in --official_repo={repo}')
  _stub_torchvision()
  if repo not in sys.path:
    sys.path.insert(0, repo)  # main_dino imports utils, vision_transformer
  spec = importlib.util.spec_from_file_location('main_dino', path)
  main_dino = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(main_dino)
  for module in (main_dino.utils, main_dino.vits):
    if os.path.dirname(os.path.abspath(module.__file__)) != repo:
      raise ImportError(
        f'{module.__name__} was imported from {module.__file__}, not from '
        f'{repo}: another module of that name shadows it'
      )
  return types.SimpleNamespace(
    main_dino=main_dino, utils=main_dino.utils, vits=main_dino.vits
  )


@contextlib.contextmanager
def single_process_group():
  """A gloo process group of one process, as ``init_distributed_mode``.

  ``DINOLoss.update_center`` all-reduces the center and ``train_one_epoch``
  unwraps ``student.module`` (DDP); with one process both are identities.
  """
  with tempfile.TemporaryDirectory() as tmp:
    dist.init_process_group(
      'gloo', init_method=f'file://{tmp}/store', rank=0, world_size=1
    )
    try:
      yield
    finally:
      dist.destroy_process_group()


@contextlib.contextmanager
def cuda_calls_on_cpu():
  """Makes ``train_one_epoch``'s CUDA calls no-ops on a CPU-only torch.

  It moves each batch with ``Tensor.cuda`` and waits with
  ``torch.cuda.synchronize``: on CPU the batch stays where it is and there
  is nothing to wait for. Restored on exit; the official files are unchanged.
  """
  saved = torch.Tensor.cuda, torch.cuda.synchronize
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.cuda.synchronize = lambda *args, **kwargs: None
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', message='.*torch.cuda.amp.autocast')
      warnings.filterwarnings('ignore', message='.*User provided device_type')
      yield
  finally:
    torch.Tensor.cuda, torch.cuda.synchronize = saved


def _logger_class(utils):
  """``utils.MetricLogger`` without the CUDA all-reduce of one process."""

  class SingleProcessLogger(utils.MetricLogger):
    losses: list = []

    def update(self, **kwargs):
      if 'loss' in kwargs:
        SingleProcessLogger.losses.append(float(kwargs['loss']))
      super().update(**kwargs)

    def synchronize_between_processes(self):
      pass  # the sum over one process; the original puts it on CUDA

  return SingleProcessLogger


class EpochLoader:
  """One epoch of the DataLoader, stopped at ``last_step``, with a hook.

  ``len`` stays ``steps_per_epoch``: ``train_one_epoch`` indexes the
  schedules by ``len(data_loader) * epoch + it``. ``hook(step)`` runs after
  each step (when the loop asks for the next batch), outside the timing.
  """

  def __init__(self, loader, epoch, steps_per_epoch, last_step, hook):
    self.loader, self.epoch = loader, epoch
    self.steps_per_epoch, self.last_step = steps_per_epoch, last_step
    self.hook = hook
    self.train_sec = self.cpu_sec = 0.0

  def __len__(self):
    return self.steps_per_epoch

  def __iter__(self):
    first = self.epoch * self.steps_per_epoch
    batches = iter(self.loader)
    for step in range(first, min(first + len(self), self.last_step)):
      start, cpu = time.perf_counter(), time.process_time()
      batch = next(batches)
      yield batch
      self.train_sec += time.perf_counter() - start
      self.cpu_sec += time.process_time() - cpu
      self.hook(step + 1)


def build_official(official, config, epochs: int, steps_per_epoch: int):
  """The official student, teacher, loss, optimizer and schedules.

  Follows ``main_dino.train_dino`` on CPU in float32. A ViT: the config's
  dims in place of the ``vit_*`` tables (``vit_small`` with other dims). A
  ResNet (``model.arch`` resnet18/34/50): torchvision's model
  (tests/torch_resnet.py, narrowed by ``model.resnet_width``) built for
  student and teacher, the head on ``fc.weight.shape[1]`` features, and
  ``MultiCropWrapper`` replacing ``fc`` by ``Identity``. ``main_dino``
  converts a model with BatchNorm to ``SyncBatchNorm``: over one process
  that is plain BatchNorm (and SyncBatchNorm refuses CPU tensors), so it is
  left as is. The optimizer is ``optim.name`` (adamw, sgd or the official
  ``utils.LARS``) on ``get_params_groups``.
  """
  from functools import partial

  from torch import nn

  m, o, loss = config.model, config.optim, config.loss
  vits, utils, main_dino = official.vits, official.utils, official.main_dino

  def head(embed_dim, **kwargs):
    return vits.DINOHead(
      embed_dim,
      m.out_dim,
      use_bn=m.use_bn_in_head,
      nlayers=m.head_nlayers,
      hidden_dim=m.head_hidden_dim,
      bottleneck_dim=m.head_bottleneck_dim,
      **kwargs,
    )

  if m.arch in RESNET_ARCHS:
    import torch_resnet

    # main_dino's order: both backbones, then the student's head, then the
    # teacher's.
    student = torch_resnet.resnet(m.arch, m.resnet_width)
    teacher = torch_resnet.resnet(m.arch, m.resnet_width)
    embed_dim = student.fc.weight.shape[1]
    student = utils.MultiCropWrapper(
      student, head(embed_dim, norm_last_layer=m.norm_last_layer)
    )
    teacher = utils.MultiCropWrapper(teacher, head(embed_dim))
  else:
    from dino_jax.config import model_dims

    dims = model_dims(config)

    def backbone(drop_path_rate):
      return vits.VisionTransformer(
        img_size=[m.img_size],
        patch_size=m.patch_size,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=drop_path_rate,
        **dims,
      )

    student = utils.MultiCropWrapper(
      backbone(m.drop_path_rate),
      head(dims['embed_dim'], norm_last_layer=m.norm_last_layer),
    )
    teacher = utils.MultiCropWrapper(backbone(0.0), head(dims['embed_dim']))
  student = nn.parallel.DistributedDataParallel(student)
  teacher.load_state_dict(student.module.state_dict())
  for p in teacher.parameters():
    p.requires_grad = False
  dino_loss = main_dino.DINOLoss(
    m.out_dim,
    config.crops.local_number + 2,
    loss.warmup_teacher_temp,
    loss.teacher_temp,
    loss.warmup_teacher_temp_epochs,
    epochs,
    student_temp=loss.student_temp,
    center_momentum=loss.center_momentum,
  )
  groups = utils.get_params_groups(student)
  if o.name == 'adamw':
    optimizer = torch.optim.AdamW(groups)
  elif o.name == 'sgd':
    optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9)
  elif o.name == 'lars':
    optimizer = utils.LARS(groups)
  else:
    raise ValueError(f"optim.name={o.name!r}; use 'adamw', 'sgd' or 'lars'")
  schedules = dict(
    lr_schedule=utils.cosine_scheduler(
      o.lr * config.batch_size / 256,  # linear scaling, world size 1
      o.min_lr,
      epochs,
      steps_per_epoch,
      warmup_epochs=o.warmup_epochs,
    ),
    wd_schedule=utils.cosine_scheduler(
      o.weight_decay, o.weight_decay_end, epochs, steps_per_epoch
    ),
    momentum_schedule=utils.cosine_scheduler(
      o.momentum_teacher, 1, epochs, steps_per_epoch
    ),
  )
  return student, teacher, dino_loss, optimizer, schedules


def official_train(
  official,
  config,
  source,
  *,
  seed: int,
  epochs: int,
  steps: int,
  eval_steps=(),
  on_eval=None,
) -> dict:
  """Trains with ``main_dino.train_one_epoch``; calls ``on_eval(step,
  teacher_backbone)`` after each step in ``eval_steps``.

  Returns:
    {'sec_per_step' (wall), 'cpu_sec_per_step' (this process), 'losses'
    (one per step), 'objects'} where objects
    holds the student, teacher, loss, optimizer and schedules.
  """
  utils, main_dino = official.utils, official.main_dino
  spe = config.steps_per_epoch
  utils.fix_random_seeds(seed)
  random.seed(seed)  # blur and solarization (fix_random_seeds skips it)
  student, teacher, dino_loss, optimizer, schedules = build_official(
    official, config, epochs, spe
  )
  dataset = CropDataset(source, MultiCropTransform(utils, config.crops))
  sampler = StreamSampler(len(source), spe * config.batch_size, seed)
  loader = torch.utils.data.DataLoader(
    dataset, sampler=sampler, batch_size=config.batch_size, drop_last=True
  )
  args = argparse.Namespace(
    epochs=epochs,
    clip_grad=config.optim.clip_grad,
    freeze_last_layer=config.optim.freeze_last_layer,
  )

  def hook(step):
    if on_eval is not None and step in eval_steps:
      was_training = teacher.training
      teacher.eval()
      with torch.no_grad():
        on_eval(step, teacher.backbone)
      teacher.train(was_training)

  hook(0)  # the random-init teacher, where 0 is in eval_steps
  logger_class = _logger_class(utils)
  logger_class.losses = []
  saved_logger, utils.MetricLogger = utils.MetricLogger, logger_class
  train_sec = cpu_sec = 0.0
  try:
    with cuda_calls_on_cpu(), contextlib.redirect_stdout(sys.stderr):
      for epoch in range(math.ceil(steps / spe)):
        sampler.set_epoch(epoch)
        epoch_loader = EpochLoader(loader, epoch, spe, steps, hook)
        main_dino.train_one_epoch(
          student,
          teacher,
          teacher,  # teacher_without_ddp: the ViT teacher is not wrapped
          dino_loss,
          epoch_loader,
          optimizer,
          schedules['lr_schedule'],
          schedules['wd_schedule'],
          schedules['momentum_schedule'],
          epoch,
          None,  # fp16_scaler: float32 as dino_jax's recipe
          args,
        )
        train_sec += epoch_loader.train_sec
        cpu_sec += epoch_loader.cpu_sec
  finally:
    utils.MetricLogger = saved_logger
  return {
    'sec_per_step': train_sec / steps,
    'cpu_sec_per_step': cpu_sec / steps,  # below wall time: shared cores
    'losses': list(logger_class.losses),
    'objects': dict(
      student=student,
      teacher=teacher,
      dino_loss=dino_loss,
      optimizer=optimizer,
      **schedules,
    ),
  }


def torch_features(backbone, source, n: int, eval_config):
  """CLS features of the first ``n`` images, dino_jax's eval preprocessing.

  Returns:
    (features float32 [n', F], labels int32 [n']), undecodable images
    dropped as ``features.extract`` does.
  """
  transform = features.EvalTransform(
    eval_config.resize_size, eval_config.crop_size
  )
  feats, labels = [], []
  for start in range(0, n, eval_config.batch_size):
    rows = [
      transform.map(source[i])
      for i in range(start, min(n, start + eval_config.batch_size))
    ]
    rows = [r for r in rows if r['valid']]
    if not rows:
      continue
    images = torch.from_numpy(np.stack([r['image'] for r in rows]))
    feats.append(backbone(images.permute(0, 3, 1, 2)).numpy())
    labels.append(np.array([r['label'] for r in rows], np.int32))
  return np.concatenate(feats).astype(np.float32), np.concatenate(labels)


class KnnScorer:
  """dino_jax's k-NN on torch features (the memory/query subsets fixed)."""

  def __init__(self, config, max_train: int, max_test: int):
    e = config.eval
    self.eval_config = e
    self.train = sources.make_source(config.data, e.train_split)
    self.test = sources.make_source(config.data, e.test_split)
    self.n_train = len(self.train) if max_train < 0 else max_train
    self.n_test = len(self.test) if max_test < 0 else max_test
    self.n_train = min(self.n_train, len(self.train))
    self.n_test = min(self.n_test, len(self.test))
    self.num_classes = len(getattr(self.train, 'classes', ())) or None

  def __call__(self, backbone) -> dict:
    e = self.eval_config
    train_x, train_y = torch_features(backbone, self.train, self.n_train, e)
    test_x, test_y = torch_features(backbone, self.test, self.n_test, e)
    return knn.knn_classify(
      train_x,
      train_y,
      test_x,
      test_y,
      ks=tuple(e.ks),
      temperature=e.temperature,
      num_classes=self.num_classes,
    )


# ---------------------------------------------------------------------------
# The dino_jax side: the real program.


def _jax_sec_per_step(workdir: str, start: int, end: int) -> tuple:
  """(seconds, steps) of logged training in (start, end], without the
  first logged interval (it holds the compilation)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  # Evaluation rows (knn_* columns) share the steps of training rows.
  rows = [r for r in rows if start < r['step'] <= end and 'loss' in r]
  rows = sorted({r['step']: r for r in rows}.values(), key=lambda r: r['step'])
  sec = n = 0
  for prev, row in zip(rows, rows[1:], strict=False):
    sec += (row['step'] - prev['step']) / row['steps_per_sec']
    n += row['step'] - prev['step']
  return sec, n


def jax_train(
  config_path: str,
  workdir: str,
  *,
  seed: int,
  epochs: int,
  eval_steps,
  max_train: int,
  max_test: int,
  done=(),
  overrides=(),
  baselines: bool = False,
):
  """Yields (step, knn table, sec_per_step, baseline tables) for each
  evaluation step not in ``done`` (recorded already).

  ``overrides`` (``--config.a.b=c``) go to every run; with ``baselines``
  the last step's run also scores random init and raw pixels (its
  ``eval.baselines``), given as {'random_init': table, 'raw_pixels':
  table} ({} at the other steps).
  """
  log_every = max(1, min(20, eval_steps[-1] // 10))
  start, sec, n = 0, 0.0, 0
  for step in eval_steps:
    if step in done:
      continue
    final = baselines and step == eval_steps[-1]
    cmd = [
      sys.executable,
      '-m',
      'dino_jax.main',
      f'--config={config_path}',
      f'--workdir={workdir}',
      # One cache for all seeds (same program): seeds after the first
      # load the step instead of compiling it.
      '--compilation_cache='
      + os.path.join(os.path.dirname(workdir), 'compilation_cache'),
      *overrides,
      f'--config.seed={seed}',
      f'--config.epochs={epochs}',
      f'--config.total_steps={step}',
      f'--config.log_every_steps={log_every}',
      f'--config.eval.baselines={final}',
      '--config.eval.attention_images=0',
      f'--config.eval.max_train_images={max_train}',
      f'--config.eval.max_test_images={max_test}',
    ]
    print('+ ' + ' '.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, check=False)
    if proc.returncode:
      raise RuntimeError(f'dino_jax exited with {proc.returncode}: {cmd}')
    with open(os.path.join(workdir, 'eval', 'knn.json')) as f:
      result = json.load(f)
    if result['step'] != step:
      raise RuntimeError(f'{workdir}/eval/knn.json is of step {result["step"]}')
    table = {int(k): v for k, v in result['trained'].items()}
    extra = {
      name: {int(k): v for k, v in result[name].items()}
      for name in ('random_init', 'raw_pixels')
      if final and name in result
    }
    more_sec, more_n = _jax_sec_per_step(workdir, start, step)
    sec, n, start = sec + more_sec, n + more_n, step
    yield step, table, (sec / n if n else float('nan')), extra


# ---------------------------------------------------------------------------
# Tables and JSON lines.


def spread(values) -> dict:
  """mean, min, max and sample std (0 for one value) of a list."""
  v = np.asarray(values, np.float64)
  std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
  return dict(
    mean=float(v.mean()), min=float(v.min()), max=float(v.max()), std=std
  )


def summarize(rows: list[dict], sides) -> list[dict]:
  """Per step: each side's spread at each k, and the acceptance check."""
  out = []
  for step in sorted({r['step'] for r in rows}):
    at = [r for r in rows if r['step'] == step]
    row = {'summary': True, 'step': step}
    for side in sides:
      runs = [r for r in at if r['side'] == side]
      if not runs:
        continue
      ks = sorted(runs[0]['knn'], key=int)
      row[side] = {
        'seeds': [r['seed'] for r in runs],
        'sec_per_step': spread([r['sec_per_step'] for r in runs])['mean'],
        'top1': {
          str(k): spread([r['knn'][k]['top1'] for r in runs]) for k in ks
        },
      }
      for name in BASELINES:  # --baselines: each over the seeds that have it
        have = [r[name] for r in runs if name in r]
        if have:
          row[side][name] = {
            str(k): spread([t[k]['top1'] for t in have]) for k in have[0]
          }
    if 'jax' in row and 'official' in row and '20' in row['official']['top1']:
      lo, hi = acceptance_band(row['official']['top1']['20'])
      mean = row['jax']['top1']['20']['mean']
      row['official_k20_band'] = [lo, hi]
      row['jax_k20_mean_within_official'] = lo <= mean <= hi
    out.append(row)
  return out


# The k-NN tables of --baselines beside the trained one's.
BASELINES = ('random_init', 'raw_pixels')


def acceptance_band(official: dict, point: float = 1.0) -> tuple:
  """Where dino_jax's mean k=20 accuracy must lie (issue 17, item 1).

  Within the official seeds' range [min, max], or within ``point`` of their
  mean where that range is narrower.
  """
  return (
    min(official['min'], official['mean'] - point),
    max(official['max'], official['mean'] + point),
  )


def read_rows(paths, mixed_ok: bool = False) -> list[dict]:
  """The run rows of JSON-lines files (summaries skipped); a later row of
  the same side, seed, step and recipe replaces an earlier one."""
  rows = {}
  for path in paths:
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{n}: not a JSON line ({e})') from None
        if row.get('summary'):
          continue
        key = (
          row['side'],
          row['seed'],
          row['step'],
          row.get('config'),
          tuple(row.get('overrides') or ()),
          row.get('epochs'),
          row.get('steps_per_epoch'),
          row.get('max_train_images'),
          row.get('max_test_images'),
        )
        rows[key] = row
  recipes = {k[3:] for k in rows}
  if len(recipes) > 1 and not mixed_ok:
    raise ValueError(
      f'{", ".join(paths)} mix recipes {sorted(map(str, recipes))}: '
      'summarize the runs of one recipe at a time'
    )
  return list(rows.values())


def format_summary(row: dict, sides) -> str:
  names = {'jax': 'dino_jax', 'official': 'official'}
  present = [s for s in sides if s in row]
  head = ' | '.join(
    f'{names[s] + " (" + str(len(row[s]["seeds"])) + ")":>28}' for s in present
  )
  lines = [
    f'k-NN top-1 (%) at step {row["step"]}, mean [min, max] std over seeds',
    f'     k | {head}',
  ]
  ks = sorted({k for s in present for k in row[s]['top1']}, key=int)
  for k in ks:
    cells = []
    for s in present:
      v = row[s]['top1'].get(k)
      cells.append(
        f'{v["mean"]:6.2f} [{v["min"]:6.2f}, {v["max"]:6.2f}] {v["std"]:5.2f}'
        if v
        else ' ' * 28
      )
    lines.append(f'  {int(k):4d} | ' + ' | '.join(cells))
  for name in BASELINES:
    if not any(name in row[s] for s in present):
      continue
    lines.append(f'  {name} (--baselines):')
    for k in ks:
      cells = []
      for s in present:
        v = row[s].get(name, {}).get(k)
        cells.append(
          f'{v["mean"]:6.2f} [{v["min"]:6.2f}, {v["max"]:6.2f}] {v["std"]:5.2f}'
          if v
          else ' ' * 28
        )
      lines.append(f'  {int(k):4d} | ' + ' | '.join(cells))
  lines.append(
    '   s/step | '
    + ' | '.join(f'{row[s]["sec_per_step"]:28.3f}' for s in present)
  )
  if 'jax_k20_mean_within_official' in row:
    lo, hi = row['official_k20_band']
    lines.append(
      f'  dino_jax k=20 mean within the official band [{lo:.2f}, {hi:.2f}] '
      f'(seed range, or mean +- 1 if narrower): '
      f'{row["jax_k20_mean_within_official"]}'
    )
  return '\n'.join(lines)


class Emitter:
  """JSON lines to stdout and, if given, to a file."""

  def __init__(self, path: str | None):
    self.file = open(path, 'a') if path else None  # noqa: SIM115

  def __call__(self, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if self.file:
      self.file.write(line + '\n')
      self.file.flush()

  def close(self):
    if self.file:
      self.file.close()


# ---------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument(
    '--config',
    default=os.path.join(REPO, 'configs/fashion_mnist.py') + ':parity',
  )
  p.add_argument('--official_repo', default=None, help='for --sides official')
  p.add_argument('--sides', default='jax,official')
  p.add_argument('--seeds', default='0,1')
  p.add_argument('--steps', type=int, default=360)
  p.add_argument(
    '--eval_steps',
    default='',
    help='comma list of steps to evaluate at (default: --steps only)',
  )
  p.add_argument(
    '--epochs',
    type=int,
    default=None,
    help="schedule length (default: the config's, or more to fit --steps)",
  )
  p.add_argument('--max_train_images', type=int, default=-1)
  p.add_argument('--max_test_images', type=int, default=-1)
  p.add_argument('--threads', type=int, default=0, help='CPU cores (0: all)')
  p.add_argument('--workdir', default=None, help='dino_jax workdirs (resumed)')
  p.add_argument('--out', default=None, help='append JSON lines here')
  p.add_argument(
    '--baselines',
    action='store_true',
    help='also score each seed at random init (official: the teacher '
    'before training; dino_jax: eval.baselines at the last step, with '
    'raw pixels)',
  )
  p.add_argument(
    '--summarize',
    nargs='+',
    metavar='JSONL',
    help='train nothing: print the tables of the runs in these --out files '
    '(e.g. one per side, run at once on separate cores)',
  )
  argv = sys.argv[1:] if argv is None else list(argv)
  argv, overrides = config_files.split_overrides(argv)
  args = p.parse_args(argv)
  args.overrides = overrides
  if args.summarize:
    missing = [f for f in args.summarize if not os.path.isfile(f)]
    if missing:
      p.error(f'--summarize: no file {missing[0]}')
    return args
  args.sides = [s for s in args.sides.split(',') if s]
  if not set(args.sides) <= {'jax', 'official'}:
    p.error(f'--sides={args.sides}: use jax and/or official')
  if 'official' in args.sides and not args.official_repo:
    p.error('--sides official needs --official_repo=PATH')
  args.seeds = [int(s) for s in args.seeds.split(',') if s]
  steps = {int(s) for s in args.eval_steps.split(',') if s} | {args.steps}
  if min(steps) <= 0 or max(steps) > args.steps:
    p.error(f'--eval_steps {sorted(steps)} must lie in [1, --steps]')
  args.eval_steps = sorted(steps)
  return args


def load_config(path: str, epochs: int | None, steps: int, overrides=()):
  # FILE[:ARG] and --config.a.b=c overrides, as main reads them.
  config = config_files.load_config_file(path, list(overrides))
  if config.steps_per_epoch <= 0:
    raise ValueError(f'{path} must set steps_per_epoch for this benchmark')
  fit = math.ceil(steps / config.steps_per_epoch)
  config.epochs = epochs or max(config.epochs, fit)
  if config.epochs * config.steps_per_epoch < steps:
    raise ValueError(
      f'--steps={steps} exceeds --epochs={config.epochs} x '
      f'{config.steps_per_epoch} steps'
    )
  return config


def recorded_rows(args, common: dict) -> list[dict]:
  """The runs of this command's recipe, sides, seeds and steps already in
  ``args.out``."""
  if not args.out or not os.path.isfile(args.out):
    return []
  recipe = {k: v for k, v in common.items() if k != 'steps'}
  return [
    r
    for r in read_rows([args.out], mixed_ok=True)
    if all(r.get(k) == v for k, v in recipe.items())
    and r['side'] in args.sides
    and r['seed'] in args.seeds
    and r['step'] in args.eval_steps
  ]


def _tables(tables: dict) -> dict:
  """k-NN tables with string keys k, as the JSON lines hold them."""
  return {
    name: {str(k): v for k, v in table.items()}
    for name, table in tables.items()
  }


def summarize_files(paths, out=None) -> list[dict]:
  """Prints and returns the summaries of the runs recorded in ``paths``."""
  rows = read_rows(paths)
  sides = [s for s in ('jax', 'official') if any(r['side'] == s for r in rows)]
  emit = Emitter(out)
  summaries = summarize(rows, sides)
  for row in summaries:
    print(format_summary(row, sides), flush=True)
    emit(row)
  emit.close()
  return summaries


def main(argv=None):
  args = parse_args(argv)
  if args.summarize:
    try:
      summarize_files(args.summarize, args.out)
    except (ValueError, KeyError) as e:
      sys.exit(f'convergence.py: error: {e}')
    return
  if args.threads:
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cpus)  # inherited by the dino_jax runs
    torch.set_num_threads(args.threads)
  try:
    config = load_config(args.config, args.epochs, args.steps, args.overrides)
  except ValueError as e:  # ConfigOverrideError included
    sys.exit(f'convergence.py: error: {e}')
  common = dict(
    config=os.path.relpath(args.config, REPO),
    **({'overrides': args.overrides} if args.overrides else {}),
    epochs=config.epochs,
    steps_per_epoch=config.steps_per_epoch,
    steps=args.steps,
    max_train_images=args.max_train_images,
    max_test_images=args.max_test_images,
  )
  # Rerunning the command continues: runs recorded in --out (same recipe)
  # are not trained again, and count in the summary.
  rows = recorded_rows(args, common)
  done = {(r['side'], r['seed'], r['step']) for r in rows}
  if rows:
    print(
      f'{len(rows)} runs recorded in {args.out}: '
      + ', '.join(f'{s} seed {d} step {t}' for s, d, t in sorted(done)),
      file=sys.stderr,
    )
  emit = Emitter(args.out)

  def record(side, seed, step, table, sec_per_step, **extra):
    row = dict(
      side=side,
      seed=seed,
      step=step,
      sec_per_step=sec_per_step,
      knn={str(k): v for k, v in table.items()},
      **extra,
      **common,
    )
    rows.append(row)
    emit(row)

  root = args.workdir or tempfile.mkdtemp(prefix='convergence_')
  print(f'dino_jax workdirs under {root}', file=sys.stderr)
  if 'jax' in args.sides:
    for seed in args.seeds:
      for step, table, sps, extra in jax_train(
        os.path.abspath(args.config),
        os.path.join(root, f'jax_seed{seed}'),
        seed=seed,
        epochs=config.epochs,
        eval_steps=args.eval_steps,
        max_train=args.max_train_images,
        max_test=args.max_test_images,
        done={t for s, d, t in done if (s, d) == ('jax', seed)},
        overrides=args.overrides,
        baselines=args.baselines,
      ):
        record('jax', seed, step, table, sps, **_tables(extra))
  if 'official' in args.sides:
    official = load_official(args.official_repo)
    scorer = KnnScorer(config, args.max_train_images, args.max_test_images)
    source = sources.make_source(config.data, config.data.split)
    with single_process_group():
      for seed in args.seeds:
        if all(('official', seed, t) in done for t in args.eval_steps):
          continue
        tables = {}
        start = time.perf_counter()
        result = official_train(
          official,
          config,
          source,
          seed=seed,
          epochs=config.epochs,
          steps=args.steps,
          eval_steps=([0] if args.baselines else []) + args.eval_steps,
          on_eval=lambda step, backbone, tables=tables: tables.update(
            {step: scorer(backbone)}
          ),
        )
        print(
          f'official seed {seed}: {time.perf_counter() - start:.0f} s, '
          f'{result["sec_per_step"]:.3f} s/step',
          file=sys.stderr,
        )
        random_init = tables.pop(0, None)
        for step, table in tables.items():
          extra = {}
          if random_init is not None and step == args.eval_steps[-1]:
            extra = {'random_init': random_init}
          record(
            'official',
            seed,
            step,
            table,
            result['sec_per_step'],
            cpu_sec_per_step=result['cpu_sec_per_step'],
            loss_last=result['losses'][-1],
            **_tables(extra),
          )
  for row in summarize(rows, args.sides):
    print(format_summary(row, args.sides), flush=True)
    emit(row)
  emit.close()


if __name__ == '__main__':
  main()
