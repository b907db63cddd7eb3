"""Checkpointer: round trips (nnx params, optax state, PRNG key, JSON meta), retention, crashes."""

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from camels_jax import checkpoint
from camels_jax.checkpoint import Checkpointer, check_finite
from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig

CFG = ModelConfig(arch="llama", vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                  d_ff=24, max_len=16, tie_embeddings=False)
TX = optax.adam(1e-2)


@functools.cache
def _initial_state():
  _, params = transformer.init(CFG, seed=0)
  return {"params": params, "opt": TX.init(params)}


def make_state(seed: int = 0):
  """{"params": nnx.State, "opt": adam state}, every leaf (mu, nu, count too) distinct per seed.

  The values are shifted with numpy rather than by an optax update: eager JAX compiles each new op
  on first use, which costs seconds here, while a checkpoint only cares about structure and bits.
  """
  def shift(x):
    return jnp.asarray((np.asarray(x) * (seed + 2) + seed + 1).astype(x.dtype))

  return jax.tree.map(shift, _initial_state())


def abstract_state():
  """The state's shapes only (what a resuming job has before it restores)."""
  _, params = transformer.abstract(CFG)
  return {"params": params, "opt": jax.eval_shape(TX.init, params)}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_params_opt_state_rng_and_meta(tmp_path):
  state = make_state()
  rng = jax.random.split(jax.random.key(42))[1]
  meta = {"data": {"epoch": np.int64(1), "index": 17}, "config_hash": "abc"}
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(3, state, meta=meta, rng=rng, metrics={"loss": np.float32(2.5)})
    restored = ckpt.restore(3, abstract_state())

  assert restored.step == 3
  assert isinstance(restored.state["params"], nnx.State)  # containers rebuilt from the target
  assert isinstance(restored.state["opt"][0], optax.ScaleByAdamState)
  assert_trees_equal(restored.state, state)
  assert restored.meta == {"data": {"epoch": 1, "index": 17}, "config_hash": "abc"}
  assert restored.metrics == {"loss": 2.5}
  # The key comes back typed and bit-identical, so the random stream continues where it stopped.
  assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
  np.testing.assert_array_equal(jax.random.normal(restored.rng, (4,)), jax.random.normal(rng, (4,)))


@pytest.mark.parametrize("key", [
    jax.random.key(1),
    jax.random.split(jax.random.key(2), 3),  # a batch of typed keys
    jax.random.key(3, impl="rbg"),  # not the default implementation
    jax.random.PRNGKey(4),  # a raw uint32 key stays raw
], ids=["typed", "typed-batch", "rbg", "raw"])
def test_key_json_round_trip(key):
  back = checkpoint.key_from_json(checkpoint.key_to_json(key))
  assert back.dtype == key.dtype and back.shape == key.shape
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    assert str(jax.random.key_impl(back)) == str(jax.random.key_impl(key))
    key, back = jax.random.key_data(key), jax.random.key_data(back)
  np.testing.assert_array_equal(back, key)


def test_resume_latest_in_a_new_process_view(tmp_path):
  with Checkpointer(str(tmp_path), max_to_keep=5) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, make_state(seed=step), meta={"data": {"index": 10 * step}})
  # A fresh Checkpointer (as after a restart) sees what is on disk.
  with Checkpointer(str(tmp_path), max_to_keep=5) as ckpt:
    assert ckpt.latest_step() == 3
    restored = ckpt.restore(None, abstract_state())
    assert restored.step == 3 and restored.meta == {"data": {"index": 30}}
    assert restored.rng is None and restored.metrics is None
    assert_trees_equal(restored.state, make_state(seed=3))
    # A concrete state works as the target too (its arrays' shardings are reused).
    assert_trees_equal(ckpt.restore(2, make_state(seed=0)).state, make_state(seed=2))


def test_max_to_keep_deletes_old_steps(tmp_path):
  state = {"w": np.arange(4.0)}
  with Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
    for step in range(1, 6):
      ckpt.save(step, state)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  assert sorted(os.listdir(tmp_path)) == ["4", "5"]


