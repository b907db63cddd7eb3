"""The report: formatters on hand values, the table, results.md and cost lines of hand-made results, the
prediction files, atomic writing, the training summaries."""

import json
import os

import pytest

from camels_jax import report

NAN, INF = float("nan"), float("inf")


def test_num_formats_finite_numbers_and_dashes_the_rest():
  assert report.num(0.123456) == "0.1235"
  assert report.num(0.5, "+.3f") == "+0.500" and report.num(-0.5, "+.3f") == "-0.500"
  assert report.num(3, "9.2f") == "     3.00"
  assert report.num(1234.5, ".1f") == "1234.5" and report.num(0, "g") == "0"
  assert [report.num(x) for x in (None, NAN, INF, -INF)] == ["-"] * 4


def test_interval_formats_a_mean_and_its_bounds():
  ci = {"mean": 0.1234, "lo": 0.1011, "hi": 0.1499, "n": 10}
  assert report.interval(ci) == "0.123 [0.101, 0.150]"
  assert report.interval({"mean": 0.012, "lo": -0.03, "hi": 0.05}, signed=True) == "+0.012 [-0.030, +0.050]"
  assert report.interval({"mean": 0.0, "lo": 0.0, "hi": 0.0}, ".4f", signed=True) == "+0.0000 [+0.0000, +0.0000]"
  assert report.interval(None) == report.interval({}) == "-"
  assert report.interval({"mean": None, "lo": None, "hi": None, "n": 0}) == "-"


def _ci(mean, half=0.1, n=4):
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def _test(f1, nll):
  metrics = {"em": f1, "prefix_em": f1, "f1": f1, "official_em": f1, "official_f1": f1}
  return metrics | {"nll": nll, "n": 4, "ci": {m: _ci(v) for m, v in metrics.items()}}


def _method(f1, nll, lr=1e-4, **extra):
  return {"sweep": [{"lr": 1e-4, "em": 0.5, "prefix_em": 0.5, "f1": f1, "nll": nll},
                    {"lr": 1e-3, "em": 0.0, "prefix_em": 0.0, "f1": 0.0, "nll": NAN}] if lr else [],
          "lr": lr, "test": _test(f1, nll), "curve": [{"docs": 4, "f1": f1, "lo": None, "hi": None}],
          "retention": {"right_after": 0.75, "at_end": 0.25}, "weights": {"facts_filler": 2.5, "mean_weight": 1.0},
          "uptake": 2.0 - nll, "time_s": {"adapt": 4.0, "adapt_per_doc": 1.0, "total": 10.0},
          "memory_bytes": {"adapt": 3 * 2**20}} | extra


RESULTS = {
    "no_adaptation": _test(0.25, 2.0), "test_docs": 4, "val_docs": 2, "test_questions": 4, "select": "nll",
    "select_rule": "lowest validation answer NLL (ties: higher F1)", "bootstrap": {"level": 0.9},
    "time_s": {"no_adaptation": 1.5},
    "methods": {
        "uniform": _method(0.5, 1.5),
        "camels": _method(0.75, 1.25, vs_uniform={"f1": _ci(0.25, 0.05)}),
        "mac": _method(0.5, 1.75, lr=None, time_s={"adapt_per_doc": 0.1}, weights={},
                       memory_bytes={"adapt": 2**20, "bank": 2**19},
                       vs_uniform={"f1": _ci(0.0)}, vs_camels={"f1": _ci(-0.25, 0.05)}),
    },
}


def test_table_rows_of_hand_made_results():
  lines = report.table(RESULTS).splitlines()
  assert lines[0].split()[:3] == ["method", "lr", "F1"] and set(lines[1]) <= {"-", " "}
  rows = {line.split("  ")[0]: line for line in lines[2:6]}
  assert rows.keys() == {"no adaptation", "uniform", "camels", "mac"}
  assert "0.750 [0.650, 0.850]  +0.250 [+0.200, +0.300]" in rows["camels"] and "+0.750  2.50" in rows["camels"]
  assert "0.0001" in rows["uniform"] and rows["mac"].split()[1] == "-"
  assert "by lowest validation answer NLL (ties: higher F1)." in report.table(RESULTS)


def test_markdown_of_hand_made_results():
  md = report.markdown(RESULTS)
  assert "Every [interval] is a 90% percentile bootstrap" in md and md.count("**best**") == 1
  assert "| camels | 0.0001 | 0.750 [0.650, 0.850] | 0.750 [0.650, 0.850] | 0.750 [0.650, 0.850] **best** |" in md
  assert "| +0.250 [+0.200, +0.300] | 1.2500 | +0.7500 | 2.500 | 1.000 |" in md
  assert "| uniform | 0.0001 (chosen) | 0.5000 | 0.5000 | 0.5000 | 1.5000 |" in md
  assert "| uniform | 0.001 | 0.0000 | 0.0000 | 0.0000 | - |" in md  # a NaN NLL is a dash
  assert "- camels: 0.7500 -> 0.2500" in md and "right_after" not in md and "nan" not in md.lower()
  assert "| no adaptation | | | | | | 1.5 | 1.5 |" in md
  assert "| uniform | - | 4.0 | 1.0 | - | - | - | 10.0 |" in md
  assert "upward" not in md and "stopping once the score worsens" in report.markdown(RESULTS | {"sweep": "ascending"})


