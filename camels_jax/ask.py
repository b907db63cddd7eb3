"""Ask an updated model (`camels_jax.update`) questions: its answer and the answer's log-likelihood, in the
evaluation's prompt format and decoding; `--compare` prints the not-updated model's answer beside it.

  python -m camels_jax.ask --workdir=runs/notes --question="Who founded the Brennik Guild?" [--compare]
  python -m camels_jax.ask --workdir=runs/notes --questions=questions.txt   # one question per line
"""

from absl import flags

from camels_jax import checks, cli, io_utils, updater
from camels_jax.data.sources import read_text

FLAGS = flags.FLAGS


def read_questions(question: str, path: str) -> list[str]:
  """`question`, or the non-empty lines of the file `path`; one `checks.UserError` when there are none."""
  if question.strip():
    return [question.strip()]
  if not path:
    raise checks.UserError("give --question=... or --questions=<file, one question per line>")
  questions = [line.strip() for line in read_text(path).splitlines() if line.strip()]
  return questions


def update_record(workdir: str) -> dict:
  """<workdir>/update.json of a finished update; one `checks.UserError` when there is none."""
  return io_utils.read_workdir_json(workdir, updater.RESULT_FILE, "a finished `python -m camels_jax.update`")


def run(workdir: str, questions: list[str], compare: bool = False, decoding: str = "") -> list[dict]:
  """Each question's answer from the updated model (and from the not-updated one with `compare`)."""
  record = update_record(workdir)
  u = updater.Updater.load(record["from_workdir"], record["method"], record["lr"], record["base"], progress=False)
  rows = [{"question": q, "updated": a._asdict()} for q, a in
          zip(questions, u.ask(u.load_state(workdir), questions, decoding or None))]
  if compare:
    for row, a in zip(rows, u.ask(None, questions, decoding or None)):
      row["not_updated"] = a._asdict()
  return rows


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise checks.UserError("--workdir is required (the workdir of a finished `python -m camels_jax.update`)")
  questions = read_questions(FLAGS.question, FLAGS.questions)
  update_record(FLAGS.workdir)  # before any model loads
  cli.route_logs(FLAGS.workdir)  # library logs to the update's log.txt: the terminal shows the answers
  for row in run(FLAGS.workdir, questions, FLAGS.compare, FLAGS.decoding):
    print(f"Q: {row['question']}")
    for name in ("updated", "not_updated"):
      if name in row:
        a = row[name]
        print(f"  {name.replace('_', ' ')}: {a['text'] or '(empty)'}   (log p {a['logprob']:.3f} over "
              f"{a['tokens']} tokens)")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The workdir of a finished update.")
  flags.DEFINE_string("question", "", "One question.")
  flags.DEFINE_string("questions", "", "A file of questions, one per line.")
  flags.DEFINE_bool("compare", False, "Also answer with the not-updated model.")
  flags.DEFINE_enum("decoding", "", ["", "greedy", "beam"], "Decoding (default: the evaluation's).")
  cli.run(main)
