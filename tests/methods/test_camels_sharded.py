"""8 (fake CPU) devices give the same meta-gradient as 1: streams sharded over a mesh."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np

from tests.tiny_config import REPO

_CHILD = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np
from tests.methods import test_camels_sharded as t
np.savez({out!r}, *t.meta_gradient(sharded=True))
"""


def meta_gradient(sharded: bool):
  """Leaves of the meta-gradient of the mean meta loss over 8 streams (each its own batch and base)."""
  from camels_jax import sharding  # pylint: disable=g-import-not-at-top
  from camels_jax.adapt import inner
  from camels_jax.methods import camels
  from tests.methods import camels_fixtures as fx

  base, wm_graphdef, wm_params = fx.tiny("float32")
  mcfg = camels.MetaConfig(inner=inner.InnerConfig(), inner_lr=0.1)
  meta = camels.init_meta_params(wm_params, mcfg)
  batches = [fx.batch(3, seed=i) for i in range(8)]
  batch_P = {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}
  base_P = jax.tree.map(lambda x: np.broadcast_to(x, (8,) + x.shape), base.params)
  loss = functools.partial(camels.meta_loss_streams, graphdef=base.graphdef, wm_graphdef=wm_graphdef,
                           mcfg=mcfg)
  grad = jax.grad(lambda m, b, x: loss(m, b, x)[0])
  if sharded:
    mesh = sharding.make_mesh()
    assert mesh.size == 8
    meta = sharding.replicate(meta, mesh)
    base_P = jax.device_put(base_P, sharding.batch_sharded(mesh))
    batch_P = sharding.shard_batch(batch_P, mesh)
    assert len(batch_P["doc_tokens_BxL"].sharding.device_set) == 8
  return [np.asarray(g) for g in jax.tree.leaves(jax.jit(grad)(meta, base_P, batch_P))]


def test_eight_devices_give_the_same_meta_gradient_as_one(tmp_path):
  out = str(tmp_path / "grads.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", _CHILD.format(repo=REPO, out=out)], env=env, check=True,
                 timeout=900)
  sharded = np.load(out)
  single = meta_gradient(sharded=False)
  assert len(sharded.files) == len(single)
  for i, want in enumerate(single):
    # float32 sums over a different partition of the batch: equal up to 1e-5 of each leaf's scale.
    got = sharded[f"arr_{i}"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (i, np.abs(got - want).max())
  assert max(float(np.abs(g).max()) for g in single) > 0