@pytest.mark.parametrize("mode,values,best", [
    ("min", {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 5.0}, 2),
    ("max", {1: 3.0, 2: 1.0, 3: 9.0, 4: 4.0, 5: 5.0}, 3),
])
def test_best_by_metric_is_kept_beyond_max_to_keep(tmp_path, mode, values, best):
  with Checkpointer(str(tmp_path), max_to_keep=2, best_metric="score", best_mode=mode) as ckpt:
    for step, value in values.items():
      ckpt.save(step, {"w": np.full(3, step, np.float32)}, meta={"step": step},
                metrics={"score": value, "other": -value})
    ckpt.wait()
    assert ckpt.all_steps() == sorted({best, 4, 5})
    assert ckpt.best_step() == best
  with Checkpointer(str(tmp_path), max_to_keep=2, best_metric="score", best_mode=mode) as ckpt:
    restored = ckpt.restore_best({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
  assert restored.step == best and restored.meta == {"step": best}
  assert restored.metrics == {"score": values[best], "other": -values[best]}
  np.testing.assert_array_equal(restored.state["w"], np.full(3, best, np.float32))


def test_save_rejects_bad_input_before_writing(tmp_path):
  with Checkpointer(str(tmp_path), best_metric="loss") as ckpt:
    ckpt.save(2, {"w": np.zeros(2)}, metrics={"loss": 1.0})
    with pytest.raises(ValueError, match="step 2 is not newer than the latest saved step 2"):
      ckpt.save(2, {"w": np.zeros(2)})
    with pytest.raises(ValueError, match="lack best_metric 'loss'"):
      ckpt.save(3, {"w": np.zeros(2)}, metrics={"acc": 1.0})
    with pytest.raises(ValueError, match="'loss' is nan"):
      ckpt.save(3, {"w": np.zeros(2)}, metrics={"loss": float("nan")})
    with pytest.raises(TypeError, match="meta is not JSON-serializable"):
      ckpt.save(3, {"w": np.zeros(2)}, meta={"f": object()})
    with pytest.raises(FileNotFoundError, match="no step 7"):
      ckpt.restore(7, {"w": np.zeros(2)})
    assert ckpt.all_steps() == [2]
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(str(tmp_path / "empty")).restore(None, None)


# A child process saves step 1, then is SIGKILLed while saving step 2: either as soon as step 2's
# tmp directory appears, or in finalize(), the call that renames the finished tmp directory to its
# step, when every byte of step 2 is on disk but uncommitted (the worst case for a reader that
# trusted file contents).
_CRASH_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from camels_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1])
    w = np.ones((2048, 2048), np.float32)  # 16 MB, so writing step 2 takes a moment
    ckpt.save(1, {"w": w}, meta={"step": 1})
    ckpt.wait()

    async def park(self):
      print("FINALIZING", flush=True)
      time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = park
    ckpt.save(2, {"w": 2 * w}, meta={"step": 2})
    ckpt.wait()
""")


def _step2_tmp_dirs(directory) -> list[str]:
  return [name for name in os.listdir(directory) if name.startswith("2.")]


@pytest.mark.parametrize("kill_at", ["tmp_dir_created", "finalizing"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, kill_at):
  directory = tmp_path / "ckpt"
  with open(tmp_path / "stderr.txt", "w") as stderr:
    child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, str(directory)],
                             stdout=subprocess.PIPE, stderr=stderr, text=True)
  watchdog = threading.Timer(120, child.kill)  # a hung child fails the test instead of hanging it
  watchdog.start()
  try:
    if kill_at == "tmp_dir_created":
      while not (directory.is_dir() and _step2_tmp_dirs(directory)) and child.poll() is None:
        time.sleep(0.005)
    else:
      while (line := child.stdout.readline()) and line.strip() != "FINALIZING":
        pass
    child.send_signal(signal.SIGKILL)
    returncode = child.wait()
  finally:
    watchdog.cancel()
    child.kill()
    child.stdout.close()
  assert returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]
  assert _step2_tmp_dirs(directory) and "2" not in os.listdir(directory)  # step 2: tmp dir only

  with Checkpointer(str(directory)) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    restored = ckpt.restore(None, {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)})
  assert restored.meta == {"step": 1}
  np.testing.assert_array_equal(restored.state["w"], 1.0)
  assert sorted(os.listdir(directory)) == ["1"]  # the new Checkpointer removed the tmp directory


def test_failed_background_save_raises_on_wait_and_keeps_previous(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  async def disk_full(self):
    raise OSError("disk full")

  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, {"w": np.ones(3)}, meta={"step": 1})
    ckpt.wait()
    with monkeypatch.context() as patch:
      patch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
      ckpt.save(2, {"w": np.ones(3)}, meta={"step": 2})  # async: returns before the failure
      with pytest.raises(OSError, match="disk full"):
        ckpt.wait()
    assert ckpt.latest_step() == 1
    ckpt.save(2, {"w": np.full(3, 2.0)}, meta={"step": 2})  # the step can be saved again
  with Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore(None, {"w": np.zeros(3)}).meta == {"step": 2}


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints (a file truncated or overwritten after the save): resume from the newest intact
# step, or one line naming the step and what to do.


def _three_steps(directory) -> dict:
  """Steps 1-3 of a state, each step's state distinct; returns the states by step."""
  states = {step: {"w": np.arange(1000.0, dtype=np.float32) * step, "b": np.full(3, step, np.float32)}
            for step in (1, 2, 3)}
  with Checkpointer(str(directory), max_to_keep=3, best_metric="loss") as ckpt:
    for step, state in states.items():
      ckpt.save(step, state, meta={"data": {"index": step}}, metrics={"loss": 5.0 - step})
  return states


