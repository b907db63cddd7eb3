"""Meshes and shardings: batches split over a data axis, parameters replicated or split over an FSDP axis by
their logical axis names, and the multi-process start.

The training step is a plain `jax.jit` of a global-view function; its inputs carry `NamedSharding`s
and the compiler partitions the computation (and inserts the gradient all-reduce). Typical use:

  initialize_distributed()          # first, before any other JAX call; a no-op on one machine
  mesh = make_mesh()
  params = replicate(params, mesh)
  rows = process_rows(n, mesh)      # the rows of an n-row global batch this process feeds
  with jax.set_mesh(mesh):
    for step in range(steps):
      batch = shard_rows(build(loader.take(n, rows)), n, mesh)
      params, loss = train_step(params, batch)

Every process walks the same global order and builds only its rows, so one data position serves any
process count.

The mesh axis is of type `Auto`, not the `Explicit` that `jax.make_mesh` now defaults to: in
Explicit mode every op must have an unambiguous output sharding, and the model code is not
annotated for that (nnx.Embed's gather of batch-sharded token ids from a replicated table raises
"Use `.at[...].get(out_sharding=)`").
"""

import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from camels_jax import checks

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def make_mesh(axis: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh named `axis` over all devices (of every process)."""
  return jax.make_mesh((jax.device_count(),), (axis,), axis_types=(AxisType.Auto,))


def mesh_config() -> ml_collections.ConfigDict:
  """The `mesh` section of a job config."""
  c = ml_collections.ConfigDict()
  c.fsdp = 1  # devices that split each parameter (FSDP; divides the device count); the rest split the data
  return c


RULES = {"fsdp": checks.count}


def job_mesh(config) -> Mesh:
  """The (data, fsdp) mesh of a job config (fsdp 1 when it has no `mesh` section)."""
  fsdp = config.mesh.fsdp if "mesh" in config else 1
  if jax.device_count() % fsdp:
    raise checks.ConfigError(f"mesh.fsdp={fsdp} must divide the {jax.device_count()} devices")
  return make_fsdp_mesh(fsdp)


def mesh_of(tree) -> Mesh:
  """The mesh `tree`'s arrays were placed on (by `place_params` / `replicate`), else a (data, fsdp=1) mesh
  over all devices: a step that meets them must use that same mesh for its other inputs."""
  for x in jax.tree.leaves(tree):
    if isinstance(getattr(x, "sharding", None), NamedSharding):
      return x.sharding.mesh
  return make_fsdp_mesh(1)


def make_fsdp_mesh(fsdp: int) -> Mesh:
  """A (data, fsdp) mesh over all devices: `fsdp` devices share each parameter, the rest split streams."""
  if fsdp < 1 or jax.device_count() % fsdp:
    raise ValueError(f"make_fsdp_mesh: fsdp={fsdp} does not divide the {jax.device_count()} devices")
  return jax.make_mesh((jax.device_count() // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS),
                       axis_types=(AxisType.Auto, AxisType.Auto))


def fsdp_spec(shape, mesh, lead: tuple = ()) -> P:
  """`lead` (mesh axes of the leading dimensions, e.g. the streams' "data"), then FSDP_AXIS on the largest
  remaining dimension its size divides; whole when none does or the mesh has no FSDP_AXIS.

  The fallback of `param_shardings` for parameters without logical axis names.
  """
  size = dict(mesh.shape).get(FSDP_AXIS, 1)
  rest = tuple(shape[len(lead):])
  spec = [None] * len(rest)
  if size > 1:
    fits = [i for i in np.argsort(rest, kind="stable")[::-1] if rest[i] % size == 0]
    if fits:
      spec[fits[0]] = FSDP_AXIS
  return P(*lead, *spec)


# Which mesh axis the logical axes of the parameters (nnx metadata: `transformer.VOCAB_AXIS`, ...) go to under
# FSDP, in order of preference: a parameter is split on the first of its axes listed here that the FSDP axis
# divides, and is otherwise whole. "layers" is never split: the layer scan takes one block per step.
FSDP_RULES = (("vocab", FSDP_AXIS), ("mlp", FSDP_AXIS), ("heads", FSDP_AXIS), ("embed", FSDP_AXIS),
              ("pos", FSDP_AXIS))


def logical_spec(names: tuple[str, ...], shape, mesh, lead: tuple = ()) -> P:
  """`lead`, then the mesh axis `FSDP_RULES` gives the first of the logical axes `names` (one per dimension
  after the lead) that it divides; whole when none does or the mesh has no FSDP axis."""
  rest = tuple(shape[len(lead):])
  if len(names) != len(rest):
    raise ValueError(f"logical_spec: axis names {names} do not fit the shape {tuple(shape)} after {len(lead)} "
                     f"leading axes")
  spec = [None] * len(rest)
  sizes = dict(mesh.shape)
  for logical, axis in FSDP_RULES:
    if logical in names and sizes.get(axis, 1) > 1 and rest[names.index(logical)] % sizes[axis] == 0:
      spec[names.index(logical)] = axis
      break
  return P(*lead, *spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(tree, mesh: Mesh, lead: tuple = ()):
  """A NamedSharding per parameter of `tree` (params, optimizer states; arrays or ShapeDtypeStructs):

  - by its logical axis names (`logical_spec`) when it carries them (every parameter of the base model, and
    the optimizer moments of such parameters, which keep their metadata);
  - by `fsdp_spec`'s shape rule when it does not (the weighting model's head, MAC's networks, counters).

  `lead` names the mesh axes of leading dimensions added in front of the parameters (e.g. per-stream copies
  on "data"). The result is a prefix of `tree`, for `jax.device_put` and `jax.jit`'s shardings.
  """

  def one(x):
    value = x.get_value() if _is_variable(x) else x
    shape = tuple(getattr(value, "shape", np.shape(value)))
    names = x.get_metadata().get("out_sharding") if _is_variable(x) else None
    if names:
      return NamedSharding(mesh, logical_spec(tuple(names), shape, mesh, lead))
    return NamedSharding(mesh, fsdp_spec(shape, mesh, lead))

  return jax.tree.map(one, tree, is_leaf=_is_variable)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (params, optimizer state, scalars)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, axis: str | None = None, dim: int = 0) -> NamedSharding:
  """Dimension `dim` (the batch) split over mesh axis `axis` (default: the mesh's first), the rest whole.

  The same sharding fits arrays of any rank > dim.
  """
  return NamedSharding(mesh, P(*([None] * dim), axis or mesh.axis_names[0]))


def process_rows(n: int, mesh: Mesh, axis: str | None = None) -> list[int]:
  """The rows of an n-row batch split over `axis` that this process's devices hold, ascending.

  Every row on one process; in a multi-process run each process builds (reads, tokenizes, pads) only these.
  """
  axis = axis or mesh.axis_names[0]
  if n % mesh.shape[axis]:
    raise ValueError(f"process_rows: {n} rows do not divide over the {mesh.shape[axis]} devices of mesh axis "
                     f"{axis!r}")
  index_map = batch_sharded(mesh, axis).addressable_devices_indices_map((n,))
  return sorted({row for index in index_map.values() for row in range(n)[index[0]]})


def shard_rows(rows: Mapping[str, np.ndarray], n: int, mesh: Mesh, axis: str | None = None,
               dim: int = 0) -> dict[str, jax.Array]:
  """Global arrays of an n-row batch from this process's rows only (`process_rows`, in that order).

  Args:
    rows: name -> array whose dimension `dim` holds this process's rows of the batch.
    n: the global number of rows.
    mesh, axis: the mesh, and the axis to split the rows over (default: the mesh's first).
    dim: the batch dimension (1 for micro-batches stacked on a leading accumulation axis).

  Returns:
    name -> global jax.Array with `batch_sharded(mesh, axis, dim)`; each process transfers only its devices'
    shards.
  """
  sharding = batch_sharded(mesh, axis, dim)
  local = {row: i for i, row in enumerate(process_rows(n, mesh, axis))}
  out = {}
  for key, value in rows.items():
    value = np.asarray(value)
    shape = value.shape[:dim] + (n,) + value.shape[dim + 1:]

    def shard(index, value=value):
      picked = [local[row] for row in range(n)[index[dim]]]
      return value[index[:dim] + (picked,) + index[dim + 1:]]

    out[key] = jax.make_array_from_callback(shape, sharding, shard)
  return out


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, axis: str | None = None,
                dim: int = 0) -> dict[str, jax.Array]:
  """Places a whole batch (equal in every process) on the mesh, split along dimension `dim`.

  Args:
    batch: name -> array with the batch on dimension `dim`, the same global batch in every process.
    mesh: the mesh.
    axis: the mesh axis to split over (default: the mesh's first).
    dim: the batch dimension.

  Returns:
    name -> global jax.Array with `batch_sharded(mesh, axis, dim)`.

  Raises:
    ValueError: naming the key, if an array has no dimension `dim` or its batch size does not divide evenly
      over the devices along `axis`.
  """
  axis = axis or mesh.axis_names[0]
  sizes = set()
  for key, value in batch.items():
    shape = np.shape(value)
    if len(shape) <= dim:
      raise ValueError(f"shard_batch: batch[{key!r}] has shape {shape}: no batch dimension {dim} to split")
    if shape[dim] % mesh.shape[axis]:
      raise ValueError(f"shard_batch: batch[{key!r}] has batch size {shape[dim]} (shape {shape}), "
                       f"which does not divide over the {mesh.shape[axis]} devices of mesh axis {axis!r}")
    sizes.add(shape[dim])
  if len(sizes) > 1:
    raise ValueError(f"shard_batch: the arrays' batch sizes differ: {sorted(sizes)}")
  if not sizes:
    return {}
  n = sizes.pop()
  rows = process_rows(n, mesh, axis)
  return shard_rows({k: np.take(np.asarray(v), rows, axis=dim) for k, v in batch.items()}, n, mesh, axis, dim)


def place(tree, shardings):
  """`tree` put on `shardings` (one per leaf, or a prefix of `tree`); all processes pass equal values."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def host(x):
    # jax 0.10's device_put of a process-local jax.Array onto a multi-process sharding builds an array
    # whose shards cannot be listed (orbax fails on it); from host memory it is built right.
    return np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x

  return jax.device_put(jax.tree.map(host, tree), shardings)


def to_host(x) -> np.ndarray:
  """The whole value of an array as numpy, also when it is split over devices of other processes.

  A multi-process collective then (every process calls it at the same point, as they run in lockstep).
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate(tree, mesh: Mesh):
  """`tree` with every leaf copied to every device of `mesh` (all processes pass equal values)."""
  return place(tree, replicated(mesh))


def place_params(tree, mesh: Mesh, lead: tuple = ()):
  """Parameters (or optimizer states) on `mesh`, split over its FSDP axis by `param_shardings`; replicated
  on a mesh without one (or with fsdp = 1)."""
  return place(tree, param_shardings(tree, mesh, lead))


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
  # CPU devices of several processes exchange collectives over gloo (TCP); without it a cross-process
  # all-reduce on CPU fails. Accelerators use their own (NCCL, ICI) whatever this says.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True
