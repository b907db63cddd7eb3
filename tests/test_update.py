"""Updating a model on your own documents (`camels_jax.update`), asking it (`camels_jax.ask`), and exporting it
as a Hugging Face checkpoint that transformers loads with the same logits."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from camels_jax import ask, cli, export, io_utils, train, updater
from camels_jax.adapt import online
from camels_jax.data.sources import DataError
from camels_jax.models import transformer
from tests.tiny_config import REPO, Killed, tiny_default

LR = 1e-2  # one Adam step per document: large, for a tiny random model to take in the last document
QUESTION = "Who founded the Brennik Guild?"
ANSWER = "Ailo Brennik"
# The last document states the answer to QUESTION in the QA format itself, over and over: learnable by a tiny
# random model in one step, so the updated model's answer must move towards it.
DOCS = ["The winters in the region were long, and travel between towns was slow.",
        "Records from that period are incomplete, and some details remain uncertain.",
        " ".join([f"{QUESTION} {ANSWER}"] * 8)]


def _config(arch):
  c = tiny_default()
  c.jobs = "qa_tune"
  c.eval.decoding = "greedy"
  if arch == "gpt2":
    c.model.random.update(arch="gpt2", n_kv_heads=c.model.random.n_heads)
  return c


def _train(config, workdir):
  """The train job, with the config.json its command writes (which an update reads)."""
  train.run(config, workdir, progress=False)
  io_utils.write_json(os.path.join(workdir, cli.CONFIG_FILE), cli.config_dict(config))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tuned(request, tmp_path_factory):
  """A tiny QA-tuned model of each family (the train job's qa_tuned/)."""
  workdir = str(tmp_path_factory.mktemp(f"tuned_{request.param}"))
  _train(_config(request.param), workdir)
  return workdir


def _docs_file(tmp_path):
  path = tmp_path / "docs.txt"
  path.write_text("\n\n".join(DOCS) + "\n")
  return str(path)


def _logits_agree(folder, graphdef, params, tok):
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  tokens = np.asarray([tok.encode(f"{DOCS[0]} {QUESTION} {ANSWER}")])
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(transformer.apply(graphdef, params, tokens))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  return float(np.abs(got - want).max())


def test_update_then_ask_answers_from_the_documents_and_transformers_loads_both_models(tuned, tmp_path):
  out = str(tmp_path / "update")
  record = updater.run(tuned, _docs_file(tmp_path), out, method="uniform", lr=LR, progress=False)
  assert record["documents"] == ["docs.txt:1", "docs.txt:3", "docs.txt:5"] and record["lr"] == LR
  assert os.path.isfile(os.path.join(out, "hf", "model.safetensors"))
  assert os.path.isfile(os.path.join(out, updater.WEIGHTS_PAGE))
  # Asked about the last document, the updated model answers otherwise, and likes the stated answer better.
  rows = ask.run(out, [QUESTION], compare=True)
  assert rows[0]["updated"]["text"] != rows[0]["not_updated"]["text"]
  u = updater.Updater.load(tuned, "uniform", LR, progress=False)
  after = u.load_state(out)
  (gain, _), (base, _) = u.score(after, [QUESTION], [ANSWER])[0], u.score(None, [QUESTION], [ANSWER])[0]
  assert gain > base + 0.5
  # The exports load in transformers with this library's logits: the update's, and the QA-tuned model's.
  _logits_agree(os.path.join(out, "hf"), u.model.graphdef, after, u.model.tokenizer)
  before = export.run(str(tmp_path / "qa_tuned_hf"), tuned)
  _logits_agree(before, u.model.graphdef, u.params, u.model.tokenizer)


def test_an_interrupted_update_resumes_to_the_uninterrupted_result(tuned, tmp_path, monkeypatch):
  docs = _docs_file(tmp_path)
  whole = updater.run(tuned, docs, str(tmp_path / "whole"), method="uniform", lr=LR, progress=False)
  step, calls = online.adapt_step, []

  def dies_on_the_third(*args, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise Killed("killed while reading the third document")
    return step(*args, **kw)
  monkeypatch.setattr(online, "adapt_step", dies_on_the_third)
  out = str(tmp_path / "resumed")
  with pytest.raises(Killed):
    updater.run(tuned, docs, out, method="uniform", lr=LR, save_every=1, progress=False)
  assert not os.path.exists(os.path.join(out, "hf"))  # nothing exported from half an update
  monkeypatch.setattr(online, "adapt_step", step)
  resumed = updater.run(tuned, docs, out, method="uniform", lr=LR, save_every=1, progress=False)
  assert resumed["documents"] == whole["documents"]
  u = updater.Updater.load(tuned, "uniform", LR, progress=False)
  for a, b in zip(jax.tree.leaves(u.load_state(out)), jax.tree.leaves(u.load_state(str(tmp_path / "whole")))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same workdir with other documents is refused rather than mixed.
  other = tmp_path / "other.txt"
  other.write_text("Another document altogether.\n")
  with pytest.raises(updater.checks.UserError, match="other documents or settings"):
    updater.run(tuned, str(other), out, method="uniform", lr=LR, progress=False)


def test_each_input_form_yields_the_same_documents(tmp_path):
  texts = ["First document,\nover two lines.", "Second one.", "Third: ünïcode too."]
  (tmp_path / "blank.txt").write_text("\n\n\n".join(texts) + "\n")
  (tmp_path / "sep.txt").write_text("\n===\n".join(texts))
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(texts)))
  folder = tmp_path / "folder"
  folder.mkdir()
  for i, t in enumerate(texts):
    (folder / f"{i:02d}.txt").write_text(t + "\n")
  (folder / "notes.md").write_text("not a document")
  for path, kw in (("blank.txt", {}), ("sep.txt", {"separator": "==="}), ("docs.jsonl", {}), ("folder", {})):
    assert [t for _, t in updater.read_documents(str(tmp_path / path), **kw)] == texts, path


def test_a_document_longer_than_the_longest_bucket_is_read_whole_in_pieces():
  from camels_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from camels_jax.models import tokenizer  # pylint: disable=g-import-not-at-top
  tok = tokenizer.gpt2()
  spec = pipeline.Spec((32, 64), 48, 24, 64, 1, False)
  text = " ".join(f"Sentence {i} of a long document." for i in range(40))
  pieces = updater.tokenized([("long", text), ("short", "A short one.")], tok, spec)
  assert [p.doc.id for p in pieces][:2] == ["long#0", "long#1"] and pieces[-1].doc.id == "short"
  assert all(len(p.tokens) <= 64 for p in pieces)
  assert sum(len(p.tokens) for p in pieces[:-1]) == len(tok.encode(text))  # every token read, once
  assert "".join(p.doc.text for p in pieces[:-1]) == text


def _command(module, *args):
  return subprocess.run([sys.executable, "-m", f"camels_jax.{module}", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(tuned, tmp_path):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 24)
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  good = _docs_file(tmp_path)
  cases = {
      "empty.txt": ("--docs=" + str(tmp_path / "empty.txt"), "the file is empty"),
      "binary.txt": ("--docs=" + str(tmp_path / "binary.txt"), "not UTF-8 text"),
      "bad.jsonl": ("--docs=" + str(tmp_path / "bad.jsonl"), "bad.jsonl:2: no non-empty string field 'text'"),
      # The qa_tune-only workdir has no trained weighting model.
      "no camels": ("--docs=" + good, "no trained weighting model"),
  }
  for name, (docs, message) in cases.items():
    method = "camels" if name == "no camels" else "uniform"
    proc = _command("update", f"--from_workdir={tuned}", docs, f"--workdir={tmp_path / 'out'}", f"--method={method}",
                    "--lr=1e-3")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (name, proc.stderr[-2000:])
    assert not os.path.exists(tmp_path / "out" / "hf")
  assert not os.path.exists(tmp_path / "out")  # refused before the workdir was made
  (tmp_path / "no_texts").mkdir()
  with pytest.raises(DataError, match="holds no .txt file"):
    updater.read_documents(str(tmp_path / "no_texts"))
  proc = _command("ask", f"--workdir={tmp_path}", "--question=Who?")
  assert proc.returncode == 2 and "update.json: not found" in proc.stderr


@pytest.mark.slow  # the tiny train job with a weighting model and MAC (~3 min)
def test_camels_and_mac_update_and_answer(tmp_path):
  workdir = str(tmp_path / "trained")
  c = _config("llama")
  c.jobs = "qa_tune,camels,mac"
  _train(c, workdir)
  docs = _docs_file(tmp_path)
  r = updater.run(workdir, docs, str(tmp_path / "camels"), method="camels", lr=LR, progress=False)
  assert r["method"] == "camels" and os.path.isfile(os.path.join(tmp_path, "camels", "hf", "model.safetensors"))
  with open(os.path.join(tmp_path, "camels", updater.WEIGHTS_PAGE)) as f:
    assert f.read().count("docs.txt:") == 3  # a heatmap per document
  r = updater.run(workdir, docs, str(tmp_path / "mac"), method="mac", progress=False)
  assert r["lr"] is None and r["output"] == updater.BANK_DIR
  assert {"bank", "networks", "README.txt"} <= set(os.listdir(tmp_path / "mac" / updater.BANK_DIR))
  rows = ask.run(str(tmp_path / "mac"), [QUESTION], compare=True)
  u = updater.Updater.load(workdir, "mac", progress=False)
  bank = u.load_state(str(tmp_path / "mac"))
  assert bank.docs == 3
  assert rows[0]["updated"]["logprob"] == pytest.approx(u.score(bank, [QUESTION], [rows[0]["updated"]["text"]])[0][0])
  assert u.score(bank, [QUESTION], [ANSWER]) != u.score(None, [QUESTION], [ANSWER])  # the bank conditions it


@pytest.mark.slow  # SmolLM2 (540 MB of float32 written and read back, twice)
def test_smollm2_from_gguf_exports_with_transformers_logits_before_and_after_an_update(tmp_path):
  from camels_jax.models import loading  # pylint: disable=g-import-not-at-top
  folder = export.run(str(tmp_path / "smollm2"), base="smollm2")
  model = loading.load(loading.model_config("smollm2"))
  worst = _logits_agree(folder, model.graphdef, model.params, model.tokenizer)
  print(f"SmolLM2 exported: max |logit difference| {worst:.2e}")
  # Updated on the three documents (any from_workdir's settings; the base is SmolLM2 as loaded).
  job = tmp_path / "job"
  job.mkdir()
  io_utils.write_json(str(job / cli.CONFIG_FILE), cli.config_dict(_config("llama")))
  out = str(tmp_path / "update")
  updater.run(str(job), _docs_file(tmp_path), out, method="uniform", lr=1e-5, base="smollm2", progress=False)
  u = updater.Updater.load(str(job), "uniform", 1e-5, base="smollm2", progress=False)
  after = u.load_state(out)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(model.params)))
  worst = _logits_agree(os.path.join(out, "hf"), model.graphdef, after, model.tokenizer)
  print(f"SmolLM2 updated and exported: max |logit difference| {worst:.2e}")
  with pytest.raises(updater.checks.UserError, match="needs --base=qa_tuned"):
    updater.check(str(job), "camels", 1e-5, "smollm2")
