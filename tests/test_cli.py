"""The command line every entry point shares (camels_jax/cli.py): one-line errors with exit status 2, the
config checked before any work, the run manifest, quiet terminals. Entry points run as subprocesses."""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from camels_jax import checks, cli, interrupts
from tests.tiny_config import REPO

ENTRY_CONFIGS = {"train": "configs/tiny.py", "evaluate": "configs/tiny.py", "perplexity": "configs/ppl_smollm2.py"}
# A library log line as absl formats it ("I1130 10:41:16.371314 140693 file.py:849] ..."), or what TFDS and
# XLA print by themselves.
LIBRARY_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|Downloading and preparing|Unable to initialize backend|"
                         r"array_record|Done writing|dataset_builder")


def entry(name: str, workdir, *args, timeout: int = 300) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", f"camels_jax.{name}", f"--config={ENTRY_CONFIGS[name]}", f"--workdir={workdir}",
         *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _files(tmp_path) -> dict[str, str]:
  """Bad inputs: a missing file, an empty one, 3 KB of binary, malformed JSON."""
  (tmp_path / "empty.json").write_text("")
  (tmp_path / "binary.json").write_bytes(bytes(range(128, 256)) * 24)
  (tmp_path / "bad.json").write_text('{"data": [\n  {"title": "A", "paragraphs": [\n')
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 24)
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text('{"model_type": "llama",\n "hidden_size": \n')
  return {"dir": str(tmp_path)}


SQUAD = ("--config.data.dataset=squad", "--config.eval.methods=uniform")
# The bad data files, as train and evaluate meet them (both read the SQuAD file of the data section).
DATA_CASES = [(case, (*SQUAD, f"--config.data.path={{dir}}/{name}"), name)
              for case, name in (("missing file", "missing.json"), ("empty file", "empty.json"),
                                 ("non-UTF-8 bytes", "binary.json"), ("malformed JSON", "bad.json"))]
CASES = {
    # entry: [(case, args (with {dir}), what the one line must name)]
    "train": [
        *DATA_CASES,
        ("unknown key", ("--config.camels.stepz=3",), "camels.stepz"),
        ("unknown job", ("--config.jobs=foo",), "jobs"),
        ("negative count", ("--config.camels.steps=-3",), "camels.steps"),
        ("MAC with T = 0", ("--config.jobs=qa_tune,mac", "--config.mac.tokens=0"), "mac.tokens"),
        ("MAC heads that do not divide the width", ("--config.jobs=mac", "--config.mac.heads=3"), "mac.heads=3"),
        # Paths of the wrong kind: a file where a directory is expected, and the reverse.
        ("workdir is a file", ("--workdir={dir}/empty.txt",), "empty.txt: is a file, where the workdir"),
        ("data_dir is a file", ("--config.data.data_dir={dir}/empty.txt",), "empty.txt: is a file, where a directory"),
        ("config is a directory", ("--config={dir}",), "is a directory, where a config file is expected"),
        ("missing config file", ("--config={dir}/missing.py",), "missing.py: no such config file"),
    ],
    "evaluate": [
        *DATA_CASES,
        ("unknown key", ("--config.eval.lrz=3",), "eval.lrz"),
        ("unknown method", ("--config.eval.methods=uniform,foo",), "eval.methods"),
        ("negative count", ("--config.eval.curve_points=-1",), "eval.curve_points"),
        ("MAC not trained", ("--config.eval.methods=uniform,mac",), "no trained MAC"),
        ("data file is a directory", (*SQUAD, "--config.data.path={dir}/ckpt"), "ckpt: is a directory, where a file"),
        ("workdir under a file", ("--workdir={dir}/empty.txt/wd",), "empty.txt: is a file, where the workdir"),
    ],
    "perplexity": [
        ("missing file", ("--config.text_file={dir}/missing.txt",), "missing.txt"),
        ("empty file", ("--config.text_file={dir}/empty.txt",), "empty.txt"),
        ("non-UTF-8 bytes", ("--config.text_file={dir}/binary.txt",), "binary.txt"),
        ("malformed JSON", ("--config.model.source={dir}/ckpt",), "config.json"),
        ("unknown key", ("--config.stepz=1",), "stepz"),
        ("unknown choice", ("--config.model.dtype=float99",), "model.dtype"),
        ("negative count", ("--config.batch_size=-1",), "batch_size"),
        ("text file is a directory", ("--config.text_file={dir}/ckpt",), "ckpt: is a directory, where a file"),
    ],
}


@pytest.mark.parametrize("name,case,args,names",
                         [(name, *c) for name, cases in CASES.items() for c in cases],
                         ids=[f"{name}-{c[0]}" for name, cases in CASES.items() for c in cases])
