"""Schedules equal the official arrays (SPEC §4.2, §3)."""

import math

import numpy as np
from absl.testing import absltest

from dino_jax import schedules


class ScheduleTest(absltest.TestCase):
  def test_spec_examples(self):
    np.testing.assert_allclose(
      schedules.cosine_schedule(1, 0, 2, 3, warmup_epochs=1),
      [0, 0.5, 1, 1, 0.75, 0.25],
      atol=1e-12,
    )
    np.testing.assert_allclose(
      schedules.cosine_schedule(0.996, 1, 2, 2),
      [0.996, 0.996586, 0.998, 0.999414],
      atol=1e-6,
    )
    np.testing.assert_allclose(
      schedules.teacher_temp_schedule(0.04, 0.07, 3, 5),
      [0.04, 0.055, 0.07, 0.07, 0.07],
      atol=1e-12,
    )

  def test_lr_closed_form_at_chosen_iterations(self):
    base, final, epochs, niter, warm = 0.002, 1e-6, 100, 1251, 10
    sched = schedules.cosine_schedule(
      base, final, epochs, niter, warmup_epochs=warm
    )
    total, w = epochs * niter, warm * niter
    self.assertEqual(sched.dtype, np.float64)
    self.assertLen(sched, total)
    self.assertEqual(sched[0], 0.0)  # first lr is exactly 0
    self.assertAlmostEqual(sched[w // 2], base * (w // 2) / (w - 1), 15)
    self.assertAlmostEqual(sched[w - 1], base, 15)
    self.assertAlmostEqual(sched[w], base, 15)  # base appears twice
    for it in (w + 1, w + 12345, total - 1):
      j = it - w
      expected = final + 0.5 * (base - final) * (
        1 + math.cos(math.pi * j / (total - w))
      )
      self.assertAlmostEqual(sched[it], expected, 15)
    self.assertGreater(sched[-1], final)  # divisor T - W: never reaches final

  def test_momentum_never_reaches_one(self):
    sched = schedules.cosine_schedule(0.996, 1.0, 100, 1251)
    self.assertLess(sched.max(), 1.0)
    self.assertEqual(sched[0], 0.996)

  def test_teacher_temp_without_warmup(self):
    np.testing.assert_array_equal(
      schedules.teacher_temp_schedule(0.04, 0.04, 0, 4), [0.04] * 4
    )

  def test_warmup_longer_than_run_raises(self):
    with self.assertRaisesRegex(ValueError, 'warmup'):
      schedules.cosine_schedule(1, 0, 2, 3, warmup_epochs=3)


if __name__ == '__main__':
  absltest.main()
