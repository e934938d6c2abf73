"""PyTorch ImageNet checkpoints -> Flax backbone variables (msgpack), and loading them.

Mapping rule (all archs): a torch key `a.b.0.c.weight` names the Flax module path
`a/b_0/c` (a numeric index is folded into the name before it) and a leaf:
  conv weight [O, I, kh, kw] -> params/.../kernel [kh, kw, I, O]
  BN weight / bias           -> params/.../scale / bias
  conv bias                  -> params/.../bias
  BN running_mean / var      -> batch_stats/.../mean / var
  num_batches_tracked        -> dropped (flax keeps no counter)
The ImageNet classifier (`fc`, `last_linear`, GoogLeNet's `aux1`/`aux2`) is skipped.
Every other key must land on a backbone variable of exactly the right shape, and every
backbone variable must be covered; otherwise a ValueError names the keys.

torch is imported only inside `load_torch_state_dict` (an optional dependency).
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from typing import Any, Mapping

import numpy as np
import jax
import jax.numpy as jnp
import flax
from flax import traverse_util

from xbm_jax.models.factory import make_backbone
from xbm_jax.models.pretrained import listed as _listed

ARCHS = {
  "resnet50": "resnet50",
  "resnet18": "resnet18",
  "bn_inception": "bninception",
  "bninception": "bninception",
  "googlenet": "googlenet",
}
SKIP_PREFIXES = {
  "resnet50": ("fc.",),
  "resnet18": ("fc.",),
  "bninception": ("last_linear.",),
  "googlenet": ("fc.", "aux1.", "aux2."),
}
FORMAT_VERSION = 1


def canonical_arch(arch: str) -> str:
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
  return ARCHS[arch]


@functools.lru_cache(maxsize=None)
def backbone_shapes(arch: str) -> dict:
  """Flattened {(collection, *path): ShapeDtypeStruct} of the backbone's variables
  (cached: tracing BN-Inception takes seconds; callers must not mutate the result)."""
  backbone = make_backbone(canonical_arch(arch))
  shapes = jax.eval_shape(
    lambda: backbone.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32), train=False
    )
  )
  return traverse_util.flatten_dict(dict(shapes))


def torch_key_to_flax(key: str, ndim: int):
  """`layer1.0.downsample.1.running_mean` -> ("batch_stats", "layer1_0", "downsample_1",
  "mean"); None for a leaf name we do not know."""
  *modules, leaf = key.split(".")
  path = []
  for part in modules:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  if leaf == "weight":
    target = ("params", *path, "kernel" if ndim >= 2 else "scale")
  elif leaf == "bias":
    target = ("params", *path, "bias")
  elif leaf == "running_mean":
    target = ("batch_stats", *path, "mean")
  elif leaf == "running_var":
    target = ("batch_stats", *path, "var")
  else:
    return None
  return tuple(target)


def flax_to_torch_key(target: tuple, arch: str) -> str:
  """Inverse of torch_key_to_flax, for error messages."""
  collection, *path, leaf = target
  if canonical_arch(arch) != "bninception":  # its flat names never hold an index
    path = [re.sub(r"_(\d+)$", r".\1", p) for p in path]
  name = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
  }[leaf]
  return ".".join([*path, name])


def _torch_to_flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # conv OIHW -> HWIO
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:  # linear [out, in] -> [in, out]
    return value.T
  return value


def convert_state_dict(arch: str, state_dict: Mapping[str, Any]) -> dict:
  """torch state_dict (name -> array-like) -> {"params", "batch_stats"} of the backbone.

  Arrays come back as float32 NumPy. Raises ValueError naming unexpected keys, missing
  keys and wrong shapes (all of them, up to 20 each).
  """
  arch = canonical_arch(arch)
  state = dict(state_dict)
  if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
    state = {k[len("module.") :]: v for k, v in state.items()}
  expected = backbone_shapes(arch)
  out, unexpected, wrong = {}, [], []
  for key, value in state.items():
    if key.endswith("num_batches_tracked") or key.startswith(SKIP_PREFIXES[arch]):
      continue
    value = np.asarray(value, dtype=np.float32)
    target = torch_key_to_flax(key, value.ndim)
    if target is None or target not in expected:
      unexpected.append(f"{key} {tuple(value.shape)}")
      continue
    arr = _torch_to_flax_layout(value)
    want = tuple(expected[target].shape)
    if arr.shape != want and len(want) == 1 and arr.size == want[0]:
      arr = arr.reshape(want)  # some BN-Inception ports store BN vectors as [1, C]
    if arr.shape != want:
      wrong.append(
        f"{key}: checkpoint {tuple(value.shape)}, model expects {want} as {'/'.join(target)}"
      )
      continue
    out[target] = np.ascontiguousarray(arr)
  missing = [
    f"{flax_to_torch_key(t, arch)} {tuple(expected[t].shape)}" for t in expected if t not in out
  ]
  problems = []
  if missing:
    problems.append(f"missing keys: {_listed(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_listed(unexpected)}")
  if wrong:
    problems.append(f"wrong shapes: {_listed(wrong)}")
  if problems:
    raise ValueError(f"state_dict does not match the {arch} backbone: " + " | ".join(problems))
  return traverse_util.unflatten_dict(out)


def load_torch_state_dict(path: str) -> dict:
  """Reads a .pth file into {name: float/int NumPy array} (needs torch)."""
  try:
    import torch  # optional dependency, only for conversion
  except ImportError as e:
    raise ImportError("converting PyTorch weights needs torch: pip install torch") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state_dict (dict of tensors); got {type(obj)}")
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if torch.is_tensor(v)}


def save_variables(variables: Mapping[str, Any], out_path: str, *, arch: str) -> None:
  """Writes {"arch", "format", "params", "batch_stats"} as msgpack, atomically."""
  payload = {
    "arch": canonical_arch(arch),
    "format": FORMAT_VERSION,
    "params": variables["params"],
    "batch_stats": variables["batch_stats"],
  }
  data = flax.serialization.msgpack_serialize(payload)
  directory = os.path.dirname(os.path.abspath(out_path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".msgpack")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, out_path)  # a reader never sees a half-written file
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def convert_file(arch: str, torch_file: str, out_path: str) -> dict:
  """.pth -> converted .msgpack; returns the converted variables."""
  variables = convert_state_dict(arch, load_torch_state_dict(torch_file))
  save_variables(variables, out_path, arch=arch)
  return variables
