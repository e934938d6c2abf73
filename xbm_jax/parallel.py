"""Mesh, data-parallel mapping and multi-host start-up.

The train step is written per device with named-axis collectives (`all_gather`,
`pmean`), as under pmap, and mapped with `jax.shard_map` over a 1-D
`jax.make_mesh` mesh whose single axis is `DATA_AXIS`.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over the first `num_devices` (default: all) devices."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n}, but {len(devices)} devices are visible")
  return jax.make_mesh((n,), (DATA_AXIS,), devices=devices[:n])


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(host_batch: dict, mesh) -> dict:
  """This host's part of the batch -> global arrays sharded over `data`.

  Each process passes its own rows (its share of the global batch, in device
  order); the result has the global batch as leading dimension.
  """
  sharding = batch_sharded(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in host_batch.items()
  }


def initialize_distributed(
  *,
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
) -> None:
  """`jax.distributed.initialize` from arguments or the environment.

  Environment: XBM_COORDINATOR (host:port), XBM_NUM_PROCESSES, XBM_PROCESS_ID.
  With none given (single host, or a TPU pod where JAX detects the cluster)
  nothing is passed and JAX's own auto-detection applies; on one CPU host with
  no cluster this is a no-op.
  """
  coordinator_address = coordinator_address or os.environ.get("XBM_COORDINATOR")
  if num_processes is None and "XBM_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["XBM_NUM_PROCESSES"])
  if process_id is None and "XBM_PROCESS_ID" in os.environ:
    process_id = int(os.environ["XBM_PROCESS_ID"])
  if coordinator_address is None:
    return
  # CPU collectives across processes need an implementation (gloo); harmless
  # on GPU/TPU. (Asking for the backend here would initialise it too early.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
