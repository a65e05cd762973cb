"""dino_jax: DINO self-distillation in JAX/Flax."""

__version__ = '0.1.0'

from dino_jax import loss, models, schedules  # noqa: E402

__all__ = ['loss', 'models', 'schedules']
