"""dino_loss and update_center against the SPEC §3 formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from dino_jax import loss


def reference_loss(student, teacher, center, teacher_temp, student_temp=0.1):
  """Slow loop over (teacher crop, student crop) pairs in float64."""
  student = np.asarray(student, np.float64)
  teacher = np.asarray(teacher, np.float64)
  center = np.asarray(center, np.float64).reshape(1, -1)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  total, n_terms = 0.0, 0
  for i in range(teacher.shape[0]):
    p_t = softmax((teacher[i] - center) / teacher_temp)
    for v in range(student.shape[0]):
      if v == i:
        continue
      log_p_s = np.log(softmax(student[v] / student_temp))
      total += np.mean(np.sum(-p_t * log_p_s, axis=-1))
      n_terms += 1
  return total / n_terms


class LossTest(parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((10, 4, 32), (2, 3, 7), (4, 2, 128))
  def test_matches_reference(self, n_crops, batch, k):
    keys = jax.random.split(jax.random.key(0), 3)
    student = jax.random.normal(keys[0], (n_crops, batch, k))
    teacher = jax.random.normal(keys[1], (2, batch, k))
    center = 0.3 * jax.random.normal(keys[2], (1, k))
    fn = self.variant(
      lambda s, t, c: loss.dino_loss(s, t, c, teacher_temp=0.04)
    )
    got = fn(student, teacher, center)
    chex.assert_shape(got, ())
    np.testing.assert_allclose(
      got, reference_loss(student, teacher, center, 0.04), rtol=2e-6
    )

  def test_uniform_student_gives_log_k(self):
    k = 65536
    student = jnp.zeros((4, 2, k))
    teacher = jax.random.normal(jax.random.key(1), (2, 2, k))
    got = loss.dino_loss(student, teacher, jnp.zeros((k,)), teacher_temp=0.04)
    np.testing.assert_allclose(got, np.log(k), rtol=1e-6)
    self.assertAlmostEqual(float(np.log(k)), 11.0904, places=4)

  def test_invariant_to_constant_shift(self):
    keys = jax.random.split(jax.random.key(2), 2)
    student = jax.random.normal(keys[0], (6, 3, 16))
    teacher = jax.random.normal(keys[1], (2, 3, 16))
    center = jnp.zeros((1, 16))
    base = loss.dino_loss(student, teacher, center, teacher_temp=0.07)
    shifted = loss.dino_loss(
      student + 5.0, teacher - 3.0, center + 1.0, teacher_temp=0.07
    )
    np.testing.assert_allclose(shifted, base, rtol=1e-5)

  def test_same_view_pairs_are_skipped(self):
    # With only the two global crops, teacher i meets student 1 - i: putting
    # student crop 0 equal to the teacher's crop 1 distribution makes the
    # loss depend only on the cross pairs.
    k = 5
    t = jnp.array([[[0.0, 1, 2, 3, 4]], [[4.0, 3, 2, 1, 0]]])
    s_same = t * 0.4  # student crop v matches teacher crop v
    s_swapped = s_same[::-1]
    a = loss.dino_loss(s_same, t, jnp.zeros(k), teacher_temp=0.04)
    b = loss.dino_loss(s_swapped, t, jnp.zeros(k), teacher_temp=0.04)
    self.assertNotAlmostEqual(float(a), float(b), places=3)
    np.testing.assert_allclose(
      a, reference_loss(s_same, t, np.zeros(k), 0.04), rtol=1e-6
    )

  def test_metrics_entropy_and_kl(self):
    keys = jax.random.split(jax.random.key(3), 2)
    student = jax.random.normal(keys[0], (4, 8, 10))
    teacher = jax.random.normal(keys[1], (2, 8, 10))
    value, metrics = loss.dino_loss_and_metrics(
      student, teacher, jnp.zeros(10), teacher_temp=0.5
    )
    p = jax.nn.softmax(teacher / 0.5, axis=-1)
    entropy = -np.mean(np.sum(p * np.log(p), axis=-1))
    np.testing.assert_allclose(metrics['teacher_entropy'], entropy, rtol=1e-5)
    np.testing.assert_allclose(metrics['kl'], value - entropy, rtol=1e-5)
    self.assertGreater(float(metrics['kl']), 0.0)

  @parameterized.parameters(((1, 6),), ((6,),))
  def test_update_center(self, shape):
    teacher = jnp.arange(2 * 3 * 6, dtype=jnp.float32).reshape(2, 3, 6)
    center = jnp.ones(shape)
    got = loss.update_center(center, teacher, momentum=0.9)
    chex.assert_shape(got, shape)
    # Mean over 6 rows of arange rows: column j mean = 15 + j.
    expected = 0.9 * 1.0 + 0.1 * (15.0 + np.arange(6))
    np.testing.assert_allclose(np.ravel(got), expected, rtol=1e-6)
