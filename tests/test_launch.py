"""launch/slurm.sh and launch/tpu_pod.sh: their dry runs, and runs through stand-ins for scontrol / srun and
gcloud (no cluster needed). launch/local_multiprocess.sh runs for real in tests/test_multiprocess.py."""

import os
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(REPO, "launch", "slurm.sh")
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
POD_ARGS = ["my-pod", "us-central2-b", "configs/tiny.py", "--workdir=gs://b/run1", "--config.data.path=my file.json"]


def _exe(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_cluster(tmp_path):
  """A PATH with `scontrol show hostnames` (2 nodes) and an `srun` that runs its command once per task,
  locally, with SLURM_PROCID set; and a stand-in interpreter that prints what it was started with."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _exe(bin_dir / "scontrol", '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a7\\ngpu-a8\\n"\n')
  _exe(bin_dir / "srun", "#!/usr/bin/env bash\n"
       "while [[ $1 == --* ]]; do shift; done\n"
       "for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i \"$@\" & done; wait\n")
  _exe(tmp_path / "python", "#!/usr/bin/env bash\n"
       'echo "rank=$JAX_PROCESS_ID of=$JAX_NUM_PROCESSES coord=$JAX_COORDINATOR_ADDRESS args=$*"\n')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[7-8]",
             SLURM_NTASKS="4", SLURM_JOB_ID="20007", SLURM_SUBMIT_DIR=REPO, PYTHON=str(tmp_path / "python"))
  return env


def test_dry_run_prints_the_coordinator_and_every_tasks_rank(fake_cluster):
  out = subprocess.run(["bash", SLURM, "configs/tiny.py", "--workdir=/tmp/x"], env=fake_cluster | {"DRY_RUN": "1"},
                       capture_output=True, text=True, check=True).stdout
  assert "coordinator: gpu-a7:12007; processes: 4" in out  # 12000 + 20007 % 20000
  assert "-m camels_jax.train --config configs/tiny.py --distributed --workdir=/tmp/x" in out
  assert [line.split()[-1] for line in out.splitlines() if line.startswith("task ")] == [
      f"JAX_PROCESS_ID={i}" for i in range(4)]


def test_every_task_starts_the_entry_point_with_its_own_rank(fake_cluster):
  out = subprocess.run(["bash", SLURM, "configs/tiny.py", "--config.seed=3"], env=fake_cluster | {"PORT": "4321"},
                       capture_output=True, text=True, check=True).stdout
  lines = sorted(out.splitlines())
  assert lines == [f"rank={i} of=4 coord=gpu-a7:4321 args=-m camels_jax.train --config configs/tiny.py "
                   "--distributed --config.seed=3" for i in range(4)]


def test_outside_an_allocation_it_says_so(fake_cluster):
  env = {k: v for k, v in fake_cluster.items() if k != "SLURM_JOB_NODELIST"}
  run = subprocess.run(["bash", SLURM, "configs/tiny.py"], env=env, capture_output=True, text=True)
  assert run.returncode != 0 and "not inside a SLURM allocation" in run.stderr
  run = subprocess.run(["bash", SLURM], env=fake_cluster, capture_output=True, text=True)
  assert run.returncode == 2 and "usage" in run.stderr


@pytest.fixture
def fake_pod(tmp_path):
  """A `gcloud` stand-in whose `ssh --worker=all --command C` runs C once per worker (2 of them, WORKER set), in a
  home whose ~/camels_jax holds a stand-in venv: its python prints what it was started with."""
  venv = tmp_path / "home" / "camels_jax" / ".venv" / "bin"
  venv.mkdir(parents=True)
  _exe(venv / "python", '#!/usr/bin/env bash\necho "worker=$WORKER n=$# args=$*"\n')
  _exe(venv / "pip", "#!/usr/bin/env bash\n")
  _exe(tmp_path / "gcloud", '#!/usr/bin/env bash\necho "gcloud $4" >&2\n'
       'if [ "$4" = ssh ]; then for w in 0 1; do WORKER=$w bash -c "${@: -1}"; done; fi\n')
  return dict(os.environ, HOME=str(tmp_path / "home"), GCLOUD=str(tmp_path / "gcloud"))


def test_tpu_pod_dry_run_copies_the_repo_then_runs_on_every_worker(fake_pod):
  out = subprocess.run(["bash", TPU_POD, *POD_ARGS], env=fake_pod | {"DRY_RUN": "1"}, capture_output=True,
                       text=True, check=True).stdout
  copy, start = out.splitlines()
  assert " tpu-vm scp --recurse --zone us-central2-b --worker=all " + REPO in copy
  assert " tpu-vm ssh my-pod --zone us-central2-b --worker=all --command " in start
  assert "-m camels_jax.train --distributed --config configs/tiny.py --workdir=gs://b/run1" in start


def test_tpu_pod_every_worker_starts_the_entry_point_with_the_flags_intact(fake_pod):
  run = subprocess.run(["bash", TPU_POD, *POD_ARGS], env=fake_pod | {"ENTRY": "camels_jax.evaluate"},
                       capture_output=True, text=True, check=True)
  assert run.stderr.split() == ["gcloud", "scp", "gcloud", "ssh"]
  # The path with a space arrives as one flag: 7 arguments.
  assert run.stdout.splitlines() == [
      f"worker={w} n=7 args=-m camels_jax.evaluate --distributed --config configs/tiny.py --workdir=gs://b/run1 "
      "--config.data.path=my file.json" for w in (0, 1)]
  usage = subprocess.run(["bash", TPU_POD, "my-pod", "us-central2-b"], env=fake_pod, capture_output=True, text=True)
  assert usage.returncode == 2 and "usage" in usage.stderr
