"""launch/slurm.sh: its dry run, and a run through stand-ins for scontrol and srun (no cluster needed)."""

import os
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(REPO, "launch", "slurm.sh")


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
