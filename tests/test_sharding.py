"""Data parallelism on 8 simulated CPU devices, and restoring a checkpoint onto that mesh.

The pytest process has already started JAX with one CPU device, and the device count cannot change
after start-up, so the 8-device checks run in one child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8; it prints its measurements as JSON and the
assertions are made here.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from camels_jax import sharding
from camels_jax.checkpoint import Checkpointer

N_DEVICES = 8

_CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from camels_jax import sharding
    from camels_jax.checkpoint import Checkpointer
    from camels_jax.models import transformer
    from camels_jax.models.config import ModelConfig

    ckpt_dir = sys.argv[1]
    out = {"device_count": jax.device_count()}
    cfg = ModelConfig(arch="llama", vocab_size=32, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2,
                      d_ff=24, max_len=16, tie_embeddings=False)
    # Random values on the real param structure; transformer.init would compile its initialisers
    # op by op, which costs seconds and tests nothing here.
    rng = np.random.default_rng(0)
    graphdef, abstract_params = transformer.abstract(cfg)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape).astype(s.dtype)),
                          abstract_params)

    def loss_fn(params, batch):
      # Mean next-token NLL over the real tokens of the whole (global) batch.
      logits_BxLxV = transformer.apply(graphdef, params, batch["tokens"], batch["mask"])
      logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1])
      nll_BxL = -jnp.take_along_axis(logp_BxLxV, batch["tokens"][:, 1:, None], -1)[..., 0]
      weight_BxL = batch["mask"][:, 1:].astype(jnp.float32)
      return (nll_BxL * weight_BxL).sum() / weight_BxL.sum()

    step = jax.jit(jax.value_and_grad(loss_fn))
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (16, 12)).astype(np.int32),
             "mask": (rng.random((16, 12)) < 0.8).astype(np.int32)}
    batch["mask"][:, 0] = 1

    # Reference: everything on the default (first) device.
    loss_1, grads_1 = step(params, batch)

    mesh = sharding.make_mesh()
    with jax.set_mesh(mesh):
      sharded = sharding.shard_batch(batch, mesh)
      loss_8, grads_8 = step(sharding.replicate(params, mesh), sharded)
    out["grad_specs"] = sorted({str(g.sharding.spec) for g in jax.tree.leaves(grads_8)})
    out["loss"] = [float(loss_1), float(loss_8)]
    # In numpy: eager jnp ops would each compile, for seconds in total.
    grads_1, grads_8 = ([np.asarray(g) for g in jax.tree.leaves(t)] for t in (grads_1, grads_8))
    out["grad_max_abs_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(grads_1, grads_8))
    out["grad_max_abs"] = max(float(np.abs(g).max()) for g in grads_1)
    stacked = sharding.shard_batch({"x": np.arange(64.0).reshape(2, 16, 2)}, mesh, dim=1)["x"]
    out["stacked_shards"] = sorted({tuple(s.data.shape) for s in stacked.addressable_shards})
    out["stacked_equal"] = bool((np.asarray(stacked) == np.arange(64.0).reshape(2, 16, 2)).all())
    shards = sharded["tokens"].addressable_shards
    out["batch_shards"] = sorted({tuple(s.data.shape) for s in shards})
    out["batch_devices"] = len({s.device for s in shards})
    try:
      sharding.shard_batch({"tokens": np.zeros((12, 3))}, mesh)
    except ValueError as e:
      out["indivisible_error"] = str(e)

    # Restore the single-device checkpoint written by the test onto the 8-device mesh: w replicated,
    # rows_BxD split over the batch axis.
    target = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=sharding.replicated(mesh)),
              "rows_BxD": jax.ShapeDtypeStruct((16, 2), jnp.float32,
                                               sharding=sharding.batch_sharded(mesh))}
    with Checkpointer(ckpt_dir) as ckpt:
      restored = ckpt.restore(None, target)
    out["restored"] = {
        name: {"spec": str(x.sharding.spec), "mesh_devices": x.sharding.mesh.size,
               "same_sharding": x.sharding == target[name].sharding,
               "n_shards": len(x.addressable_shards),
               "shard_shape": list(x.addressable_shards[0].data.shape),
               "value": np.asarray(x).tolist()}
        for name, x in restored.state.items()}
    out["restored_meta"] = restored.meta
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """The child's measurements; the checkpoint it restores is saved here, by a 1-device process."""
  ckpt_dir = tmp_path_factory.mktemp("ckpt")
  saved = {"w": np.arange(12, dtype=np.float32).reshape(4, 3),
           "rows_BxD": np.arange(32, dtype=np.float32).reshape(16, 2)}
  with Checkpointer(str(ckpt_dir)) as ckpt:
    ckpt.save(5, saved, meta={"data": {"index": 80}})
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={N_DEVICES}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt_dir)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), saved


