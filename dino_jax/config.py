"""Every configuration field once, with the official default (SPEC §0).

Config files in ``configs/`` start from ``default_config()`` and set only what
differs. ``validate()`` checks cross-field facts and names bad values.
"""

import ml_collections
from ml_collections import config_dict

ARCHS = ('vit_tiny', 'vit_small', 'vit_base')
# torchvision ResNets without fc (models/resnet.py, SPEC-downstream §5).
RESNET_ARCHS = ('resnet18', 'resnet34', 'resnet50')
OPTIMIZERS = ('adamw', 'sgd', 'lars')
DATA_SOURCES = ('tfds', 'imagefolder', 'fashion_mnist', 'synthetic')
DTYPES = ('float32', 'bfloat16', 'auto')
REMAT_POLICIES = ('nothing', 'dots', 'dots_no_batch')  # models/vit.py
ATTENTIONS = ('einsum', 'fused', 'flash', 'auto')
GRAD_REDUCES = ('scatter', 'gspmd')  # mesh.grad_reduce
# Backends where 'auto' means bfloat16 compute and fused attention; anywhere
# else (cpu) it means float32 and einsum (docs/precision.md).
MIXED_PRECISION_BACKENDS = ('gpu', 'tpu')


class ConfigError(ValueError):
  """A configuration value is invalid; the message names it."""


