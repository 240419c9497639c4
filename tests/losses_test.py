"""Losses against slow NumPy references written here."""
import numpy as np

from rlhf_jax import losses


def sft_loss_reference(logits, tokens, loss_mask):
  """Loop over positions: -log softmax(logits[b, t])[tokens[b, t+1]] where loss_mask[b, t+1]."""
  total, n = 0.0, 0
  B, T, _ = logits.shape
  for b in range(B):
    for t in range(T - 1):
      if loss_mask[b, t + 1]:
        row = logits[b, t].astype(np.float64)
        total -= row[tokens[b, t + 1]] - (np.log(np.exp(row - row.max()).sum()) + row.max())
        n += 1
  return total / n, n


def test_sft_loss_vs_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
  tokens = rng.integers(0, 11, size=(3, 7))
  loss_mask = (rng.random((3, 7)) > 0.4).astype(np.int32)
  loss_mask[:, -1] = 1                        # the last token is a target; nothing predicts after it
  loss, n = losses.sft_loss(logits, tokens, loss_mask)
  ref, ref_n = sft_loss_reference(logits, tokens, loss_mask)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert int(n) == ref_n
