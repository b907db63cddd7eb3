"""Metric writers: TensorBoard event files plus a line in the log.

clu's `metric_writers` package imports TensorFlow at import time, and this library must not need
TensorFlow, so this is a writer with clu's interface (write_scalars / write_texts / flush / close)
backed by tensorboardX.
"""

import os
from collections.abc import Mapping

from absl import logging


class MetricWriter:
  """Writes scalars and texts to TensorBoard under `logdir` (only on process 0).

  Use it as a context manager: tensorboardX keeps a writer thread and a multiprocessing queue per
  writer, and a job that ends in an error or Ctrl-C must not leave them running in the process
  (a test session runs hundreds of jobs in two processes).
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(logdir, exist_ok=True)
      self._tb = SummaryWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
    # None marks a value that is undefined (e.g. a ratio over a zero); it is skipped, not plotted as 0.
    scalars = {k: v for k, v in scalars.items() if v is not None}
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))
    if self._tb:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), step)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if self._tb:
      for k, v in texts.items():
        self._tb.add_text(k, v, step)

  def flush(self) -> None:
    if self._tb:
      self._tb.flush()

  def close(self) -> None:
    if self._tb:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
