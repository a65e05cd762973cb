"""The DINO loss and the teacher-output center (SPEC §3).

Shapes: V crops (2 global first, then locals), B images, K prototypes.
"""

import jax
import jax.numpy as jnp


def dino_loss_and_metrics(
  student_out: jax.Array,
  teacher_out: jax.Array,
  center: jax.Array,
  *,
  teacher_temp: jax.typing.ArrayLike,
  student_temp: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DINO cross-entropy over all (teacher global, other student crop) pairs.

  Args:
    student_out: [V, B, K] raw student head outputs, crop-major.
    teacher_out: [2, B, K] raw teacher head outputs for the 2 global crops.
    center: [K] or [1, K] running center of the teacher outputs.
    teacher_temp: teacher temperature (scalar).
    student_temp: student temperature.

  Returns:
    (loss, metrics) with scalar loss and metrics ``teacher_entropy`` (mean
    entropy of the centered, sharpened teacher distribution) and ``kl``
    (loss - teacher_entropy: the mean KL(P_t || P_s) over the same pairs).
  """
  n_crops = student_out.shape[0]
  n_global = teacher_out.shape[0]
  if student_out.ndim != 3 or teacher_out.ndim != 3:
    raise ValueError(
      'student_out must be [V, B, K] and teacher_out [2, B, K]; got '
      f'{student_out.shape} and {teacher_out.shape}'
    )
  student_out = student_out.astype(jnp.float32)
  teacher_out = teacher_out.astype(jnp.float32)
  center = jnp.reshape(center, (1, 1, -1)).astype(jnp.float32)
  log_p_student = jax.nn.log_softmax(student_out / student_temp, axis=-1)
  teacher_logits = (teacher_out - center) / teacher_temp
  p_teacher = jax.lax.stop_gradient(jax.nn.softmax(teacher_logits, axis=-1))
  log_p_teacher = jax.lax.stop_gradient(
    jax.nn.log_softmax(teacher_logits, axis=-1)
  )
  batch = student_out.shape[1]
  # [2, V]: cross-entropy of teacher crop i against student crop v, averaged
  # over the batch.
  cross = -jnp.einsum('ibk,vbk->iv', p_teacher, log_p_student) / batch
  # A crop is never compared with itself (SPEC §3): 2V - 2 terms.
  pair_mask = jnp.arange(n_crops)[None, :] != jnp.arange(n_global)[:, None]
  n_terms = n_global * n_crops - n_global
  loss = jnp.sum(jnp.where(pair_mask, cross, 0.0)) / n_terms
  entropy = -jnp.mean(jnp.sum(p_teacher * log_p_teacher, axis=-1))
  return loss, {'teacher_entropy': entropy, 'kl': loss - entropy}


def dino_loss(
  student_out: jax.Array,
  teacher_out: jax.Array,
  center: jax.Array,
  *,
  teacher_temp: jax.typing.ArrayLike,
  student_temp: float = 0.1,
) -> jax.Array:
  """The official DINO loss (see ``dino_loss_and_metrics``): a 0-d array."""
  loss, _ = dino_loss_and_metrics(
    student_out,
    teacher_out,
    center,
    teacher_temp=teacher_temp,
    student_temp=student_temp,
  )
  return loss


def update_center(
  center: jax.Array, teacher_out: jax.Array, momentum: float = 0.9
) -> jax.Array:
  """EMA of the batch mean of the raw teacher outputs (SPEC §3).

  Args:
    center: [K] or [1, K].
    teacher_out: [2, B, K] raw teacher outputs of the whole (global) batch;
      under jit with a sharded batch, the mean is over all devices.
    momentum: center momentum m_c.

  Returns:
    m_c * center + (1 - m_c) * mean(teacher_out), in the shape of ``center``.
  """
  # A mean over both leading axes, not a reshape to [2 * B, K]: a merge with
  # the split batch axis minor would gather every row onto every device.
  batch_center = jnp.mean(teacher_out.astype(jnp.float32), axis=(0, 1))
  new = momentum * center + (1 - momentum) * batch_center.reshape(center.shape)
  return new.astype(center.dtype)
