"""Multi-process runs on localhost: two jax.distributed processes (one CPU device each, gloo collectives over
loopback) train and evaluate what one process does, a run killed with SIGKILL resumes on another process count,
the same seed gives bitwise-identical metrics, and an FSDP mesh of 4 fake devices trains what one device trains.

The train runs are the train job (QA-tuning, CaMeLS meta-training, then MAC) of configs/tiny.py, shortened, with
2 document streams so that each of two processes feeds one; the FWL job runs on a tiny configs/fwl_small.py,
and the perplexity job scores text with its head.
The runs share a persistent compilation cache: the second run of a program skips XLA's compile, which is most
of a tiny run's time.
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

# Every test runs the jobs as subprocesses on 1, 2 or 4 devices (~20 minutes for the file on 2 cores).
pytestmark = pytest.mark.slow

# A job: (config file, its overrides).
TINY = (os.path.join(REPO, "configs", "tiny.py"),
        ["--config.jobs=qa_tune,camels,mac", "--config.camels.streams=2", "--config.camels.compare=",
         "--config.camels.steps=4", "--config.camels.val_every=2", "--config.qa_tune.max_steps=2",
         "--config.qa_tune.val_every=1"])
# FWL's tiny random model (the FWL and perplexity jobs must agree on it).
FWL_MODEL = ["--config.model.random.d_model=32", "--config.model.random.n_layers=1",
             "--config.model.random.n_heads=2", "--config.model.random.n_kv_heads=1",
             "--config.model.random.d_ff=64", "--config.model.random.max_len=128"]
FWL = (os.path.join(REPO, "configs", "fwl_small.py"),
       [*FWL_MODEL, "--config.text.generated_docs=24", "--config.fwl.seq_len=64", "--config.fwl.batch_size=2",
        "--config.fwl.steps=4", "--config.fwl.val_every=2", "--config.fwl.val_windows=2", "--config.fwl.chunk=16",
        "--config.fwl.lr=1e-2", "--config.fwl.body_lr=1e-2"])
# Uniform weights, the trained weighting model and MAC's bank; the others follow the same path as uniform.
EVAL = ["--config.eval.methods=uniform,camels,mac"]
# Perplexity of FWL's tiny model on 2 generated documents; with the head of an FWL run (PPL + FWL_HEAD) or
# with dynamic evaluation.
PPL = (os.path.join(REPO, "configs", "ppl_smollm2.py"),
       ["--config.model.source=random", "--config.model.tokenizer=smollm2", *FWL_MODEL,
        "--config.generated_docs=2", "--config.dynamic.window=64", "--config.dynamic.stride=64"])
FWL_HEAD = ["--config.method=fwl"]
DYNAMIC = ["--config.method=dynamic", "--config.dynamic.stride=32", "--config.dynamic.lr=1e-2"]
RESULTS = {"train": "train_results.json", "evaluate": os.path.join("eval", "results.json"),
           "perplexity": "perplexity.json"}
# One run takes 2-4 minutes alone; beside the other xdist worker's tests on 2 cores, up to ~9.
TIMEOUT_S = 1200
# The tests share the one- and two-process runs (module fixtures): README's `--dist loadfile` gives the whole
# file to one xdist worker, which builds them once.
# Metrics that are ratios of small differences of losses (uptake over uniform's, facts/filler weight, a KL
# of nearly equal distributions) amplify float32 rounding; losses and NLLs are held to 1e-5. The meta-objective's
# entries and the changes against no adaptation are per-question differences of two NLLs near 11, each rounded
# by ~1e-6 in float32, as are MAC's paired differences against its controls ("own_minus_other_bank",
# "method_minus_control"): every LOOSE metric is held to 1e-3 relative or 1e-5 absolute.
LOOSE = ("uptake", "facts_filler", "kl", "meta_objective", "by_position", "vs_no_adaptation", "_minus_")


def _env(cache_dir):
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(processes: int, workdir, entry: str, job) -> list[str]:
  config, overrides = job
  if processes == 1:
    return [sys.executable, "-m", f"camels_jax.{entry}", "--config", config, f"--workdir={workdir}", *overrides]
  return ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), str(processes), config,
          f"--workdir={workdir}", *overrides]


def _start(processes: int, workdir, cache_dir, devices: int = 1, extra=(), entry="train",
           job=TINY) -> subprocess.Popen:
  env = _env(cache_dir) | {"PORT": str(_free_port()), "PYTHON": sys.executable, "ENTRY": f"camels_jax.{entry}"}
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  # A session of its own, so a kill reaches every process of the run.
  return subprocess.Popen([*_command(processes, workdir, entry, job), *extra], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run_logged(processes: int, workdir, cache_dir, devices: int = 1, extra=(), entry="train",
                job=TINY) -> tuple[dict, str]:
  """The run's results file and what its processes printed."""
  proc = _start(processes, workdir, cache_dir, devices, extra, entry, job)
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 0, out[-4000:]
  with open(os.path.join(workdir, RESULTS[entry]), encoding="utf-8") as f:
    return json.load(f), out


def _run(processes: int, workdir, cache_dir, devices: int = 1, extra=(), entry="train", job=TINY) -> dict:
  return _run_logged(processes, workdir, cache_dir, devices, extra, entry, job)[0]


