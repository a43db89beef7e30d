"""medguide_jax.report on fake finished workdirs: statistics, pairing, Markdown, files, errors."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from scipy import stats

from medguide_jax import report

MODELS, METRICS = ("finetune", "scratch"), ("balanced_accuracy", "auc")
# VALUES[seed][model][metric]; in seed 2 scratch beats finetune on balanced accuracy.
VALUES = {
    0: {"finetune": {"balanced_accuracy": 0.81, "auc": 0.90},
        "scratch": {"balanced_accuracy": 0.70, "auc": 0.80}},
    1: {"finetune": {"balanced_accuracy": 0.78, "auc": 0.88},
        "scratch": {"balanced_accuracy": 0.72, "auc": 0.83}},
    2: {"finetune": {"balanced_accuracy": 0.74, "auc": 0.91},
        "scratch": {"balanced_accuracy": 0.76, "auc": 0.79}},
}


def _write_run(path, seed: int, values: dict, reverse_rows: bool = False) -> str:
  """A finished workdir as train.py leaves it: results.json (stages + table), config.json."""
  path.mkdir(parents=True)
  table, stages = [], {}
  for model, metrics in values.items():
    row = {"model": model}
    for k, v in metrics.items():
      row[k], row[f"{k}_ci95"] = v, [v - 0.05, v + 0.05]
    table.append(row)
    stages[model] = {"step": 100, "checkpoint": "best",
                     "metrics": {f"test/{k}": v for k, v in row.items() if k != "model"}}
  if reverse_rows:  # pairing must go by model name, not by row position
    table.reverse()
  (path / "results.json").write_text(json.dumps({"stages": stages, "table": table}))
  (path / "config.json").write_text(json.dumps({"seed": seed, "model": {"name": "x"}}))
  return str(path)


@pytest.fixture
def workdirs(tmp_path) -> list[str]:
  return [_write_run(tmp_path / f"run_{name}", seed, VALUES[seed], reverse_rows=seed == 1)
          for name, seed in (("a", 0), ("b", 1), ("c", 2))]


def _column(model: str, metric: str) -> np.ndarray:
  return np.array([VALUES[s][model][metric] for s in (0, 1, 2)])


def _t_interval(v: np.ndarray) -> tuple[float, float]:
  half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
  return v.mean() - half, v.mean() + half


def test_summarise_is_mean_sd_and_t_interval():
  v = np.array([0.51, 0.49, 0.55, 0.53])
  s = report.summarise(list(v) + [float("nan"), None])  # non-finite entries are dropped
  assert s["n"] == 4
  assert s["mean"] == pytest.approx(np.mean(v)) and s["sd"] == pytest.approx(np.std(v, ddof=1))
  assert s["ci95"] == pytest.approx(_t_interval(v))
  assert report.summarise([0.7]) == {"n": 1, "mean": 0.7, "sd": None, "ci95": None}
  assert report.summarise([]) == {"n": 0, "mean": None, "sd": None, "ci95": None}


def test_collect_reads_seeds_models_and_metrics(workdirs):
  c = report.collect(workdirs)
  assert [r["seed"] for r in c["runs"]] == [0, 1, 2]
  assert [r["label"] for r in c["runs"]] == ["seed 0", "seed 1", "seed 2"]
  assert c["models"] == ["finetune", "scratch"] and c["metrics"] == list(METRICS)
  assert c["headline"] == "balanced_accuracy"
  assert c["runs"][1]["table"]["scratch"]["auc"] == VALUES[1]["scratch"]["auc"]


def test_every_cell_matches_numpy(workdirs):
  r = report.make_report(workdirs)
  for model in MODELS:
    for metric in METRICS:
      cell, v = r["summary"][model][metric], _column(model, metric)
      assert cell["n"] == 3
      assert cell["mean"] == pytest.approx(v.mean())
      assert cell["sd"] == pytest.approx(v.std(ddof=1))
      assert cell["ci95"] == pytest.approx(_t_interval(v))
      assert [(e["seed"], e["value"]) for e in cell["values"]] == list(zip((0, 1, 2), v))
      assert cell["values"][0]["ci95"] == pytest.approx([v[0] - 0.05, v[0] + 0.05])


def test_paired_differences_match_by_workdir(workdirs):
  # The workdirs in another order: each difference still pairs one workdir's two stages.
  order = [workdirs[2], workdirs[0], workdirs[1]]
  p = report.paired(report.collect(order), "finetune", "scratch")
  for metric in METRICS:
    d = p["metrics"][metric]
    expected = {w: VALUES[s]["finetune"][metric] - VALUES[s]["scratch"][metric]
                for w, s in zip(workdirs, (0, 1, 2))}
    assert {e["workdir"]: e["value"] for e in d["diffs"]} == pytest.approx(expected)
    v = np.array([expected[w] for w in order])
    assert d["mean"] == pytest.approx(v.mean()) and d["sd"] == pytest.approx(v.std(ddof=1))
    assert d["ci95"] == pytest.approx(_t_interval(v))
  assert p["metrics"]["balanced_accuracy"]["a_gt_b"] == 2
  assert p["metrics"]["auc"]["a_gt_b"] == 3


def test_markdown_has_the_expected_rows(workdirs):
  text = report.markdown(report.make_report(workdirs, ["finetune:scratch"]))
  v = _column("finetune", "balanced_accuracy")
  lo, hi = _t_interval(v)
  assert f"{v.mean():.3f} ± {v.std(ddof=1):.3f} [{lo:.3f}, {hi:.3f}] (n=3)" in text
  assert "| model | balanced_accuracy | auc |" in text
  assert "| model | seed 0 | seed 1 | seed 2 |" in text
  assert "| finetune | 0.810 | 0.780 | 0.740 |" in text
  d = v - _column("scratch", "balanced_accuracy")
  lo, hi = _t_interval(d)
  assert (f"| finetune - scratch | {d.mean():+.3f} ± {d.std(ddof=1):.3f} "
          f"[{lo:+.3f}, {hi:+.3f}] (n=3; a>b 2/3) |") in text


def test_main_prints_and_writes_json_md_and_plot(workdirs, tmp_path, capsys):
  prefix = tmp_path / "out" / "seeds"
  argv = ["report", f"--workdirs={','.join(workdirs)}", "--pairs=finetune:scratch",
          f"--out={prefix}"]
  assert report.main(argv) == 0
  printed = capsys.readouterr().out
  assert "| finetune - scratch |" in printed
  saved = json.loads((tmp_path / "out" / "seeds.json").read_text())
  assert saved == report.make_report(workdirs, ["finetune:scratch"])
  scratch_auc = saved["summary"]["scratch"]["auc"]["mean"]
  assert scratch_auc == pytest.approx(_column("scratch", "auc").mean())
  assert (tmp_path / "out" / "seeds.md").read_text() == printed
  plot = ET.fromstring((tmp_path / "out" / "seeds.svg").read_text())
  assert plot.tag.endswith("svg")
  assert len([e for e in plot.iter() if e.tag.endswith("circle")]) == 6  # 2 models x 3 seeds
  assert not list((tmp_path / "out").glob(".*tmp*"))  # no temp file left behind


def test_main_resets_flags_between_calls(workdirs, capsys):
  dirs = f"--workdirs={','.join(workdirs)}"
  assert report.main(["report", dirs, "--pairs=finetune:scratch"]) == 0
  assert "paired differences" in capsys.readouterr().out
  assert report.main(["report", dirs]) == 0
  assert "paired differences" not in capsys.readouterr().out


def test_missing_results_json_exits_2_naming_the_path(workdirs, tmp_path, capsys):
  missing = tmp_path / "never_ran"
  missing.mkdir()
  assert report.run(workdirs + [str(missing)]) == 2
  assert report.main(["report", f"--workdirs={workdirs[0]},{missing}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"report: no results.json: {missing / 'results.json'}"] * 2


def test_unknown_pair_stage_exits_2_listing_valid_stages(workdirs, capsys):
  assert report.run(workdirs, ["finetune:probe"]) == 2
  assert report.main(["report", f"--workdirs={','.join(workdirs)}", "--pairs=probe-scratch"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 2 and all("valid stages: finetune, scratch" in l for l in lines)
  assert "'probe'" in lines[0] and "'probe'" in lines[1]
  assert report.run(workdirs, ["finetune"]) == 2
  assert "expected a:b" in capsys.readouterr().err


def test_dash_pairs_are_accepted(workdirs):
  assert report.parse_pairs(["finetune-scratch", "scratch:finetune"], MODELS) == [
      ("finetune", "scratch"), ("scratch", "finetune")]


def test_bad_arguments_exit_2(capsys):
  assert report.main(["report"]) == 2
  assert "--workdirs is required" in capsys.readouterr().err
  assert report.main(["report", "--workdirs=x", "stray"]) == 2
  assert "unexpected arguments: stray" in capsys.readouterr().err


def test_duplicate_seeds_warn(workdirs, tmp_path, capsys):
  again = _write_run(tmp_path / "run_again", 1, VALUES[1])
  assert report.run(workdirs + [again]) == 0
  captured = capsys.readouterr()
  assert "warning: seed 1 appears in 2 workdirs" in captured.err
  assert "| model | seed 0 | seed 1 (run_b) | seed 2 | seed 1 (run_again) |" in captured.out


def test_different_experiments_take_the_union_with_n_per_cell(workdirs, tmp_path, capsys):
  other = _write_run(tmp_path / "run_other", 3,
                     {"finetune": VALUES[0]["finetune"], "probe": {"balanced_accuracy": 0.6}})
  r = report.make_report(workdirs + [other], ["finetune:probe"])
  assert r["models"] == ["finetune", "scratch", "probe"]
  assert r["summary"]["finetune"]["auc"]["n"] == 4 and r["summary"]["scratch"]["auc"]["n"] == 3
  probe = r["summary"]["probe"]["balanced_accuracy"]
  assert [(e["seed"], e["workdir"], e["value"]) for e in probe["values"]] == [(3, other, 0.6)]
  assert {k: probe[k] for k in ("n", "mean", "sd", "ci95")} == {
      "n": 1, "mean": 0.6, "sd": None, "ci95": None}
  assert r["summary"]["probe"]["auc"]["n"] == 0
  assert r["pairs"][0]["metrics"]["balanced_accuracy"]["n"] == 1
  assert "auc" not in r["pairs"][0]["metrics"]
  assert "different models" in capsys.readouterr().err
  text = report.markdown(r)
  assert "| probe | 0.600 (n=1) | - |" in text and "| probe | - | - | - | 0.600 |" in text


def test_metrics_keeps_those_columns_in_order_the_first_the_headline(workdirs, capsys):
  assert report.main(["report", f"--workdirs={','.join(workdirs)}", "--metrics=auc"]) == 0
  text = capsys.readouterr().out
  assert "| model | auc |" in text and "balanced_accuracy" not in text
  assert "test auc per seed" in text and "| finetune | 0.900 | 0.880 | 0.910 |" in text
  assert report.main(["report", f"--workdirs={','.join(workdirs)}", "--metrics=dice"]) == 2
  assert "--metrics ['dice']: no run's table has them" in capsys.readouterr().err
