"""Multi-process runs on localhost: two jax.distributed processes (one CPU device each, gloo collectives over
loopback) train what one process trains, a run killed with SIGKILL resumes on another process count, the same
seed gives bitwise-identical metrics, and an FSDP mesh of 4 fake devices trains what one device trains.

Every run is the train job (QA-tuning, then CaMeLS meta-training) of configs/tiny.py, shortened, with 2
document streams so that each of two processes feeds one. The runs share a persistent compilation cache: the
second run of a program skips XLA's compile, which is most of a tiny run's time.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.tiny_config import REPO

CONFIG = os.path.join(REPO, "configs", "tiny.py")
OVERRIDES = ["--config.camels.streams=2", "--config.camels.compare=", "--config.camels.steps=4",
             "--config.camels.val_every=2", "--config.qa_tune.max_steps=2", "--config.qa_tune.val_every=1"]
TIMEOUT_S = 600
# The three tests share the one-process run: one xdist worker takes them all (README runs --dist loadgroup).
pytestmark = pytest.mark.xdist_group("multiprocess")
# Metrics that are ratios of small differences of losses (uptake over uniform's, facts/filler weight, a KL
# of nearly equal distributions) amplify float32 rounding; losses and NLLs are held to 1e-5.
LOOSE = ("uptake", "facts_filler", "kl")


def _env(cache_dir):
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(processes: int, workdir) -> list[str]:
  if processes == 1:
    return [sys.executable, "-m", "camels_jax.train", "--config", CONFIG, f"--workdir={workdir}", *OVERRIDES]
  return ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), str(processes), CONFIG,
          f"--workdir={workdir}", *OVERRIDES]


def _start(processes: int, workdir, cache_dir, devices: int = 1, extra=()) -> subprocess.Popen:
  env = _env(cache_dir) | {"PORT": str(_free_port()), "PYTHON": sys.executable}
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  # A session of its own, so a kill reaches every process of the run.
  return subprocess.Popen([*_command(processes, workdir), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run(processes: int, workdir, cache_dir, devices: int = 1, extra=()) -> dict:
  proc = _start(processes, workdir, cache_dir, devices, extra)
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 0, out[-4000:]
  with open(os.path.join(workdir, "train_results.json"), encoding="utf-8") as f:
    return json.load(f)


def _metrics(results: dict) -> dict:
  """The results without the manifest path (which names the workdir)."""
  return {k: v for k, v in results.items() if k != "manifest"}


def _assert_close(want, got, path=""):
  if isinstance(want, dict):
    assert want.keys() == got.keys(), path
    for k in want:
      _assert_close(want[k], got[k], f"{path}/{k}")
  elif isinstance(want, list):
    assert len(want) == len(got), path
    for i, (a, b) in enumerate(zip(want, got)):
      _assert_close(a, b, f"{path}[{i}]")
  elif isinstance(want, float):
    rel = 1e-3 if any(word in path for word in LOOSE) else 1e-5
    assert got == pytest.approx(want, rel=rel, abs=1e-7), path
  else:
    assert got == want, path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
  return _run(1, tmp_path_factory.mktemp("one"), cache_dir)


def test_same_seed_gives_bitwise_identical_metrics(tmp_path, one_process, cache_dir):
  again = _run(1, tmp_path / "again", cache_dir)
  assert json.dumps(_metrics(again), sort_keys=True) == json.dumps(_metrics(one_process), sort_keys=True)


def test_two_processes_match_one(tmp_path, one_process, cache_dir):
  workdir = tmp_path / "two"
  two = _run(2, workdir, cache_dir)
  _assert_close(_metrics(one_process), _metrics(two))
  assert two["camels"]["history"][-1]["val_loss"] < two["camels"]["history"][0]["val_loss"]  # it trained
  with open(workdir / "manifest.json", encoding="utf-8") as f:
    runs = json.load(f)["runs"]
  assert len(runs) == 1 and runs[0]["process_count"] == 2 and runs[0]["status"] == "ok"  # written once


def test_run_killed_on_two_processes_resumes_on_one(tmp_path, one_process, cache_dir):
  workdir = tmp_path / "killed"
  proc = _start(2, workdir, cache_dir)
  # Kill both processes once meta-training's step-2 checkpoint is committed, i.e. during steps 3-4.
  marker = workdir / "camels" / "2" / "_CHECKPOINT_METADATA"
  deadline = time.time() + TIMEOUT_S
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  alive = proc.poll() is None
  os.killpg(proc.pid, signal.SIGKILL)
  out, _ = proc.communicate()
  assert alive, f"the run ended before it could be killed: {out[-3000:]}"
  assert marker.exists() and not (workdir / "train_results.json").exists()

  resumed = _run(1, workdir, cache_dir)
  _assert_close(_metrics(one_process), _metrics(resumed))
  with open(workdir / "log.txt", encoding="utf-8") as f:
    log = f.read()
  assert "loaded the QA-tuned model" in log and "camels: resumed from step 2" in log


def test_fsdp_mesh_trains_what_one_device_trains(tmp_path, one_process, cache_dir):
  # 4 devices as data x fsdp = 2 x 2: the two streams on "data", every parameter of the base model, the
  # weighting model and Adam split 2 ways by its logical axis names (QA-tuning too). (8 fake devices for a
  # whole job can stall XLA:CPU's collective rendezvous on 2 loaded cores; tests/methods/test_camels_sharded.py
  # checks the meta-gradient on 8.)
  sharded = _run(1, tmp_path / "fsdp", cache_dir, devices=4, extra=["--config.mesh.fsdp=2"])
  _assert_close(_metrics(one_process), _metrics(sharded))
