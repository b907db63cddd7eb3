"""metrics.MetricWriter: TensorBoard scalars, and no writer thread left behind when a job fails."""

import glob
import threading

import pytest

from camels_jax import metrics


def tensorboard_threads() -> list[threading.Thread]:
  """The live threads tensorboardX started (one per open writer, plus its queue's feeder)."""
  return [t for t in threading.enumerate() if type(t).__module__.startswith("tensorboardX")]


def test_a_failing_job_leaves_no_writer_thread_and_keeps_what_it_wrote(tmp_path):
  before = tensorboard_threads()
  with pytest.raises(KeyboardInterrupt):
    with metrics.MetricWriter(str(tmp_path)) as writer:
      writer.write_scalars(3, {"loss": 1.5, "undefined": None})
      assert len(tensorboard_threads()) > len(before)
      raise KeyboardInterrupt
  assert tensorboard_threads() == before
  [events] = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  with open(events, "rb") as f:
    data = f.read()
  assert b"loss" in data and b"undefined" not in data
  writer.close()  # a second close is a no-op


def test_a_disabled_writer_starts_no_thread_and_writes_nothing(tmp_path):
  before = tensorboard_threads()
  with metrics.MetricWriter(str(tmp_path / "tb"), enabled=False) as writer:
    writer.write_scalars(0, {"loss": 1.0})
    writer.write_texts(0, {"note": "x"})
    assert tensorboard_threads() == before
  assert not (tmp_path / "tb").exists()