def test_expected_failures_print_one_line_and_exit_2(tmp_path, name, case, args, names):
  files = _files(tmp_path)
  result = entry(name, tmp_path / "wd", *(a.format(**files) for a in args))
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, (case, result.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr[-3000:])
  assert names in lines[0], (case, lines[0])
  assert "Traceback" not in result.stderr + result.stdout
  assert not os.path.exists(tmp_path / "wd" / "qa_tune"), "failed after starting to QA-tune"


# A child's SIGINT at its default, as a terminal gives it: a shell script's background job (a CI runner's, say)
# starts with SIGINT ignored, which the child would inherit, and Python then leaves it ignored. Reset in a
# launcher that execs the real command (a default handler survives exec), not in `preexec_fn`: that runs Python
# in a fork of this multithreaded process, which can deadlock.
_SIGINT_AT_DEFAULT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"]


_BAR = re.compile(r"[\w ]*: *\d+%\|[^|\r\n]*\| *\d+/\d+ \[[^\]\r\n]*\]")  # a tqdm bar as drawn


@pytest.mark.parametrize("after_s", [0.0, 3.0])
def test_interrupt_says_how_to_resume_and_exits_130(tmp_path, after_s):
  """Ctrl-C while the job trains (once it says it QA-tunes, with more steps than it can finish before the
  signal lands): one line, exit 130, the run marked interrupted. 3 s in, JAX compiles the train step on an
  XLA thread: an exit through the interpreter's teardown segfaulted there (4 of 7 tries)."""
  workdir = tmp_path / "wd"
  cmd = _SIGINT_AT_DEFAULT + ["-m", "camels_jax.train", f"--config={ENTRY_CONFIGS['train']}",
                              f"--workdir={workdir}", "--config.jobs=qa_tune", "--config.qa_tune.max_steps=100000",
                              "--config.qa_tune.patience=100000"]
  # PYTHONFAULTHANDLER: should the job ever hang after the signal, SIGABRT prints where each thread waits.
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONFAULTHANDLER="1"))
  said = [proc.stdout.readline() for _ in range(3)]  # model:, data:, qa_tune: QA-tuning ...
  time.sleep(after_s)
  proc.send_signal(signal.SIGINT)
  try:
    out, err = proc.communicate(timeout=180)  # under a second alone
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGABRT)
    out, err = proc.communicate()
    pytest.fail(f"still running 180 s after SIGINT; its threads:\n{err[-6000:]}")
  assert said[0].startswith("model:") and said[2].startswith("qa_tune: QA-tuning"), (said, err[-3000:])
  assert proc.returncode == cli.EXIT_INTERRUPTED, err[-3000:]
  # Only the progress bars (drawn on stderr, the message follows the last one on its line) and the message.
  lines = [line for line in re.split(r"[\r\n]", _BAR.sub("", err)) if line.strip()]
  assert lines == [f"interrupted: rerunning the same command resumes from what {workdir} holds (its checkpoints "
                   f"are kept)"], err[-3000:]
  assert "Traceback" not in out + err
  (run,) = json.loads((workdir / cli.MANIFEST_FILE).read_text())["runs"]
  assert run["status"] == "interrupted" and run["end"] is not None


_ABSORBING = """
import asyncio, os, signal, sys
sys.path.insert(0, {repo!r})
from camels_jax import interrupts
if {ours}:
  interrupts.install()

async def absorbing():  # as a library task that treats its cancellation as an ordinary end
  os.kill(os.getpid(), signal.SIGINT)
  try:
    await asyncio.sleep(60)
  except asyncio.CancelledError:
    return "absorbed"

try:
  print(asyncio.run(absorbing()))
except KeyboardInterrupt:
  print("interrupted", interrupts._requested)
"""


def test_ctrl_c_inside_asyncio_run_interrupts_with_the_jobs_handler():
  # Python's own handler: asyncio.run cancels its task instead, and a task that absorbs that absorbs the Ctrl-C.
  def run(ours):
    return subprocess.run(_SIGINT_AT_DEFAULT + ["-c", _ABSORBING.format(repo=REPO, ours=ours)],
                          capture_output=True, text=True, timeout=120, check=True).stdout.strip()
  assert run(False) == "absorbed"
  assert run(True) == "interrupted True"


def test_a_sigint_ignored_at_start_stays_ignored():
  before = signal.getsignal(signal.SIGINT)
  try:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    interrupts.install()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupts.install()
    assert signal.getsignal(signal.SIGINT) is interrupts._on_sigint
  finally:
    signal.signal(signal.SIGINT, before)


