"""The jax.export artifact, loaded and run in a process that never imports xbm_jax."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.inference import flax_forward

pytestmark = pytest.mark.slow  # the shared 6-step training

LOADER = r"""
import sys, time
import numpy as np
t0 = time.perf_counter()
import jax
fn = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
load_s = time.perf_counter() - t0
x = np.load(sys.argv[2])
outs = [np.asarray(fn.call(x)), np.asarray(fn.call(x[:3]))]  # two batch sizes, one artifact
assert not [m for m in sys.modules if m.startswith("xbm_jax")], "xbm_jax was imported"
np.savez(sys.argv[3], all=outs[0], three=outs[1], load_s=load_s)
"""


def test_the_artifact_runs_with_jax_alone_and_equals_the_flax_forward(tiny_run, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  art = str(tmp_path / "e.jaxexp")
  cmd = [sys.executable, os.path.join(root, "scripts", "export_embedder.py")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
    cmd + ["--model", tiny_run["workdir"], "--out", art], env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  meta = json.load(open(art + ".json"))
  assert (meta["crop"], meta["channels"], meta["dim"]) == (16, 3, 8)

  from xbm_jax.data import transforms  # the caller's side: the transform the JSON names

  cfg = transforms.TransformConfig(resize=meta["resize"], crop=meta["crop"])
  images = [im for _, im, _ in tiny_run["images"][:7]]
  x = np.stack([transforms.eval_transform(im, cfg) for im in images])
  np.save(tmp_path / "x.npy", x)
  loader_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
  (tmp_path / "load.py").write_text(LOADER)
  res = str(tmp_path / "res.npz")
  out = subprocess.run(
    [sys.executable, "-I", str(tmp_path / "load.py"), art, str(tmp_path / "x.npy"), res],
    env=loader_env, capture_output=True, text=True, cwd=str(tmp_path),
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  got = np.load(res)
  want = flax_forward(tiny_run["workdir"], images)
  np.testing.assert_allclose(got["all"], want, atol=1e-5)  # float32 noise
  np.testing.assert_allclose(got["three"], want[:3], atol=1e-5)
  assert os.path.getsize(art) < 1 << 20


def test_an_artifact_for_cpu_and_cuda_lowers_here_and_runs_on_cpu():
  import jax  # pylint: disable=g-import-not-at-top

  from tests.inference.test_sources import untrained  # pylint: disable=g-import-not-at-top
  from xbm_jax import models  # pylint: disable=g-import-not-at-top
  from xbm_jax.inference import export  # pylint: disable=g-import-not-at-top
  from xbm_jax.inference.embedder import Embedder  # pylint: disable=g-import-not-at-top

  cfg, variables = untrained(3)
  fn = jax.export.deserialize(
    bytearray(export.export_embedder(Embedder(cfg, variables), platforms=("cpu", "cuda")))
  )
  assert fn.platforms == ("cpu", "cuda") and str(fn.in_avals[0]) == "uint8[b,8,8,3]"
  x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  want = models.create(cfg.model).apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(fn.call(x)), want, atol=1e-5)
