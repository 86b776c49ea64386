"""Devices, meshes and shardings: the parallelism of a run is config, not model code.

* `initialize_distributed(mode)` must run before any other JAX call of a multi-host job.
* `Parallel` holds the mesh `('data', 'fsdp', 'tensor')` (Auto axis types) and the logical-axis
  rules that map the model's logical names — parameters: `embed`, `mlp`, `heads`, `kv_heads`, `vocab`,
  `expert`, `rank`, `norm`; activations and batches: `activation_batch`, `activation_length`,
  `activation_embed`, `activation_mlp`, `activation_vocab` — to mesh axes. Base params and batches get `NamedSharding`s from
  those rules (experts and router vectors: drex.adapters.lora.adapter_shardings); jitted steps run inside `Parallel.context()` so the model's
  `with_logical_constraint` calls resolve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from drex.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (
    # parameters (the base's: FSDP over 'fsdp', tensor parallel over 'tensor'; adapters follow their linear)
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("expert", None),
    ("rank", None),
    # activations and batches (names of their own, so parameter and activation layouts are set apart)
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)
_ENV_KEYS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
             "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_distributed(mode: str, coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Start jax.distributed when asked ('on') or when the environment looks multi-host ('auto').

  Must be called before any other JAX call. Returns whether it was initialized.
  """
  if mode not in ("auto", "on", "off"):
    raise UserError(f"distributed must be 'auto', 'on' or 'off', got {mode!r}")
  if mode == "off" or (mode == "auto" and not coordinator and not any(os.environ.get(k) for k in _ENV_KEYS)):
    return False
  kwargs = {}
  if coordinator:
    kwargs.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)
  return True


def preflight(mesh_shape: Sequence[int], expected_processes: int = 0, expected_local_devices: int = 0) -> None:
  """Stop with a clear message when process / device counts and the mesh disagree."""
  n_proc, n_local, n_all = jax.process_count(), jax.local_device_count(), jax.device_count()
  if expected_processes and n_proc != expected_processes:
    raise UserError(f"expected {expected_processes} JAX processes but {n_proc} joined; start the same command on "
                    f"every host (launch/ scripts) and check the coordinator address")
  if expected_local_devices and n_local != expected_local_devices:
    raise UserError(f"expected {expected_local_devices} devices per process, this process sees {n_local}")
  if int(np.prod(mesh_shape)) != n_all:
    raise UserError(f"mesh {dict(zip(MESH_AXES, mesh_shape))} needs {int(np.prod(mesh_shape))} devices, "
                    f"the job has {n_all} ({n_proc} processes x {n_local}); fix config.mesh")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replace one -1 by what the device count leaves."""
  shape = [int(s) for s in shape]
  if len(shape) != 3:
    raise UserError(f"config.mesh needs 3 sizes (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1:
    raise UserError(f"config.mesh may leave at most one axis as -1, got {shape}")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if num_devices % rest:
      raise UserError(f"config.mesh {shape} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // rest
  return tuple(shape)


@dataclasses.dataclass
class Parallel:
  """A mesh and the logical-axis rules of a run."""

  mesh: Mesh
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  @classmethod
  def create(cls, shape: Sequence[int] = (-1, 1, 1), rules: Sequence = DEFAULT_RULES,
             devices: Sequence[jax.Device] | None = None) -> "Parallel":
    devices = list(devices if devices is not None else jax.devices())
    resolved = resolve_mesh_shape(shape, len(devices))
    if len(devices) == jax.device_count():
      preflight(resolved)
    mesh = jax.make_mesh(resolved, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return cls(mesh, tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules))

  @contextlib.contextmanager
  def context(self):
    """Mesh + logical rules, around tracing and running jitted steps."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def sharding(self, logical: Sequence[str | None]) -> NamedSharding:
    return nn.logical_to_mesh_sharding(PartitionSpec(*logical), self.mesh, self.rules)

  def tree_shardings(self, boxed_abstract: Any) -> Any:
    """NamedShardings of a tree whose leaves are nn.LogicallyPartitioned (e.g. jax.eval_shape of init)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_abstract), self.mesh, self.rules)

  def batch_sharding(self) -> NamedSharding:
    return self.sharding(("activation_batch",))

  def put(self, tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), tree, shardings)

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over ('data', 'fsdp') on the batch axis."""
    sharding = self.batch_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}

  @property
  def shape(self) -> dict[str, int]:
    return dict(self.mesh.shape)
