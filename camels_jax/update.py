"""Keep a model up to date with your own documents: adapt it on them in order with a method a train (and
evaluate) run prepared, as the evaluation's online protocol does, and export the result (`camels_jax.updater`
is the library behind it).

  python -m camels_jax.update --from_workdir=runs/default --method=camels --docs=notes.txt \
      --workdir=runs/notes [--lr=6.25e-6] [--base=qa_tuned]
  python -m camels_jax.ask --workdir=runs/notes --question="Who founded the Brennik Guild?" --compare

`--docs` is a text file (documents separated by blank lines, or by lines equal to `--separator`), a JSONL
file (one object per line, its `--text_field` the document), or a directory (each .txt file one document, in
name order). Methods: uniform, ssm, tfidf, camels (at `--lr`: by default the lr the method's evaluation chose,
read from <from_workdir>/eval/results.json) and mac (no lr). The base model is the QA-tuned model of
`--from_workdir` (`--base=qa_tuned`) or, for uniform, SSM and TF-IDF, any model source with its own tokenizer
(`--base=smollm2`, a Hugging Face folder, a .gguf file).

<workdir> gets: update.json (the documents, method, lr, base, time per document), config.json and
manifest.json, token_weights.html (the weights each document was read with; weighted methods), and the adapted
model as a Hugging Face checkpoint in hf/ (what `transformers.AutoModelForCausalLM.from_pretrained` loads) or
MAC's bank and networks in mac/ (orbax, with a README.txt of what loads them; the base model stays the
from_workdir's QA-tuned one, which update.json names). An interrupted update resumes from <workdir>/update_state, saved every
`--save_every` documents; bad input (an empty or non-UTF-8 file, a JSONL line without the text field, a method
whose trained artifact is missing) is one line on stderr and exit 2, before any model loads.
"""

import os

import ml_collections
from absl import flags

from camels_jax import checks, cli, updater

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("from_workdir", None, "Workdir of the train (and evaluate) run whose method is used.")
  flags.DEFINE_string("docs", None, "Documents: a text file, a .jsonl file, or a directory of .txt files.")
  flags.DEFINE_string("workdir", None, "Where the update writes (and resumes from).")
  flags.DEFINE_enum("method", "uniform", updater.METHODS, "How to update.")
  flags.DEFINE_float("lr", None, "Adaptation lr (default: the one the method's evaluation chose).")
  flags.DEFINE_string("base", updater.QA_TUNED, "qa_tuned (the from_workdir's QA-tuned model) or a model source.")
  flags.DEFINE_string("separator", "", "Text files: documents end at lines equal to this (default: blank lines).")
  flags.DEFINE_string("text_field", "text", "JSONL files: the field holding each document.")
  flags.DEFINE_integer("save_every", 10, "Documents between checkpoints of the update.")


def main(argv):
  del argv
  for name in ("from_workdir", "docs", "workdir"):
    if not FLAGS[name].value:
      raise checks.UserError(f"--{name} is required")
  if FLAGS.save_every < 1:
    raise checks.UserError(f"--save_every={FLAGS.save_every}: expected >= 1")
  updater.read_documents(FLAGS.docs, FLAGS.separator, FLAGS.text_field)  # bad input: one line, before anything loads
  updater.check(FLAGS.from_workdir, FLAGS.method, FLAGS.lr, FLAGS.base)
  config = ml_collections.ConfigDict({
      "from_workdir": os.path.abspath(FLAGS.from_workdir), "docs": os.path.abspath(FLAGS.docs),
      "method": FLAGS.method, "lr": -1.0 if FLAGS.lr is None else FLAGS.lr, "base": FLAGS.base,
      "separator": FLAGS.separator, "text_field": FLAGS.text_field, "save_every": FLAGS.save_every})
  with cli.session("update", config, FLAGS.workdir, {}, safe=("save_every",)):
    record = updater.run(FLAGS.from_workdir, FLAGS.docs, FLAGS.workdir, FLAGS.method, FLAGS.lr, FLAGS.base,
                         FLAGS.separator, FLAGS.text_field, FLAGS.save_every, say=cli.phase)
  print(f"updated on {len(record['documents'])} documents in {record['seconds']:.1f} s "
        f"({record['seconds_per_document']:.2f} s per document); the model: {os.path.join(FLAGS.workdir, record['output'])}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
