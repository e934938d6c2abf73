"""Model factory, head, BN switches, mixed precision, sharded BN, conversion errors.

Oracles: NumPy pooling, torch's init formula, single-device full-batch BN for the
sharded case, and torch state_dicts for the converter.
"""

import runpy
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from xbm_jax import models
from xbm_jax.models import convert, layers
from xbm_jax.models.head import EmbeddingHead, global_pool


def small(**kw):
  return models.create({"name": "small_cnn", "embed_dim": 16, "width": 8, **kw})


def gray_images(n, seed=0, size=32):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def numpy_init(model, image_shape, seed=0):
  """Variables with the model's structure, filled by NumPy (kaiming-like kernels, random
  BN affine and running stats). Flax's own random init is avoided on purpose: compiling
  threefry sampling on XLA:CPU takes seconds per array here."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape, jnp.uint8))
  )

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[-1:])), leaf.shape) / np.sqrt(
        np.prod(leaf.shape[:-2]) if len(leaf.shape) == 4 else 1
      )
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)  # bias, mean

  return jax.tree_util.tree_map_with_path(
    lambda p, l: jnp.asarray(fill(p, l), jnp.float32), dict(shapes)
  )


@pytest.fixture(scope="module")
def small_vars():
  return numpy_init(small(), (1, 32, 32, 1))


# ------------------------------------------------------------------------------- head
def test_global_pool_matches_numpy():
  x = np.random.default_rng(0).uniform(-1, 2, (2, 3, 5, 4)).astype(np.float32)
  np.testing.assert_allclose(global_pool(x, "max"), x.max(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(global_pool(x, "avg"), x.mean(axis=(1, 2)), rtol=1e-6)
  gem = (np.maximum(x, 1e-6) ** 3).mean(axis=(1, 2)) ** (1 / 3)
  np.testing.assert_allclose(global_pool(x, "gem"), gem, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown pool 'sum'.*max, avg, gem"):
    global_pool(x, "sum")


@pytest.mark.slow
def test_head_init_shape_and_unit_rows():
  head = EmbeddingHead(embed_dim=64)
  fmap = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 2, 512), jnp.bfloat16)
  params = head.init(jax.random.PRNGKey(0), fmap)["params"]
  kernel = np.asarray(params["fc"]["kernel"])
  assert kernel.shape == (512, 64) and kernel.dtype == np.float32
  # torch kaiming_normal_(w[out=64, in=512], mode="fan_out"): std = sqrt(2 / 64)
  assert abs(kernel.std() / np.sqrt(2 / 64) - 1) < 0.03 and abs(kernel.mean()) < 0.01
  np.testing.assert_array_equal(params["fc"]["bias"], 0)
  emb = head.apply({"params": params}, fmap)
  assert emb.shape == (3, 64) and emb.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)


# --------------------------------------------------------------------------- factory
def test_default_config_and_create():
  cfg = models.default_config()
  assert set(cfg) == {
    "name",
    "embed_dim",
    "pool",
    "stem_relu",
    "layer4_stride",
    "frozen_bn",
    "dtype",
    "init_from",
    "width",
  }
  assert (cfg.name, cfg.pool, cfg.stem_relu, cfg.layer4_stride, cfg.dtype) == (
    "resnet50",
    "max",
    False,
    2,
    "float32",
  )
  cfg.init_from = "/some/file.msgpack"  # placeholder(str) accepts a path
  model = models.create(cfg)
  assert isinstance(model, models.EmbeddingModel)
  assert (model.backbone.depth, model.backbone.stem_relu, model.embed_dim) == (50, False, 128)
  assert models.create(cfg, axis_name="data").backbone.bn_axis_name == "data"


@pytest.mark.parametrize(
  "override,match",
  [
    (
      {"name": "vgg16"},
      "unknown model name 'vgg16'; valid: resnet50, resnet18, bninception, googlenet, small_cnn",
    ),
    ({"depth": 3}, r"unknown model config key\(s\) \['depth'\]; valid: \["),
    ({"pool": "sum"}, "unknown model.pool 'sum'; valid: max, avg, gem"),
    ({"dtype": "float16"}, "unknown model.dtype 'float16'; valid: float32, bfloat16, auto"),
    ({"embed_dim": 0}, "embed_dim must be a positive int"),
  ],
)
def test_create_rejects_bad_config(override, match):
  with pytest.raises(ValueError, match=match):
    models.create(override)


def test_grayscale_is_tiled_and_bad_images_rejected():
  g = gray_images(2, size=4)
  np.testing.assert_array_equal(layers.to_rgb(g), np.repeat(g, 3, -1).astype(np.float32))
  x = layers.imagenet_normalize(np.full((1, 1, 1, 3), 255, np.uint8))
  np.testing.assert_allclose(
    x[0, 0, 0], (1 - np.array(layers.IMAGENET_MEAN)) / np.array(layers.IMAGENET_STD), rtol=1e-6
  )
  with pytest.raises(ValueError, match=r"RGB \(C=3\) or grayscale \(C=1\).*\(1, 4, 4, 2\)"):
    layers.to_rgb(np.zeros((1, 4, 4, 2), np.uint8))
  with pytest.raises(ValueError, match=r"NHWC.*\(4, 4, 3\)"):
    layers.to_rgb(np.zeros((4, 4, 3), np.uint8))


# ------------------------------------------------------------------------- small CNN
@pytest.mark.slow
def test_small_cnn_takes_1_channel_32x32(small_vars):
  images = gray_images(4)
  emb = small().apply(small_vars, images, train=False)
  assert emb.shape == (4, 16) and emb.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
  fmap = small().apply(small_vars, images, method="feature_map")
  assert fmap.shape == (4, 8, 8, 32)
  # uint8 and float 0..255 inputs are the same images
  np.testing.assert_allclose(small().apply(small_vars, images.astype(np.float32)), emb, atol=1e-6)


def test_head_applied_to_pooled_features_is_the_forward_bit_for_bit(small_vars):
  """The oracle is the default forward itself (and NumPy linear + L2 norm)."""
  images = gray_images(4, seed=3)
  model = small()
  emb, upd = model.apply(small_vars, images, train=True, mutable=["batch_stats"])
  (pooled, emb2), upd2 = model.apply(
    small_vars, images, train=True, mutable=["batch_stats"], method="features_and_embeddings"
  )
  np.testing.assert_array_equal(emb2, emb)
  jax.tree.map(np.testing.assert_array_equal, upd2, upd)
  head_only = {"params": {"head": small_vars["params"]["head"]}}  # no backbone needed
  np.testing.assert_array_equal(model.apply(head_only, pooled, method="project_features"), emb)
  fc = small_vars["params"]["head"]["fc"]
  z = np.asarray(pooled, np.float64) @ np.asarray(fc["kernel"], np.float64) + np.asarray(fc["bias"])
  np.testing.assert_allclose(emb, z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.slow
def test_frozen_bn_never_updates(small_vars):
  images = gray_images(8, seed=1)
  _, upd = small().apply(small_vars, images, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(
    lambda a, b: bool(np.any(a != b)), small_vars["batch_stats"], upd["batch_stats"]
  )
  assert all(jax.tree.leaves(changed))  # sanity: normal BN does update
  frozen = small(frozen_bn=True)
  emb, upd = frozen.apply(small_vars, images, train=True, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], small_vars["batch_stats"])
  # and it uses the running stats, i.e. behaves exactly as eval mode
  np.testing.assert_allclose(emb, frozen.apply(small_vars, images, train=False), atol=1e-6)


def test_bfloat16_compute_close_to_float32(small_vars):
  images = gray_images(8, seed=2)
  f32 = small().apply(small_vars, images)
  bf16_model = small(dtype="bfloat16")
  bf16 = bf16_model.apply(small_vars, images)
  assert bf16.dtype == jnp.float32  # embeddings always float32
  assert bf16_model.apply(small_vars, images, method="feature_map").dtype == jnp.bfloat16
  assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 3e-2
  assert np.min(np.sum(np.asarray(bf16) * np.asarray(f32), axis=1)) > 0.999
  params = jax.eval_shape(lambda: bf16_model.init(jax.random.PRNGKey(0), images[:1]))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_auto_dtype_is_bf16_on_accelerators_and_f32_on_cpu(small_vars):
  for backend, want in (
    ("gpu", jnp.bfloat16),
    ("cuda", jnp.bfloat16),
    ("tpu", jnp.bfloat16),
    ("cpu", jnp.float32),
  ):
    assert models.factory.resolve_dtype("auto", backend) == want, backend
  assert models.factory.resolve_dtype("bfloat16", "cpu") == jnp.bfloat16
  assert jax.default_backend() == "cpu"
  auto = small(dtype="auto")
  assert auto.backbone.dtype == jnp.float32
  images = gray_images(4, seed=4)
  # BN statistics stay float32 under bf16 compute (flax reduces them in float32).
  _, upd = small(dtype="bfloat16").apply(small_vars, images, train=True, mutable=["batch_stats"])
  assert {x.dtype for x in jax.tree.leaves(upd)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_bn_axis_name_averages_stats_across_devices(small_vars):
  """8-way shard_map with bn_axis_name="data" == one device seeing the whole batch."""
  mesh = jax.make_mesh((8,), ("data",))
  images = gray_images(16, seed=3)
  whole_emb, whole = small().apply(small_vars, images, train=True, mutable=["batch_stats"])
  sharded_model = models.create(
    {"name": "small_cnn", "embed_dim": 16, "width": 8}, axis_name="data"
  )

  def step(v, x):
    return sharded_model.apply(v, x, train=True, mutable=["batch_stats"])

  emb, upd = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P()))
  )(small_vars, jax.device_put(images, jax.NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(emb, whole_emb, atol=2e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    upd["batch_stats"],
    whole["batch_stats"],
  )


# ------------------------------------------------------------------------ conversion
@pytest.fixture(scope="module")
def resnet18_state():
  torch = pytest.importorskip("torch")
  from tests.models import torch_archs as T

  torch.manual_seed(0)
  net = T.resnet18()
  return {k: v.numpy().copy() for k, v in net.state_dict().items()}


def test_convert_layout(resnet18_state):
  sd = resnet18_state
  v = convert.convert_state_dict("resnet18", sd)
  np.testing.assert_array_equal(
    v["params"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0)
  )
  ds = "layer2.0.downsample.1."
  np.testing.assert_array_equal(v["params"]["layer2_0"]["downsample_1"]["scale"], sd[ds + "weight"])
  np.testing.assert_array_equal(
    v["batch_stats"]["layer2_0"]["downsample_1"]["var"], sd[ds + "running_var"]
  )
  assert "fc" not in v["params"]  # ImageNet classifier skipped


def test_convert_rejects_missing_unexpected_and_wrong_shape(resnet18_state):
  sd = dict(resnet18_state)
  del sd["layer2.0.downsample.1.running_var"]
  with pytest.raises(
    ValueError,
    match=r"missing keys: layer2\.0\.downsample\.1\."
    r"running_var \(128,\)",
  ):
    convert.convert_state_dict("resnet18", sd)
  sd = dict(resnet18_state, **{"layer3.1.conv2.weight": np.zeros((256, 256, 1, 1))})
  with pytest.raises(
    ValueError,
    match=r"wrong shapes: layer3\.1\.conv2\.weight: "
    r"checkpoint \(256, 256, 1, 1\), model expects "
    r"\(3, 3, 256, 256\)",
  ):
    convert.convert_state_dict("resnet18", sd)
  sd = dict(resnet18_state, **{"layer5.0.conv1.weight": np.zeros((8, 8, 3, 3))})
  with pytest.raises(ValueError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
    convert.convert_state_dict("resnet18", sd)
  with pytest.raises(ValueError, match="unknown arch 'vgg'"):
    convert.convert_state_dict("vgg", sd)


def test_script_and_load_pretrained(resnet18_state, tmp_path, monkeypatch):
  import torch

  pth, out = tmp_path / "r18.pth", tmp_path / "r18.msgpack"
  torch.save({k: torch.from_numpy(v) for k, v in resnet18_state.items()}, pth)
  monkeypatch.setattr(
    sys,
    "argv",
    ["convert_weights.py", "--arch", "resnet18", "--torch-file", str(pth), "--out", str(out)],
  )
  with pytest.raises(SystemExit) as e:
    runpy.run_path("scripts/convert_weights.py", run_name="__main__")
  assert e.value.code == 0 and out.exists()
  # written via a temp file + rename: nothing else is left behind
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.msgpack", "r18.pth"]

  def shapes(name):
    m = models.create({"name": name, "embed_dim": 4})
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    head = {
      "fc": {"kernel": np.ones((v["params"]["head"]["fc"]["kernel"].shape)), "bias": np.zeros(4)}
    }
    return {"params": {**v["params"], "head": head}, "batch_stats": v["batch_stats"]}

  loaded = models.load_pretrained(shapes("resnet18"), str(out))
  np.testing.assert_array_equal(loaded["params"]["head"]["fc"]["kernel"], 1)  # untouched
  np.testing.assert_array_equal(
    loaded["params"]["backbone"]["layer1_1"]["conv2"]["kernel"],
    resnet18_state["layer1.1.conv2.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    loaded["batch_stats"]["backbone"]["bn1"]["mean"], resnet18_state["bn1.running_mean"]
  )
  with pytest.raises(
    ValueError,
    match=r"r18\.msgpack \(arch 'resnet18'\) does not match"
    r".*missing layer1_0/conv3/kernel",
  ):
    models.load_pretrained(shapes("resnet50"), str(out))
  bad = tmp_path / "bad.msgpack"
  bad.write_bytes(b"\x80")
  with pytest.raises(ValueError, match="not a converted backbone file"):
    models.load_pretrained(shapes("resnet18"), str(bad))


# ------------------------------------------------------------------ BN vs torch
@pytest.mark.slow
def test_batchnorm_running_stats_follow_torch_batchnorm2d():
  """Three train-mode updates at n = 2 x 4 x 4 = 32 values per channel: outputs and
  running mean / (unbiased) running variance equal torch.nn.BatchNorm2d's; eval mode
  then gives torch's eval output."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  xs = [rng.normal(1.0, 2.0, (2, 4, 4, 3)).astype(np.float32) for _ in range(3)]
  tbn = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5)
  with torch.no_grad():
    tbn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    tbn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
  train_bn = layers.batch_norm(train=True, frozen=False, axis_name=None, dtype=jnp.float32)()
  variables = train_bn.init(jax.random.PRNGKey(0), jnp.asarray(xs[0]))
  variables = {
    "params": {"scale": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([0.1, -0.2, 0.3])},
    "batch_stats": variables["batch_stats"],
  }
  tbn.train()
  for x in xs:
    want = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    got, upd = train_bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    variables = {**variables, "batch_stats": upd["batch_stats"]}
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), atol=1e-5)
  np.testing.assert_allclose(variables["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-6)
  np.testing.assert_allclose(variables["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-6)
  tbn.eval()
  eval_bn = layers.batch_norm(train=False, frozen=False, axis_name=None, dtype=jnp.float32)()
  want = tbn(torch.from_numpy(xs[0].transpose(0, 3, 1, 2))).detach().numpy()
  np.testing.assert_allclose(
    np.asarray(eval_bn.apply(variables, jnp.asarray(xs[0]))), want.transpose(0, 2, 3, 1), atol=1e-5
  )
