"""A model as a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer files) that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no code from this library: the QA-tuned model
of a train run's workdir, or any model source as loaded (a GGUF file leaves dequantised to float32).

  python -m camels_jax.export --from_workdir=runs/default --out=runs/default/hf_qa_tuned
  python -m camels_jax.export --base=smollm2 --out=smollm2_hf

An updated model is exported by `camels_jax.update` itself (<workdir>/hf).
"""

import json
import os

from absl import flags, logging

from camels_jax import checks, cli, io_utils, qa_tune, updater
from camels_jax.models import export, loading

FLAGS = flags.FLAGS


def run(out: str, from_workdir: str = "", base: str = updater.QA_TUNED, dtype: str = "float32") -> str:
  """Writes the model to `out` (the module doc); returns `out`."""
  if base == updater.QA_TUNED:
    if not from_workdir:
      raise checks.UserError("--base=qa_tuned exports the QA-tuned model of --from_workdir: give --from_workdir")
    config = io_utils.workdir_config(from_workdir, "a finished `python -m camels_jax.train` run")
    if not os.path.isdir(os.path.join(from_workdir, qa_tune.TUNED)):
      raise checks.UserError(f"{from_workdir}: no QA-tuned model ({qa_tune.TUNED}/) to export")
    model = loading.load(config.model)
    params, _ = qa_tune.load_tuned(model, from_workdir)
  else:
    model = loading.load(loading.model_config(base))
    params = model.params
  note = {"source": base if base != updater.QA_TUNED else os.path.abspath(from_workdir) + "/" + qa_tune.TUNED}
  return export.save_pretrained(out, model.cfg, params, model.tokenizer, dtype,
                                extra={"camels_jax_export.json": json.dumps(note, indent=2)})


def main(argv):
  del argv
  if not FLAGS.out:
    raise checks.UserError("--out is required (the checkpoint folder to write)")
  if FLAGS.verbosity < 1:  # a quiet terminal: library logs only with --verbosity=1
    logging.set_verbosity(logging.WARNING)
  folder = run(FLAGS.out, FLAGS.from_workdir, FLAGS.base, FLAGS.dtype)
  print(f"wrote {folder}: load it with transformers.AutoModelForCausalLM.from_pretrained({folder!r})")


if __name__ == "__main__":
  flags.DEFINE_string("from_workdir", "", "A train run's workdir (for --base=qa_tuned).")
  flags.DEFINE_string("base", updater.QA_TUNED, "qa_tuned (the from_workdir's QA-tuned model) or a model source.")
  flags.DEFINE_string("out", "", "The checkpoint folder to write.")
  flags.DEFINE_enum("dtype", "float32", export.DTYPES, "Stored dtype of the parameters.")
  cli.run(main)