def default_config() -> ml_collections.ConfigDict:
  """The official ViT-S/16 defaults (main_dino.py get_args_parser)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 1024  # global; official 64 per GPU x 16 GPUs (SPEC §4.8)
  c.epochs = 100
  # Steps per epoch; -1: dataset size // batch_size (SPEC §4.2).
  c.steps_per_epoch = -1
  # Stop after this many steps (-1: epochs * steps_per_epoch). Schedules
  # always span the full `epochs`, so an early stop is a truncated run.
  c.total_steps = -1
  c.log_every_steps = 10
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = -1  # -1: evaluate only at the end

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'vit_small'  # one of ARCHS or RESNET_ARCHS
  c.model.resnet_width = 64  # ResNet stem width (torchvision 64; tests: 8)
  c.model.patch_size = 16
  # Overrides of the arch table (None: use the arch's value).
  c.model.embed_dim = config_dict.placeholder(int)
  c.model.depth = config_dict.placeholder(int)
  c.model.num_heads = config_dict.placeholder(int)
  c.model.img_size = 224  # fixes pos_embed: (img_size // patch_size)**2
  c.model.drop_path_rate = 0.1  # student only
  c.model.out_dim = 65536
  c.model.norm_last_layer = True
  # False: the head's last layer a plain Linear(bottleneck, K, no bias), as
  # in the released dino_resnet50_pretrain_full_checkpoint.pth (with 2
  # layers of 4096: configs/resnet50.py:released); True: weight-normed, as
  # main_dino.py builds it.
  c.model.head_weight_norm = True
  c.model.use_bn_in_head = False
  c.model.head_hidden_dim = 2048
  c.model.head_bottleneck_dim = 256
  c.model.head_nlayers = 3
  # 'einsum', 'fused' (jax.nn.dot_product_attention), 'flash' (the Pallas
  # TPU flash kernel; TPU only) or 'auto' (fused on gpu, einsum on tpu and
  # cpu: on a TPU einsum moves 16 % fewer bytes, docs/bytes.md); resolved
  # by resolve_compute().
  c.model.attention = 'einsum'
  # Compute dtype: 'float32', 'bfloat16' or 'auto' (bfloat16 on gpu/tpu,
  # float32 on cpu). Parameters, loss and center stay float32. The ImageNet
  # configs use 'auto' (official: fp16 autocast); docs/precision.md.
  c.model.dtype = 'float32'
  c.model.remat = False  # recompute blocks in the backward pass
  # With remat: what a block keeps for the backward pass, one of
  # REMAT_POLICIES ('nothing': recompute it all; 'dots': every matmul's
  # output; 'dots_no_batch': the dense layers' outputs; docs/bytes.md).
  c.model.remat_policy = 'nothing'
  # ViTs: run the blocks as one scan over a block whose parameters are
  # stacked on a leading axis of size depth ('blocks' in place of
  # 'blocks_0' ...; models/vit.py stack_blocks): the compiled step holds one
  # block, not depth copies. Same numbers; a checkpoint resumes only with
  # the value it was written with (docs/aot.md, "Scanned blocks").
  c.model.scan_blocks = False

  c.loss = ml_collections.ConfigDict()
  c.loss.warmup_teacher_temp = 0.04
  c.loss.teacher_temp = 0.04
  c.loss.warmup_teacher_temp_epochs = 0
  c.loss.student_temp = 0.1
  c.loss.center_momentum = 0.9

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'  # one of OPTIMIZERS (sgd, lars: momentum 0.9)
  c.optim.lr = 5e-4  # per 256 images: peak = lr * batch_size / 256
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 10
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4
  c.optim.clip_grad = 3.0  # per tensor; 0 disables
  c.optim.freeze_last_layer = 1  # epochs
  c.optim.momentum_teacher = 0.996

  c.crops = ml_collections.ConfigDict()
  c.crops.global_size = 224
  c.crops.global_scale = (0.4, 1.0)
  c.crops.local_number = 8
  c.crops.local_size = 96
  c.crops.local_scale = (0.05, 0.4)
  # Gaussian blur std range in pixels of the output crop (official: for
  # 224/96 px crops; scale it down for tiny images). At most 2.0.
  c.crops.blur_sigma = (0.1, 2.0)
  # True: round to uint8 where PIL does (between and after the two resize
  # passes, after hue and grayscale), as the official crops are uint8 until
  # ToTensor. False: one float resize pass, float hue and gray (SPEC 5.4
  # accepts both; docs/benchmarks.md has what it changes in learning).
  c.crops.uint8_rounding = False

  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds'  # one of DATA_SOURCES
  c.data.name = 'imagenet2012'  # TFDS name
  c.data.path = ''  # ImageFolder root, IDX dir, or TFDS data_dir
  c.data.split = 'train'
  c.data.canvas_size = 512  # host images are placed on this square canvas
  c.data.num_workers = 2  # grain decode threads (data/pipeline.py read)
  c.data.synthetic_size = 1024  # images in the synthetic source
  c.data.synthetic_delay = 0.0  # seconds per synthetic read (slow storage)

  c.eval = ml_collections.ConfigDict()
  c.eval.knn = True  # weighted k-NN at the end (and every eval_every_steps)
  c.eval.train_split = 'train'  # k-NN memory
  c.eval.test_split = 'validation'  # k-NN queries
  c.eval.ks = (10, 20, 100, 200)
  c.eval.temperature = 0.07
  c.eval.resize_size = 256  # shorter side, bicubic
  c.eval.crop_size = 224  # centre crop
  c.eval.batch_size = 256  # global
  c.eval.max_train_images = -1  # -1: all
  c.eval.max_test_images = -1
  c.eval.baselines = False  # also score random init and raw pixels
  c.eval.attention_images = 0  # test images to draw attention maps for
  c.eval.attention_threshold = 0.6  # mask keeps this much attention mass
  c.eval.attention_size = 0  # attention maps' image side; 0: as the k-NN's
  # At the end of training, also (each for trained, and with baselines for
  # random init and raw pixels): the lr-swept linear probe (linear.*), and
  # the best head's attention-mask Jaccard against the item's silhouette
  # (pixels > 0) on this many test images (Fashion-MNIST only; 0: off).
  c.eval.linear = False
  c.eval.mask_jaccard_images = 0
  # At the end of training, also the downstream protocols whose data is
  # named here ('' = off), each as its CLI computes it (trained teacher
  # only), recorded in eval/downstream.json: image retrieval
  # (docs/retrieval.md; the folder holding <retrieval_dataset>/), Copydays
  # copy detection (docs/copy_detection.md; optional distractor and
  # whitening folders), DAVIS 2017 label propagation (docs/video.md; PNGs
  # in eval/davis/).
  c.eval.retrieval_root = ''
  c.eval.retrieval_dataset = 'roxford5k'  # or 'rparis6k'
  c.eval.retrieval_imsize = 224  # thumbnail side (the paper: rparis6k 512)
  c.eval.retrieval_multiscale = False  # the paper: rparis6k True
  c.eval.copydays_root = ''
  c.eval.copydays_distractors = ''
  c.eval.copydays_whitening = ''
  c.eval.copydays_imsize = 320
  c.eval.davis_root = ''
  c.eval.davis_split = 'val'
  c.eval.davis_size = 480  # frames' short side

  c.linear = ml_collections.ConfigDict()  # linear probe (SPEC §7.2)
  c.linear.epochs = 100
  c.linear.lr = 0.001  # per 256 images
  c.linear.batch_size = 1024  # global
  c.linear.n_last_blocks = 4  # ViT-S: 4; ViT-B: 1 with avgpool
  c.linear.avgpool = False  # interleave [CLS, mean patch] (n_last_blocks 1)
  # True: official per-epoch RandomResizedCrop(0.08, 1) + flip through the
  # frozen backbone; False: features of centre crops extracted once (fast).
  c.linear.augment = True
  c.linear.max_train_images = -1
  # True (default, as DINOv2 evaluates): one head per learning rate of
  # sweep_lrs (each per 256 images, times batch_size / 256) trained at once
  # on the same features; the head with the best top-1 on a held-out
  # val_fraction of the training images (a fixed split, seeded by
  # split_seed) after the last epoch is scored once on the test split.
  # False: the official protocol, one head at lr, the best epoch's top-1
  # on the test split (which then also chooses the epoch).
  c.linear.sweep = True
  # 10 values log-spaced from 1e-4 to 0.1.
  c.linear.sweep_lrs = tuple(10 ** (-4 + i / 3) for i in range(10))
  c.linear.val_fraction = 0.1  # of the training images, held out (sweep)
  c.linear.split_seed = 0  # the held-out split's permutation (sweep)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the data axis (-1: the rest)
  c.mesh.fsdp = 1  # devices on the parameter-sharding axis
  c.mesh.fsdp_min_size = 2**18  # fsdp-shard state tensors this large
  # fsdp > 1: 'scatter' reduce-scatters the split parameters' gradients to
  # their shards (a shard_map over the batch); 'gspmd' leaves the step to
  # GSPMD (full-size all-reduces, then slices). Same numbers (docs/bytes.md).
  c.mesh.grad_reduce = 'scatter'
  return c


def model_dims(config: ml_collections.ConfigDict) -> dict[str, int]:
  """embed_dim, depth and num_heads after applying the overrides."""
  from dino_jax.models.vit import VARIANTS  # light import, no cycle

  if config.model.arch not in VARIANTS:
    raise ConfigError(
      f'model.arch={config.model.arch!r} unknown; use one of '
      f'{ARCHS + RESNET_ARCHS}'
    )
  dims = dict(VARIANTS[config.model.arch])
  for name in dims:
    if config.model[name] is not None:
      dims[name] = config.model[name]
  return dims


def resolve_compute(
  model: ml_collections.ConfigDict, backend: str | None = None
) -> tuple[str, str]:
  """(dtype, attention) that ``model.dtype`` / ``model.attention`` mean here.

  The one place where 'auto' is resolved: bfloat16 on the backends in
  MIXED_PRECISION_BACKENDS, float32 elsewhere; 'fused' attention on a GPU,
  'einsum' elsewhere (on a TPU, XLA's fused attention moves 16 % more bytes
  per image than einsum and the Pallas flash kernel 33 % more: the levers
  of docs/bytes.md). An
  explicit value is returned unchanged. The config itself keeps 'auto', so a
  checkpoint written on a GPU resumes on a CPU and back.

  Args:
    model: the ``config.model`` group.
    backend: 'cpu', 'gpu' or 'tpu' (default: ``jax.default_backend()``).

  Returns:
    (dtype, attention), e.g. ('bfloat16', 'fused').
  """
  if model.dtype not in DTYPES:
    raise ConfigError(f'model.dtype={model.dtype!r}; use one of {DTYPES}')
  if model.attention not in ATTENTIONS:
    raise ConfigError(
      f'model.attention={model.attention!r}; use one of {ATTENTIONS}'
    )
  if backend is None:
    import jax  # only here: the config module stays importable without it

    backend = jax.default_backend()
  mixed = backend in MIXED_PRECISION_BACKENDS
  dtype, attention = model.dtype, model.attention
  if dtype == 'auto':
    dtype = 'bfloat16' if mixed else 'float32'
  if attention == 'auto':
    attention = 'fused' if backend == 'gpu' else 'einsum'
  if attention == 'flash' and backend != 'tpu':
    raise ConfigError(
      f"model.attention='flash' is a TPU kernel; on {backend} use 'einsum', "
      "'fused' or 'auto'"
    )
  return dtype, attention


def _validate_vit(config: ml_collections.ConfigDict) -> None:
  """The ViT's facts: heads divide the width, patches tile the crops."""
  m = config.model
  dims = model_dims(config)
  if dims['embed_dim'] % dims['num_heads']:
    raise ConfigError(
      f'embed_dim={dims["embed_dim"]} is not divisible by '
      f'num_heads={dims["num_heads"]}'
    )
  for name in ('global_size', 'local_size'):
    size = config.crops[name]
    if size % m.patch_size:
      raise ConfigError(
        f'crops.{name}={size} is not divisible by '
        f'model.patch_size={m.patch_size}'
      )
  if m.img_size % m.patch_size:
    raise ConfigError(
      f'model.img_size={m.img_size} is not divisible by '
      f'model.patch_size={m.patch_size}'
    )


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Checks cross-field facts; raises ConfigError naming the bad values."""
  m = config.model
  if m.arch not in RESNET_ARCHS:  # a ResNet takes any crop size
    _validate_vit(config)
  if m.attention not in ATTENTIONS:
    raise ConfigError(
      f'model.attention={m.attention!r}; use one of {ATTENTIONS}'
    )
  if m.dtype not in DTYPES:
    raise ConfigError(f'model.dtype={m.dtype!r}; use one of {DTYPES}')
  if m.remat_policy not in REMAT_POLICIES:
    raise ConfigError(
      f'model.remat_policy={m.remat_policy!r}; use one of {REMAT_POLICIES}'
    )
  if not isinstance(m.scan_blocks, bool):
    raise ConfigError(f'model.scan_blocks={m.scan_blocks!r}; use true or false')
  if m.scan_blocks and m.arch in RESNET_ARCHS:
    raise ConfigError(
      f'model.scan_blocks=True with model.arch={m.arch!r}: only a ViT has '
      'blocks to scan; set model.scan_blocks=false'
    )
  if config.batch_size <= 0 or config.batch_size % num_devices:
    raise ConfigError(
      f'batch_size={config.batch_size} is not divisible by the '
      f'{num_devices} devices'
    )
  eval_batch = config.eval.batch_size
  if eval_batch <= 0 or eval_batch % num_devices:
    below = eval_batch // num_devices * num_devices
    nearest = ' or '.join(str(b) for b in (below, below + num_devices) if b > 0)
    raise ConfigError(
      f'eval.batch_size={eval_batch} is not a multiple of the {num_devices} '
      f'devices (the evaluation splits it over them); use '
      f'--config.eval.batch_size={nearest}'
    )
  if config.optim.name not in OPTIMIZERS:
    raise ConfigError(
      f'optim.name={config.optim.name!r}; use one of {OPTIMIZERS}'
    )
  if config.optim.warmup_epochs > config.epochs:
    raise ConfigError(
      f'optim.warmup_epochs={config.optim.warmup_epochs} exceeds '
      f'epochs={config.epochs}'
    )
  for name in ('global_scale', 'local_scale'):
    lo, hi = config.crops[name]
    if not 0 < lo <= hi <= 1:
      raise ConfigError(
        f'crops.{name}={(lo, hi)} must satisfy 0 < lo <= hi <= 1'
      )
  lo, hi = config.crops.blur_sigma
  if not 0 < lo <= hi <= 2.0:
    raise ConfigError(
      f'crops.blur_sigma={(lo, hi)} must satisfy 0 < lo <= hi <= 2.0 (the '
      'blur kernel covers 3 sigma up to 2.0)'
    )
  if config.crops.local_number < 0:
    raise ConfigError(f'crops.local_number={config.crops.local_number} < 0')
  if config.data.source not in DATA_SOURCES:
    raise ConfigError(
      f'data.source={config.data.source!r} unknown; use one of {DATA_SOURCES}'
    )
  if config.mesh.grad_reduce not in GRAD_REDUCES:
    raise ConfigError(
      f'mesh.grad_reduce={config.mesh.grad_reduce!r} unknown; use one of '
      f'{GRAD_REDUCES}'
    )
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if fsdp < 1 or num_devices % fsdp:
    raise ConfigError(
      f'mesh.fsdp={fsdp} does not divide the {num_devices} devices'
    )
  if data != -1 and data * fsdp != num_devices:
    raise ConfigError(
      f'mesh.data={data} x mesh.fsdp={fsdp} != {num_devices} devices; '
      'set mesh.data=-1 to use the rest'
    )


def advice(config: ml_collections.ConfigDict) -> list[str]:
  """Settings the official help warns about, one line each (the run goes
  on: the training loop logs them as warnings)."""
  lines = []
  if config.loss.teacher_temp > 0.07:
    lines.append(
      f'loss.teacher_temp={config.loss.teacher_temp} > 0.07: the official '
      'help calls this unstable'
    )
  # Only the official default (tuned for batch 1024) is questioned: a
  # config that sets optim.momentum_teacher chose it (fashion_mnist: 0.99,
  # swept for runs of hundreds of steps).
  default = default_config().optim.momentum_teacher
  if config.batch_size < 256 and config.optim.momentum_teacher == default:
    lines.append(
      f'batch_size={config.batch_size} < 256 with the default '
      f'momentum_teacher={config.optim.momentum_teacher}: the official help '
      'suggests 0.9995 for batch 256 and below'
    )
  return lines


def steps_of(config: ml_collections.ConfigDict, dataset_size: int):
  """(steps_per_epoch, total_steps) from the config and the data size."""
  steps_per_epoch = config.steps_per_epoch
  if steps_per_epoch <= 0:
    steps_per_epoch = dataset_size // config.batch_size
    if steps_per_epoch == 0:
      raise ConfigError(
        f'batch_size={config.batch_size} exceeds the {dataset_size} images'
      )
  total = config.epochs * steps_per_epoch
  if config.total_steps > 0:
    total = min(total, config.total_steps)
  return steps_per_epoch, total
