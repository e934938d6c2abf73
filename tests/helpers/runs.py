"""Tiny training runs: a config on the tiny glyph data, and readers of a run's files
(used by the loop, checkpoint, guard, fault and validation tests)."""

import importlib.util
import json
import os


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(data_dir, **overrides):
  c = load_config("sop", "smoke")
  c.input.dataset, c.input.data_dir = "tiny", data_dir
  c.input.transform.resize, c.input.transform.crop = 20, 16
  c.input.eval_batch_size = 16
  c.model.embed_dim, c.model.width = 8, 4
  c.optim.schedule = "constant"
  c.optim.lr = 1e-3
  c.train.progress = False
  c.pictures.num_queries, c.pictures.top_k = 3, 2
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def read_log(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def logged_rows(workdir) -> dict:
  """`{(step, key): value}` of metrics.jsonl, asserting no key is logged twice at a
  step (timings, which differ between runs, left out)."""
  out = {}
  for row in read_log(workdir):
    step = row.pop("step")
    for k, v in row.items():
      if isinstance(v, (int, float)) and not k.endswith("_per_s"):
        assert (step, k) not in out, f"{k} logged twice at step {step}"
        out[(step, k)] = v
  return out


def tree_listing(root) -> dict:
  """`{path: (size, mtime)}` of every file and folder under `root`."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs + files:
      st = os.stat(os.path.join(d, name))
      out[os.path.join(d, name)] = (st.st_size, st.st_mtime_ns)
  return out


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)
