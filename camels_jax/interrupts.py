"""Ctrl-C for the jobs: a SIGINT handler that asyncio cannot swap out, and a check between steps.

`install()` is called once by the command line (`cli.run`); library loops call `raise_if_requested()` between
steps and documents. In-process callers (tests, notebooks) never install it, and the check never fires.
"""

import signal
from typing import NoReturn

_requested = False  # set by `_on_sigint`: a Ctrl-C reached this process


def _on_sigint(signum, frame) -> NoReturn:
  """KeyboardInterrupt, as Python's own handler raises, and remembered for `raise_if_requested`.

  Python's own handler is the object `signal.default_int_handler`, and while it is installed asyncio.run
  (which JAX's array serialisation runs) swaps in one that cancels its task instead of raising: a task that
  absorbs the cancellation absorbs the Ctrl-C. asyncio leaves any other handler alone.
  """
  del signum, frame
  global _requested
  _requested = True
  raise KeyboardInterrupt


def install() -> None:
  """Takes over SIGINT where Python's own handler has it; a SIGINT ignored at start (a job started in the
  background by a script, or under nohup) stays ignored, as Python itself leaves it."""
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _on_sigint)


def raise_if_requested() -> None:
  """Raises KeyboardInterrupt if a Ctrl-C reached the process, so that library code that caught the first
  one cannot make the job run on."""
  if _requested:
    raise KeyboardInterrupt