def _metrics(results: dict, drop=("manifest",)) -> dict:
  """The results without the keys `drop` at any depth (the manifest path names the workdir)."""
  if isinstance(results, dict):
    return {k: _metrics(v, drop) for k, v in results.items() if k not in drop}
  return results


def _runs(workdir) -> list[dict]:
  with open(os.path.join(workdir, "manifest.json"), encoding="utf-8") as f:
    return json.load(f)["runs"]


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
    loose = any(word in path for word in LOOSE)
    assert got == pytest.approx(want, rel=1e-3 if loose else 1e-5, abs=1e-5 if loose else 1e-7), path
  else:
    assert got == want, path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def one_workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("one")


@pytest.fixture(scope="module")
def one_process(one_workdir, cache_dir):
  return _run(1, one_workdir, cache_dir)


@pytest.fixture(scope="module")
def two_workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("two")


@pytest.fixture(scope="module")
def two_processes(two_workdir, cache_dir):
  return _run(2, two_workdir, cache_dir)


def test_same_seed_gives_bitwise_identical_metrics(tmp_path, one_process, cache_dir):
  again = _run(1, tmp_path / "again", cache_dir)
  assert json.dumps(_metrics(again), sort_keys=True) == json.dumps(_metrics(one_process), sort_keys=True)


def test_two_processes_match_one(one_process, two_processes, two_workdir):
  _assert_close(_metrics(one_process), _metrics(two_processes))
  history = two_processes["camels"]["history"]
  assert history[-1]["val_loss"] < history[0]["val_loss"]  # it trained
  assert two_processes["mac"]["best"]["val_nll"] < two_processes["mac"]["best"]["val_nll_base"]
  runs = _runs(two_workdir)
  assert len(runs) == 1 and runs[0]["process_count"] == 2 and runs[0]["status"] == "ok"  # written once


def test_two_processes_evaluate_what_one_evaluates(one_process, one_workdir, two_processes, two_workdir,
                                                   cache_dir):
  one = _run(1, one_workdir, cache_dir, extra=EVAL, entry="evaluate")
  # The FSDP axis spans the two processes: each holds half of every parameter while they adapt in lockstep.
  two = _run(2, two_workdir, cache_dir, extra=[*EVAL, "--config.mesh.fsdp=2"], entry="evaluate")
  # Timings and per-device memory differ by construction.
  drop = ("manifest", "time_s", "memory_bytes")
  _assert_close(_metrics(one, drop), _metrics(two, drop))
  assert set(two["methods"]) == {"uniform", "camels", "mac"} and two["test_questions"] > 0
  for method in two["methods"].values():
    assert method["test"]["nll"] != two["no_adaptation"]["nll"]  # it adapted (MAC: answered with a prefix)
  runs = _runs(two_workdir)
  assert [(r["entry"], r["process_count"], r["status"]) for r in runs] == [("train", 2, "ok"),
                                                                            ("evaluate", 2, "ok")]


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
  assert "loaded the QA-tuned model" in log and f"resumed from step 2 of {workdir / 'camels'}" in log


def test_fsdp_mesh_trains_what_one_device_trains(tmp_path, one_process, cache_dir):
  # 4 devices as data x fsdp = 2 x 2: the two streams on "data", every parameter of the base model, the
  # weighting model and Adam split 2 ways by its logical axis names (QA-tuning too). (8 fake devices for a
  # whole job can stall XLA:CPU's collective rendezvous on 2 loaded cores; tests/methods/test_camels_sharded.py
  # checks the meta-gradient on 8.)
  sharded = _run(1, tmp_path / "fsdp", cache_dir, devices=4, extra=["--config.mesh.fsdp=2"])
  _assert_close(_metrics(one_process), _metrics(sharded))


def test_two_processes_train_the_fwl_head_as_one(tmp_path, cache_dir):
  one = _run(1, tmp_path / "one", cache_dir, job=FWL)
  two = _run(2, tmp_path / "two", cache_dir, extra=["--config.mesh.fsdp=2"], job=FWL)  # each holds half
  _assert_close(_metrics(one), _metrics(two))
  history = two["fwl"]["history"]
  assert history[-1]["val_nll"] < history[0]["val_nll"]  # it trained
  # The perplexity job restores the head (trained split across two processes) onto its own mesh.
  _assert_perplexity_matches(tmp_path, cache_dir, [*FWL_HEAD, f"--config.fwl_workdir={tmp_path / 'two'}"])


def test_two_processes_score_perplexity_with_dynamic_evaluation_as_one(tmp_path, cache_dir):
  result = _assert_perplexity_matches(tmp_path, cache_dir, DYNAMIC)
  assert result["updates"] > 1


def _assert_perplexity_matches(tmp_path, cache_dir, extra) -> dict:
  """Runs the perplexity job on one process and on two: one report, one process's result. Returns it."""
  one = _run(1, tmp_path / "ppl_one", cache_dir, extra=extra, entry="perplexity", job=PPL)
  two, out = _run_logged(2, tmp_path / "ppl_two", cache_dir, extra=extra, entry="perplexity", job=PPL)
  assert out.count(f"{one['method']} perplexity") == 1, out[-4000:]  # printed by process 0 alone
  _assert_close(_metrics(one, ("manifest", "time_s")), _metrics(two, ("manifest", "time_s")))
  return two
