"""Emulates an accelerator's reduced matmul precision on CPU, for tests.

XLA on CPU computes every float32 `dot_general` in full float32 whatever its
`precision`. On Ampere/Hopper GPUs the DEFAULT precision feeds float32
operands to TF32 tensor cores (inputs rounded to a 10-bit mantissa, products
accumulated in float32); on TPUs it is one bf16 pass (7-bit mantissa). Only
`Precision.HIGHEST` is exact float32 on both (HIGH is bf16x3 on TPU, still
not exact, so it is rounded here too).

`emulate(fn, mantissa_bits)(*args)` traces `fn` to a jaxpr and evaluates it
equation by equation; every float32 `dot_general` whose precision is not
HIGHEST gets its operands rounded to `mantissa_bits` first. Nested jaxprs
(jit, custom_jvp / custom_vjp bodies) are evaluated the same way, so a dot
hidden inside a jitted helper is caught too. Loops (scan, while, cond) are bound
whole: their dots are recorded and must be HIGHEST (anything else raises). Call it inside `shard_map` to
emulate a per-device loss body (its collectives are bound as they are).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

TF32_BITS = 10
BF16_BITS = 7


def round_mantissa(x: jax.Array, bits: int, truncate: bool = False) -> jax.Array:
  """float32 `x` rounded to `bits` mantissa bits: to nearest (ties to even),
  or toward zero if `truncate` (what a TF32 tensor core does with raw float32
  operands: it ignores their low 13 bits)."""
  drop = 23 - bits
  u = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
  if not truncate:
    u = u + jnp.uint32((1 << (drop - 1)) - 1) + ((u >> drop) & 1)
  u = u & jnp.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
  return jax.lax.bitcast_convert_type(u, jnp.float32)


def _exact(precision) -> bool:
  if precision is None:
    return False
  if not isinstance(precision, tuple):
    precision = (precision, precision)
  return all(p == jax.lax.Precision.HIGHEST for p in precision)


def _sub_jaxprs(params):
  """The jaxprs nested in an equation's params (a loop's body and condition, a
  cond's branches, ...)."""
  for v in params.values():
    for x in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(x, jcore.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jcore.Jaxpr):
        yield x


def _loop_dots(jaxpr, seen):
  """Records the dots of a loop (scan / while / cond) body, which `_eval` binds as a
  whole: exact only if every dot in it is HIGHEST, so any other dot there is an error
  (the emulation would silently skip it)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      seen.append(eqn.params.get("precision"))
      if not _exact(eqn.params.get("precision")):
        raise NotImplementedError("a reduced-precision dot inside a loop is not emulated")
    for sub in _sub_jaxprs(eqn.params):
      _loop_dots(sub, seen)


def _eval(jaxpr, consts, args, rnd, seen):
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    sub = eqn.params.get("jaxpr") if name in ("pjit", "jit") else None
    if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
      sub = eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
    if sub is not None:
      outs = _eval(sub.jaxpr, sub.consts, ins, rnd, seen)
    else:
      if name == "dot_general":
        seen.append(eqn.params.get("precision"))
        if not _exact(eqn.params.get("precision")):
          ins = [rnd(x) if x.dtype == jnp.float32 else x for x in ins]
      for body in _sub_jaxprs(eqn.params):
        _loop_dots(body, seen)
      outs = eqn.primitive.bind(*ins, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def emulate(fn, bits: int = TF32_BITS, *, truncate: bool = False, seen: list | None = None):
  """`fn` with reduced-precision float32 dots (see module doc). The precision
  of every dot evaluated is appended to `seen` if given (an emulation that
  never meets a dot would pass vacuously: tests check `seen`)."""

  def rnd(x):
    return round_mantissa(x, bits, truncate)

  def wrapped(*args):
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat = jax.tree.leaves(args)
    outs = _eval(closed.jaxpr, closed.consts, flat, rnd, seen if seen is not None else [])
    return jax.tree.unflatten(jax.tree.structure(shape), outs)

  return wrapped


def np_round_mantissa(x: np.ndarray, bits: int, truncate: bool = False) -> np.ndarray:
  """NumPy twin of `round_mantissa` (an independent check of the bit trick)."""
  m, e = np.frexp(np.asarray(x, np.float64))
  scale = 2.0 ** (bits + 1)
  q = np.trunc(m * scale) if truncate else np.round(m * scale)
  return np.ldexp(q / scale, e).astype(np.float32)
