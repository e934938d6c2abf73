"""batch_softmax_loss against a per-row NumPy loop; a few pretraining steps learn."""

import jax.numpy as jnp
import numpy as np

from xbm_jax.train import pretrain
import pytest


def _oracle(emb, labels, scale):
  losses, hits = [], []
  for i in range(len(emb)):
    others = [j for j in range(len(emb)) if j != i]
    z = np.array([scale * emb[i] @ emb[j] for j in others])
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    pos = np.array([labels[j] == labels[i] for j in others])
    losses.append(-np.log(p[pos].sum()))
    hits.append(pos[np.argmax(z)])
  return np.mean(losses), np.mean(hits)


@pytest.mark.slow
def test_batch_softmax_loss_matches_loop():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(12, 5))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = np.repeat(np.arange(4), 3)
  loss, acc = pretrain.batch_softmax_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(labels), 7.0)
  want_loss, want_acc = _oracle(emb, labels, 7.0)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(acc), want_acc)


@pytest.mark.slow
def test_pretrain_learns_a_tiny_set_and_exports(tmp_path):
  from xbm_jax.train import checkpoint  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  protos = rng.integers(0, 256, size=(4, 16, 16, 1))
  labels = np.repeat(np.arange(4), 8)
  images = np.clip(protos[labels] + rng.normal(0, 20, (32, 16, 16, 1)), 0, 255)
  out = pretrain.pretrain(
    images.astype(np.uint8),
    labels,
    model_cfg=dict(name="small_cnn", width=4, embed_dim=8),
    transform_cfg=dict(resize=16, crop=12, scale=(0.8, 1.0), flip=False),
    steps=30,
    batch_size=8,
    samples_per_class=2,
    lr=1e-2,
    log_every=15,
    log=lambda s: None,
  )
  (_, first_loss, _), (_, last_loss, _) = out["history"]
  assert last_loss < first_loss
  path = str(tmp_path / "p.msgpack")
  pretrain.export(out, path)
  raw = checkpoint.load_params(path)
  assert int(raw["step"]) == 30 and set(raw) == {"params", "batch_stats", "step"}
  np.testing.assert_array_equal(
    raw["params"]["head"]["fc"]["bias"], np.asarray(out["params"]["head"]["fc"]["bias"])
  )
