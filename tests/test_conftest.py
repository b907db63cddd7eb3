"""The test run's own machinery (tests/conftest.py): what keeps a long-lived xdist worker alive."""

import jax
import jax.numpy as jnp

from tests import conftest


def test_freeing_compiled_executables_gives_their_memory_maps_back():
  # The fixture that runs this after every file is what keeps a worker under vm.max_map_count: past it, XLA's
  # code allocator fails ("LLVM compilation error: Cannot allocate memory") and the worker segfaults.
  conftest.free_compiled_executables()
  before = conftest.memory_maps()
  fns = [jax.jit(lambda x, k=k: jnp.sin(x) * k + jnp.cos(x) ** 2) for k in range(100)]
  for k, fn in enumerate(fns):
    fn(jnp.ones((k + 1,))).block_until_ready()
  grown = conftest.memory_maps() - before
  assert grown > 300, grown  # ~6 maps per executable
  conftest.free_compiled_executables()  # with every jitted function still referenced
  assert conftest.memory_maps() - before < grown / 4, (grown, conftest.memory_maps() - before)  # 660 -> 71 here
  assert float(fns[3](jnp.ones((4,)))[0]) == float(jnp.sin(1.0) * 3 + jnp.cos(1.0) ** 2)  # recompiles