def _truncate_state(directory, step: int) -> None:
  """Cuts the largest array data file of a step to 100 bytes (what a partial copy leaves)."""
  files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(directory, str(step), "state"))
           for f in names if f != "commit_success.txt"]
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(100)


ABSTRACT = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}


# Orbax drops a coroutine that raised on the cut data; Python can only report that (the CLI logs it).
pytestmark_unraisable = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytestmark_unraisable
@pytest.mark.parametrize("damage", ["truncated array data", "garbage meta"])
def test_resume_falls_back_to_the_newest_intact_step(tmp_path, damage):
  states = _three_steps(tmp_path)
  if damage == "truncated array data":
    _truncate_state(tmp_path, 3)
  else:
    (tmp_path / "3" / "meta" / "metadata").write_text("{garbage")
  with Checkpointer(str(tmp_path), max_to_keep=3, best_metric="loss") as ckpt:
    restored = ckpt.restore(None, ABSTRACT)
    assert restored.step == 2 and restored.meta == {"data": {"index": 2}}
    assert_trees_equal(restored.state, states[2])
    # The damaged step is kept aside, not deleted, and the run goes on saving under its number.
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.damaged"] and ckpt.all_steps() == [1, 2]
    ckpt.save(3, states[3], meta={"data": {"index": 3}}, metrics={"loss": 2.0})
  with Checkpointer(str(tmp_path), max_to_keep=3, best_metric="loss") as ckpt:
    assert ckpt.restore(None, ABSTRACT).step == 3


@pytestmark_unraisable
def test_damaged_best_or_named_step_is_one_clear_error(tmp_path):
  _three_steps(tmp_path)
  _truncate_state(tmp_path, 3)
  step3 = os.path.join(str(tmp_path), "3")
  with Checkpointer(str(tmp_path), max_to_keep=3, best_metric="loss") as ckpt:
    for restore in (lambda: ckpt.restore_best(ABSTRACT), lambda: ckpt.restore(3, ABSTRACT)):
      with pytest.raises(checkpoint.DamagedCheckpoint) as e:
        restore()
      message = str(e.value)
      assert message.startswith(f"checkpoint step 3 in {tmp_path} is damaged (")
      assert f"remove {step3} to go on from step 2, or remove {tmp_path} to start again" in message
      assert "\n" not in message and "TensorStore({" not in message
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]  # nothing moved when nothing was resumed


def test_no_intact_step_or_unreadable_metrics_is_one_clear_error(tmp_path):
  _three_steps(tmp_path / "a")
  for step in (1, 2, 3):
    (tmp_path / "a" / str(step) / "meta" / "metadata").write_text("")
  with Checkpointer(str(tmp_path / "a"), max_to_keep=3) as ckpt:
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"no checkpoint in .* reads back \(steps 1, 2, 3; step 3"
                       r".*remove .* to start again"):
      ckpt.restore(None, ABSTRACT)
  assert sorted(os.listdir(tmp_path / "a")) == ["1", "2", "3"]

  _three_steps(tmp_path / "b")
  (tmp_path / "b" / "3" / "metrics" / "metrics").write_text("{garbage")
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"checkpoint step 3 in .* is damaged \(its metrics .*"
                     r"remove .*3 to go on from step 2"):
    Checkpointer(str(tmp_path / "b"), max_to_keep=3, best_metric="loss")


def test_a_file_where_the_checkpoint_directory_goes_is_a_user_error(tmp_path):
  (tmp_path / "camels").write_text("not a directory")
  with pytest.raises(checkpoint.checks.UserError, match="is a file, where a checkpoint directory is expected"):
    Checkpointer(str(tmp_path / "camels"))


def test_check_finite_names_step_and_tree():
  grads = {"w": jnp.ones((3, 2)), "count": jnp.int32(5), "b": jnp.array([1.0, jnp.nan])}
  check_finite(1, loss=jnp.float32(0.5), grad={"w": jnp.ones(2), "count": jnp.int32(3)})
  with pytest.raises(FloatingPointError, match=r"^step 7: non-finite grad$"):
    check_finite(7, loss=jnp.float32(0.5), grad=grads)
  with pytest.raises(FloatingPointError, match=r"^step 8: non-finite loss, grad$"):
    check_finite(8, loss=jnp.float32(jnp.inf), grad=grads)
  with pytest.raises(FloatingPointError, match=r"^step 9: non-finite loss$"):
    check_finite(9, loss=np.float32(-np.inf))
