"""dino_jax.compilation_cache: where ``python -m dino_jax.main`` keeps
JAX's persistent cache."""

import jax
import pytest

from dino_jax import compilation_cache


@pytest.fixture
def no_env_cache():
  """JAX's cache directory unset (the suite sets one, conftest.py)."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', None)
  yield
  jax.config.update('jax_compilation_cache_dir', before)


def test_default_is_in_the_workdir(no_env_cache):
  assert compilation_cache.cache_path('', '/runs/a') == (
    '/runs/a/compilation_cache'
  )
  assert compilation_cache.cache_path('', 'gs://bucket/run') == (
    'gs://bucket/run/compilation_cache'
  )


def test_a_given_path_or_none(no_env_cache):
  assert compilation_cache.cache_path('/cache', '/runs/a') == '/cache'
  assert compilation_cache.cache_path('none', '/runs/a') is None


def test_the_environment_cache_is_kept(no_env_cache):
  jax.config.update('jax_compilation_cache_dir', '/shared/cache')
  assert compilation_cache.cache_path('', '/runs/a') == '/shared/cache'
  assert compilation_cache.cache_path('none', '/runs/a') is None
