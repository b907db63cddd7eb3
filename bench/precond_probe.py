"""Which `camels.inner_lr` (in Adam's units) a preconditioned inner step teaches at, before meta-training.

  python -m bench.precond_probe --workdir runs/default [--lr 4e-5 --octaves 4 --docs 6 --precond_docs 16]

Reads the finished QA-tuning of a default workdir, builds the inner step's preconditioner from the gradients of
`--precond_docs` meta-train documents (`camels.precond_of`), and prints the uptake of one preconditioned step per
meta-val document, from the QA-tuned model, at `--lr` times 2^-octaves .. 2^octaves (`camels.compare_on`, one
document per step, every weighting at the untrained weighting model's mean weight): the untrained weighting
model ("learned", uniform at init), uniform and the answer oracle.

Measured on 2026-12-05 (2 CPU cores, 8 min; the default's QA-tuned model, 6 documents; the same calls run from a
script before they became this module), mean uptake per document:

    lr        learned   uniform    oracle
    2.5e-06   +0.0732   +0.0732   -0.7632
    5e-06     +0.1162   +0.1162   -4.1428
    1e-05     -0.5063   -0.5063  -12.1048
    2e-05     -3.7320   -3.7320  -28.3462

(larger lrs lose more). Uniform weights teach in one Adam-shaped step; weight piled on the answer tokens does
not: divided by each parameter's gradient scale, a few heavily weighted tokens make a large step. The measured
lever (`--config.camels.inner_lr=2.5e-6`) is in README ("a fixed diagonal preconditioner").
"""

import argparse

from camels_jax import config_files, data as data_lib, qa_tune, sharding
from camels_jax.methods import camels
from camels_jax.models import loading


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a workdir with a finished QA-tuning (qa_tuned/)")
  p.add_argument("--config", default="configs/default.py")
  p.add_argument("--lr", type=float, default=4e-5, help="the centre of the lr grid")
  p.add_argument("--octaves", type=int, default=4, help="the grid is lr * 2^-octaves .. lr * 2^octaves")
  p.add_argument("--docs", type=int, default=6, help="meta-val documents, one step each")
  p.add_argument("--precond_docs", type=int, default=16, help="meta-train documents of the preconditioner")
  args = p.parse_args()
  c = config_files.load(args.config)
  c.camels.precond_docs, c.camels.inner_lr = args.precond_docs, args.lr
  model = loading.load(c.model)
  data = data_lib.load(c.data, model.tokenizer, args.workdir)
  params, _ = qa_tune.tuned_params(c, model, data, args.workdir, writer=None, progress=False)
  precond = camels.precond_of(c, model, params, data)
  t = camels.init(c, model, sharding.mesh_of(params))
  by_scale = camels.compare_on(c, model, params, data, t.wm_graphdef, t.state["meta"],
                               data.splits["meta_val"][:args.docs], ["uniform", "oracle"], batch_docs=1,
                               scales=camels.step_scales(args.octaves), progress=True, precond=precond)
  print(f"{'lr':<9} " + " ".join(f"{n:>9}" for n in next(iter(by_scale.values()))))
  for scale, rows in by_scale.items():
    print(f"{float(scale) * args.lr:<9.3g} " + " ".join(f"{r['uptake']:+9.4f}" for r in rows.values()))


if __name__ == "__main__":
  main()