def test_path_kind_messages():
  e = NotADirectoryError(20, "Not a directory", __file__ + "/sub/file.json")
  assert cli.path_kind_message(e) == (f"{__file__}: is a file, where a directory is expected (in {e.filename}); "
                                      f"give a directory, or move the file away")
  e = IsADirectoryError(21, "Is a directory", os.path.dirname(__file__))
  assert cli.path_kind_message(e).startswith(f"{e.filename}: is a directory, where a file is expected")
  assert cli.path_kind_message(FileNotFoundError(2, "No such file", "/nonexistent/x")) is None
  assert cli.path_kind_message(PermissionError(13, "Permission denied")) is None


def test_guard_turns_expected_failures_into_one_line(capsys):
  def raising(error):
    def main(argv):
      raise error
    return cli.guard(main)

  for error, status, line in [
      (checks.UserError("bad\nthing"), 2, "error: bad thing"),
      (IsADirectoryError(21, "Is a directory", os.path.dirname(__file__)), 2,
       f"error: {os.path.dirname(__file__)}: is a directory, where a file is expected; give the path of a file"),
      (cli.Interrupted("/w"), 130, "interrupted: rerunning the same command resumes from what /w holds (its "
                                   "checkpoints are kept)"),
      (KeyboardInterrupt(), 130, "interrupted: rerunning the same command resumes"),
  ]:
    with pytest.raises(SystemExit) as e:
      raising(error)(["prog"])
    assert e.value.code == status
    assert capsys.readouterr().err == line + "\n"
  with pytest.raises(FileNotFoundError):  # not a path of the wrong kind: a bug keeps its traceback
    raising(FileNotFoundError(2, "No such file", "/nonexistent/x"))(["prog"])


def test_verbosity_1_shows_the_traceback(tmp_path):
  result = entry("perplexity", tmp_path, f"--config.text_file={tmp_path}/missing.txt", "--verbosity=1")
  assert result.returncode != 0 and "Traceback" in result.stderr and "missing.txt" in result.stderr


def test_several_config_violations_are_listed_at_once(tmp_path):
  result = entry("train", tmp_path, "--config.camels.steps=-3", "--config.qa_tune.lr=0", "--config.jobs=foo")
  assert result.returncode == 2
  line = result.stderr.strip()
  assert all(key in line for key in ("camels.steps", "qa_tune.lr", "jobs")), line
  assert "3 invalid" in line