def test_data_parallel_loss_and_grad_match_single_device(eight_devices):
  out, _ = eight_devices
  assert out["device_count"] == N_DEVICES
  # Each device holds 2 of the 16 rows; the gradients come back replicated.
  assert out["batch_devices"] == N_DEVICES and out["batch_shards"] == [[2, 12]]
  assert out["stacked_shards"] == [[2, 2, 2]] and out["stacked_equal"]  # split on dimension 1
  assert out["grad_specs"] == ["P()"]
  loss_1, loss_8 = out["loss"]
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6, atol=1e-6)
  assert out["grad_max_abs"] > 1e-3  # the comparison below is not vacuous
  assert out["grad_max_abs_diff"] <= 1e-6
  assert out["indivisible_error"] == (
      "shard_batch: batch['tokens'] has batch size 12 (shape (12, 3)), which does not divide over "
      "the 8 devices of mesh axis 'data'")


def test_restore_onto_mesh_gives_requested_shardings(eight_devices):
  out, saved = eight_devices
  w, rows = out["restored"]["w"], out["restored"]["rows_BxD"]
  assert w["same_sharding"] and w["spec"] == "P()" and w["mesh_devices"] == N_DEVICES
  assert w["n_shards"] == N_DEVICES and w["shard_shape"] == [4, 3]  # a full copy per device
  assert rows["same_sharding"] and rows["spec"] == "P('data',)"
  assert rows["n_shards"] == N_DEVICES and rows["shard_shape"] == [2, 2]
  np.testing.assert_array_equal(w["value"], saved["w"])
  np.testing.assert_array_equal(rows["value"], saved["rows_BxD"])
  assert out["restored_meta"] == {"data": {"index": 80}}


def test_helpers_on_one_device():
  mesh = sharding.make_mesh("batch")
  assert mesh.axis_names == ("batch",) and mesh.size == jax.device_count()
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  out = sharding.shard_batch({"x": np.ones((4, 2), np.float32)}, mesh)
  assert out["x"].sharding == sharding.batch_sharded(mesh)
  assert sharding.process_rows(4, mesh) == [0, 1, 2, 3]  # one process holds every row
  stacked = np.arange(24, dtype=np.float32).reshape(2, 4, 3)  # micro-batches on a leading axis
  out = sharding.shard_batch({"x": stacked}, mesh, dim=1)
  assert out["x"].sharding.spec == P(None, "batch")
  np.testing.assert_array_equal(np.asarray(out["x"]), stacked)
  with pytest.raises(ValueError, match=r"batch sizes differ: \[2, 4\]"):
    sharding.shard_batch({"x": np.ones((4, 2)), "y": np.ones((2, 2))}, mesh)
  tree = sharding.replicate({"a": jnp.ones(3), "b": np.zeros((2, 2))}, mesh)
  assert all(x.sharding == sharding.replicated(mesh) for x in jax.tree.leaves(tree))
  with pytest.raises(ValueError, match=r"batch\['step'\] has shape \(\): no batch dimension 0"):
    sharding.shard_batch({"step": np.int32(3)}, mesh)
  np.testing.assert_array_equal(sharding.to_host(out["x"]), stacked)  # the cross-process gather: test_multiprocess
  assert isinstance(sharding.to_host(np.float32(2)), np.ndarray)


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, True),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_multiprocess_detection(env, expected):
  assert sharding._multiprocess_env(env) is expected


