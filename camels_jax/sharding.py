"""Data parallelism: one mesh axis over all devices, batches split on it, the rest replicated.

The training step is a plain `jax.jit` of a global-view function; its inputs carry `NamedSharding`s
and the compiler partitions the computation (and inserts the gradient all-reduce). Typical use:

  initialize_distributed()          # first, before any other JAX call; a no-op on one machine
  mesh = make_mesh()
  params = replicate(params, mesh)
  with jax.set_mesh(mesh):
    for batch in loader:
      params, loss = train_step(params, shard_batch(batch, mesh))

The mesh axis is of type `Auto`, not the `Explicit` that `jax.make_mesh` now defaults to: in
Explicit mode every op must have an unambiguous output sharding, and the model code is not
annotated for that (nnx.Embed's gather of batch-sharded token ids from a replicated table raises
"Use `.at[...].get(out_sharding=)`").
"""

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def make_mesh(axis: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh named `axis` over all devices (of every process)."""
  return jax.make_mesh((jax.device_count(),), (axis,), axis_types=(AxisType.Auto,))


def make_fsdp_mesh(fsdp: int) -> Mesh:
  """A (data, fsdp) mesh over all devices: `fsdp` devices share each parameter, the rest split streams."""
  if fsdp < 1 or jax.device_count() % fsdp:
    raise ValueError(f"make_fsdp_mesh: fsdp={fsdp} does not divide the {jax.device_count()} devices")
  return jax.make_mesh((jax.device_count() // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS),
                       axis_types=(AxisType.Auto, AxisType.Auto))


def fsdp_spec(shape, mesh, lead: tuple = ()) -> P:
  """`lead` (mesh axes of the leading dimensions, e.g. the streams' "data"), then FSDP_AXIS on the largest
  remaining dimension its size divides; whole when none does or the mesh has no FSDP_AXIS.

  A rule on shapes, not yet the logical axis names of issue 15: it shards the vocabulary of embeddings and
  the wider side of every kernel, which is what FSDP needs (XLA gathers a layer's params where it uses them).
  """
  size = dict(mesh.shape).get(FSDP_AXIS, 1)
  rest = tuple(shape[len(lead):])
  spec = [None] * len(rest)
  if size > 1:
    fits = [i for i in np.argsort(rest, kind="stable")[::-1] if rest[i] % size == 0]
    if fits:
      spec[fits[0]] = FSDP_AXIS
  return P(*lead, *spec)


def fsdp_sharded(tree, mesh: Mesh, lead: tuple = ()):
  """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs), by `fsdp_spec`."""
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), mesh, lead)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (params, optimizer state, scalars)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, axis: str | None = None) -> NamedSharding:
  """Axis 0 (the batch) split over mesh axis `axis` (default: the mesh's first), the rest whole.

  The same sharding fits arrays of any rank >= 1.
  """
  return NamedSharding(mesh, P(axis or mesh.axis_names[0]))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                axis: str | None = None) -> dict[str, jax.Array]:
  """Places each array of a batch on the mesh, split along its leading (batch) axis.

  Args:
    batch: name -> array with a leading batch axis; in a multi-process run, this process's part.
    mesh: the mesh.
    axis: the mesh axis to split over (default: the mesh's first).

  Returns:
    name -> global jax.Array with `batch_sharded(mesh, axis)`.

  Raises:
    ValueError: naming the key, if an array is a scalar or its batch size does not divide evenly
      over the devices (of this process) along `axis`.
  """
  sharding = batch_sharded(mesh, axis)
  axis = sharding.spec[0]
  # Each process feeds only the shards of its own devices.
  n_shards = mesh.shape[axis] // jax.process_count()
  out = {}
  for key, value in batch.items():
    shape = np.shape(value)
    if not shape:
      raise ValueError(f"shard_batch: batch[{key!r}] is a scalar; it has no batch axis to split")
    if shape[0] % n_shards:
      raise ValueError(f"shard_batch: batch[{key!r}] has batch size {shape[0]} (shape {shape}), "
                       f"which does not divide over the {n_shards} devices of mesh axis {axis!r}")
    if jax.process_count() == 1:
      out[key] = jax.device_put(value, sharding)
    else:
      # device_put would read `value` as the global array; here it is only this process's rows.
      out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
  return out


def replicate(tree, mesh: Mesh):
  """`tree` with every leaf copied to every device of `mesh` (all processes pass equal values)."""
  return jax.device_put(tree, replicated(mesh))


def _multiprocess_env(env: Mapping[str, str]) -> bool:
  """Whether the environment describes a launch of more than one process."""

  def count(var: str) -> int:
    try:
      return int(env.get(var, "1"))
    except ValueError:
      return 1

  if env.get("JAX_COORDINATOR_ADDRESS"):  # explicit: the user configured jax.distributed
    return True
  if "SLURM_STEP_NODELIST" in env and count("SLURM_NTASKS") > 1:  # srun with several tasks
    return True
  if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:  # mpirun -n > 1
    return True
  # Multi-host TPU slices (GKE, queued resources) list their workers; one host lists one.
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 or bool(
      env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize_distributed(force: bool | None = None) -> bool:
  """Starts `jax.distributed` when this process is one of several; otherwise does nothing.

  Must run before any other JAX call (even `jax.devices()`). Multi-process launches are recognised
  from the environment: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), SLURM
  `srun` with several tasks, Open MPI `mpirun`, and multi-host TPU slices that set
  TPU_WORKER_HOSTNAMES. Other launchers (e.g. a GCE TPU pod VM, whose workers are found through
  the metadata server) pass `force=True`.

  Args:
    force: True to initialize regardless of the environment, False never to; None to detect.

  Returns:
    Whether jax.distributed is initialized on return.
  """
  if jax.distributed.is_initialized():
    return True
  if not (force if force is not None else _multiprocess_env(os.environ)):
    return False
  kwargs = {}
  if "JAX_NUM_PROCESSES" in os.environ:  # jax itself reads only the coordinator address from env
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in os.environ:
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  return True