def test_evaluate_without_a_weighting_model_fails_before_qa_tuning(tmp_path):
  workdir = tmp_path / "wd"
  result = entry("evaluate", workdir, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "no trained weighting model" in result.stderr and "camels" in result.stderr
  assert not os.path.exists(workdir / "qa_tune")


@pytest.mark.slow
def test_manifest_quiet_terminal_and_resume_rules(tmp_path):
  workdir = tmp_path / "wd"
  first = entry("train", workdir, "--config.jobs=qa_tune")
  assert first.returncode == 0, first.stderr[-3000:]
  terminal = (first.stdout + first.stderr).replace("\r", "\n").splitlines()
  assert not [line for line in terminal if LIBRARY_LOG.search(line)], "library logs on the terminal"
  assert any(line.startswith("qa_tune:") for line in first.stdout.splitlines()), first.stdout
  log = (workdir / cli.LOG_FILE).read_text()
  assert LIBRARY_LOG.search(log), "the library logs went nowhere"

  config = json.loads((workdir / cli.CONFIG_FILE).read_text())
  assert config["model"]["random"]["d_model"] == 32 and config["jobs"] == "qa_tune"
  manifest = json.loads((workdir / cli.MANIFEST_FILE).read_text())
  (run,) = manifest["runs"]
  assert run["entry"] == "train" and run["status"] == "ok" and run["end"] >= run["start"]
  assert "--config.jobs=qa_tune" in run["command"]
  assert run["libraries"]["jax"] and run["libraries"]["flax"] and run["process_count"] == 1 and run["devices"]
  assert run["package"]["camels_jax"]
  results = json.loads((workdir / "train_results.json").read_text())
  assert results["manifest"] == cli.manifest_path(str(workdir))

  changed = entry("train", workdir, "--config.jobs=qa_tune", "--config.model.random.d_model=64")
  assert changed.returncode == 2, changed.stderr[-2000:]
  assert "model.random.d_model: 32 -> 64" in changed.stderr and "another workdir" in changed.stderr

  more = entry("train", workdir, "--config.jobs=qa_tune", "--config.camels.steps=12")
  assert more.returncode == 0, more.stderr[-2000:]
  runs = json.loads((workdir / cli.MANIFEST_FILE).read_text())["runs"]
  assert [r["status"] for r in runs] == ["ok", "ok"]  # the refused run wrote nothing
  assert runs[1]["config_changes"] == {"camels.steps": [8, 12]}
  assert json.loads((workdir / cli.CONFIG_FILE).read_text())["camels"]["steps"] == 12

  # A damaged copy of the finished QA-tuning (its array data cut short, as a partial copy leaves it) is set
  # aside, never deleted, and rebuilt from the QA-tuning's own checkpoints without training again.
  tuned = workdir / "qa_tuned"
  (step,) = [p for p in tuned.iterdir() if p.name.isdigit()]
  _truncate_largest(step)
  before = sorted(str(p.relative_to(tuned)) for p in tuned.rglob("*"))
  rebuilt = entry("train", workdir, "--config.jobs=qa_tune", "--config.camels.steps=12")
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  assert "set it aside" in rebuilt.stdout and "Traceback" not in rebuilt.stderr
  aside = workdir / "qa_tuned.damaged"
  assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*")) == before
  assert json.loads((workdir / "train_results.json").read_text())["qa_tune"] == results["qa_tune"]

  # With every checkpoint of the run damaged as well: one line naming the step and what to do, files kept.
  for directory in (tuned, workdir / "qa_tune"):
    for step in [p for p in directory.iterdir() if p.name.isdigit()]:
      _truncate_largest(step)
  files = lambda: sorted((p.name, p.stat().st_size) for p in workdir.rglob("*") if p.is_file() and "qa_tune" in str(p))
  before = files()
  damaged = entry("train", workdir, "--config.jobs=qa_tune", "--config.camels.steps=12")
  lines = [line for line in damaged.stderr.splitlines() if line.strip()]
  assert damaged.returncode == 2, damaged.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "qa_tune" in lines[0], lines
  assert ("is damaged (" in lines[0] or "reads back" in lines[0]) and lines[0].endswith("to start again"), lines
  assert "Traceback" not in damaged.stderr + damaged.stdout
  assert not collections.Counter(before) - collections.Counter(files())  # every file is still there
  assert json.loads((workdir / cli.MANIFEST_FILE).read_text())["runs"][-1]["status"].startswith("error: ")


def _truncate_largest(step_dir):
  data_files = [os.path.join(root, f) for root, _, names in os.walk(step_dir / "state") for f in names
                if f != "commit_success.txt"]
  with open(max(data_files, key=os.path.getsize), "r+b") as f:
    f.truncate(100)


def test_flag_errors_name_the_override():
  e = AttributeError("'stepz'\nDid you mean \"steps\" instead of \"stepz\"?")
  message = cli._flag_error_message(e, ["prog", "--config=x.py", "--config.camels.stepz=3"])
  assert message == "--config.camels.stepz: the config has no field 'stepz' (did you mean \"steps\"?)"


def test_config_differences_and_safe_fields():
  old = {"model": {"source": "smollm2"}, "camels": {"steps": 8}, "eval": {"lrs": [1e-4]}}
  new = {"model": {"source": "random"}, "camels": {"steps": 16}, "eval": {"lrs": [3e-5]}}
  diffs = cli.config_differences(old, new)
  assert diffs == {"model.source": ("smollm2", "random"), "camels.steps": (8, 16), "eval.lrs": ([1e-4], [3e-5])}
  assert cli._is_safe("eval.lrs", ("eval.*",)) and cli._is_safe("camels.steps", ("camels.steps",))
  assert not cli._is_safe("model.source", ("eval.*", "camels.steps"))


def test_a_field_added_since_a_run_resumes_at_the_value_that_keeps_the_old_behaviour(tmp_path):
  with open(tmp_path / cli.CONFIG_FILE, "w") as f:
    json.dump({"camels": {"steps": 8}}, f)  # trained before camels.precond_docs existed
  introduced = {"camels.precond_docs": 0}
  assert cli.check_resume(str(tmp_path), {"camels": {"steps": 8, "precond_docs": 0}}, (), introduced) == {}
  with pytest.raises(checks.ConfigError, match=r"camels.precond_docs: None -> 16"):
    cli.check_resume(str(tmp_path), {"camels": {"steps": 8, "precond_docs": 16}}, (), introduced)
  with pytest.raises(checks.ConfigError, match=r"camels.precond_docs: None -> 0"):  # not declared introduced
    cli.check_resume(str(tmp_path), {"camels": {"steps": 8, "precond_docs": 0}}, ())


def test_user_errors_are_the_expected_ones():
  from camels_jax.data.sources import DataError
  from camels_jax.models.convert import CheckpointError
  from camels_jax.models.gguf_file import GGUFError
  from camels_jax.models.tokenizer import TokenizerError

  for error in (DataError, CheckpointError, GGUFError, TokenizerError, checks.ConfigError):
    assert issubclass(error, checks.UserError) and issubclass(error, ValueError)