def test_cost_lines_compare_a_method_with_its_versus_method():
  lines = report.cost_lines(RESULTS)
  assert "| uniform | 1.000 | 3.00 | - |" in lines and "| mac | 0.100 | 1.00 | 0.50 |" in lines
  assert ("mac / camels adaptation time per document: 0.100x; mac − camels F1 -0.250 [-0.300, -0.200] "
          "(paired, same questions).") in lines
  assert not any("/ uniform" in line for line in lines)  # the baseline has its own column
  assert report.cost_lines(RESULTS | {"methods": {}}) == []
  unadapted = RESULTS | {"methods": {"uniform": _method(0.25, 2.0, lr=0.0)}}  # "no adaptation" won its sweep
  assert "| uniform | - | 3.00 | - |" in report.cost_lines(unadapted)


def test_prediction_files():
  scores = {"per_question": {m: [1.0, 0.0] for m in report.CI_METRICS + ("nll",)},
            "predictions": [{"index": i, "id": f"d/{i}", "question": f"q{i}", "golds": ["g"], "answer": f"a{i}"}
                            for i in range(2)]}
  assert report.answers_by_id(scores) == {"d/0": "a0", "d/1": "a1"}
  detail = report.prediction_details(scores)
  assert detail[1] == {"id": "d/1", "question": "q1", "golds": ["g"], "answer": "a1", "em": 0.0, "prefix_em": 0.0,
                       "f1": 0.0, "official_em": 0.0, "official_f1": 0.0, "nll": 0.0}
  scores["per_question"]["f1"].pop()
  with pytest.raises(ValueError, match="differ in length"):
    report.prediction_details(scores)
  assert report.prediction_file_name("uniform+qa_lt") == "uniform+qa_lt"
  assert report.prediction_file_name("a/b c") == "a_b_c"


def test_write_replaces_the_folder_whole(tmp_path):
  scores = {"per_question": {m: [1.0] for m in report.CI_METRICS + ("nll",)},
            "predictions": [{"index": 0, "id": "d/0", "question": "q", "golds": ["g"], "answer": "a"}]}
  out = tmp_path / "eval"
  heat = {"camels": [("d", ["a", " b"], [0.5, 2.0])]}
  report.write(str(out), RESULTS, {"uniform+qa_lt": scores}, heat)
  first = sorted(os.listdir(out))
  assert first == ["f1_curve.png", "predictions", "results.json", "results.md", "weights_camels.html",
                   "weights_camels.png"]
  assert json.loads((out / "results.json").read_text())["methods"]["mac"]["lr"] is None
  assert sorted(os.listdir(out / "predictions")) == ["uniform+qa_lt.json", "uniform+qa_lt_detail.json"]
  assert "facts/filler 2.50 on the test stream" in (out / "weights_camels.html").read_text()
  report.write(str(out), RESULTS, {}, {})
  assert sorted(os.listdir(out)) == ["f1_curve.png", "results.json", "results.md"]  # nothing of the old one
  assert os.listdir(tmp_path) == ["eval"]  # no temporary or .old folder left


TRAIN_CAMELS = {
    "base_model": "qa_tuned", "best_step": 8, "compare_step": 8,
    "history": [{"val_loss": 3.0}], "best": {"val_loss": 2.5, "val_qa_before": 2.75, "val_qa": 2.25},
    "compare": {
        "learned": {"weight_mean": 1.0, "uptake": 0.5, "x_uniform": 2.5, "kl": 0.01, "facts_filler": 3.0,
                    "vs_uniform": {"mean": 0.3, "lo": 0.1, "hi": 0.5}},
        "uniform": {"weight_mean": 1.0, "uptake": 0.2, "x_uniform": 1.0, "kl": 0.02, "facts_filler": 1.0},
        "ssm": {"weight_mean": 1.0, "uptake": 0.1, "x_uniform": None, "kl": 0.03, "facts_filler": NAN,
                "vs_learned": {"mean": -0.4, "lo": -0.6, "hi": -0.2}},
    },
}


def test_camels_summary_of_hand_values():
  text = report.camels_summary(TRAIN_CAMELS)
  assert text.startswith("camels (qa_tuned base): meta-val loss 3.0000 at init -> 2.5000 (best, step 8); answer "
                         "NLL before adaptation 2.7500, after 2.2500")
  assert "  learned     1.0000   0.5000      2.50 1.00e-02         3.00  +0.3000 [+0.1000, +0.5000]" in text
  assert "  ssm         1.0000   0.1000         - 3.00e-02            -  -" in text
  assert text.endswith("learned/uniform uptake 2.50 (target >= 2x); facts/filler 3.00 (target >= 2); learned > "
                       "SSM: yes (per question +0.4000 [+0.2000, +0.6000])")
  no_uptake = TRAIN_CAMELS | {"compare": TRAIN_CAMELS["compare"] | {"uniform": {
      "weight_mean": 1.0, "uptake": -0.1, "x_uniform": None, "kl": 0.0, "facts_filler": 1.0}}}
  assert "uniform weights teach nothing at this step (uptake -0.1000), learned +0.5000" in report.camels_summary(
      no_uptake)
  assert "\n" not in report.camels_summary(TRAIN_CAMELS | {"compare": None})


def test_mac_summary_of_hand_values():
  r = {"best_step": 4, "history": [{"val_nll": 3.0}],
       "best": {"val_nll": 2.0, "val_nll_other_bank": 2.5, "val_nll_base": 2.75}}
  assert report.mac_summary(r) == ("mac: meta-val answer NLL 3.0000 at init -> 2.0000 (best, step 4); with another "
                                   "batch's bank 2.5000; base model alone 2.7500")