def test_initialize_distributed_is_a_no_op_locally(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri",
              "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  assert sharding.initialize_distributed() is False
  assert not jax.distributed.is_initialized()


def test_fsdp_spec_splits_the_largest_dimension_the_axis_divides():
  from jax.sharding import AbstractMesh  # pylint: disable=g-import-not-at-top
  mesh = AbstractMesh((4, 2), (sharding.DATA_AXIS, sharding.FSDP_AXIS))
  assert sharding.fsdp_spec((49152, 576), mesh) == P("fsdp", None)  # the embedding's vocabulary
  assert sharding.fsdp_spec((30, 576, 1536), mesh) == P(None, None, "fsdp")  # stacked kernels: the wide side
  assert sharding.fsdp_spec((8, 30, 576, 1536), mesh, lead=("data",)) == P("data", None, None, "fsdp")
  assert sharding.fsdp_spec((25, 7), mesh) == P(None, None)  # nothing divides: whole
  assert sharding.fsdp_spec((576,), AbstractMesh((8,), (sharding.DATA_AXIS,))) == P(None)  # no fsdp axis


def test_make_fsdp_mesh_refuses_a_size_that_does_not_divide_the_devices():
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_fsdp_mesh(jax.device_count() + 1)
  assert sharding.make_fsdp_mesh(1).axis_names == (sharding.DATA_AXIS, sharding.FSDP_AXIS)


def test_param_shardings_follow_the_logical_axis_names():
  from camels_jax.models import transformer  # pylint: disable=g-import-not-at-top
  from camels_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top

  mesh = AbstractMesh((2, 4), (sharding.DATA_AXIS, sharding.FSDP_AXIS))
  cfg = ModelConfig(arch="llama", vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=22,
                    max_len=16, tie_embeddings=False)
  _, params = transformer.abstract(cfg)
  specs = sharding.param_shardings(params, mesh)
  spec = lambda *path: functools.reduce(lambda node, key: node[key], path, specs).spec
  assert spec("embed", "embedding") == P("fsdp", None)  # (vocab, embed): the vocabulary
  assert spec("lm_head", "kernel") == P(None, "fsdp")  # (embed, vocab)
  assert spec("blocks", "attn", "q", "kernel") == P(None, None, "fsdp")  # (layers, embed, heads)
  assert spec("blocks", "attn", "o", "kernel") == P(None, "fsdp", None)  # (layers, heads, embed)
  # (layers, embed, mlp) with an MLP width of 22, which 4 does not divide: the next preference, embed.
  assert params["blocks"]["mlp"]["gate"]["kernel"].get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  assert spec("blocks", "mlp", "gate", "kernel") == P(None, "fsdp", None)
  # With a width of 24 the MLP's own axis is split, on both of its kernels.
  _, params_24 = transformer.abstract(cfg.replace(d_ff=24))
  specs_24 = sharding.param_shardings(params_24, mesh)
  assert specs_24["blocks"]["mlp"]["gate"]["kernel"].spec == P(None, None, "fsdp")
  assert specs_24["blocks"]["mlp"]["down"]["kernel"].spec == P(None, "fsdp", None)
  assert spec("blocks", "ln1", "scale") == P(None, "fsdp")  # (layers, embed); layers is never split
  # Per-stream copies on "data" keep the names after the leading axis; unnamed arrays fall back to shapes.
  copies = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2,) + x.shape, x.dtype), params)
  lead = sharding.param_shardings(copies, mesh, lead=(sharding.DATA_AXIS,))
  assert lead["blocks"]["attn"]["q"]["kernel"].spec == P("data", None, None, "fsdp")
  assert sharding.param_shardings({"head": np.zeros((10, 8))}, mesh)["head"].spec == P(None, "fsdp")
  with pytest.raises(ValueError, match="do not fit the shape"):
    sharding.logical_spec(("embed",), (4, 16), mesh)


def test_job_mesh_reads_mesh_fsdp_and_refuses_one_that_does_not_divide_the_devices():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from camels_jax import checks  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict({"mesh": sharding.mesh_config()})
  mesh = sharding.job_mesh(config)
  assert dict(mesh.shape) == {sharding.DATA_AXIS: jax.device_count(), sharding.FSDP_AXIS: 1}
  assert sharding.job_mesh(ml_collections.ConfigDict()).shape == mesh.shape  # no section: fsdp 1
  config.mesh.fsdp = jax.device_count() + 1
  with pytest.raises(checks.ConfigError, match=r"mesh.fsdp=2 must divide the 1 devices"):
    sharding.job_mesh(config)
