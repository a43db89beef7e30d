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


def _write_run(path, seed: int | None, values: dict, reverse_rows: bool = False) -> str:
  """A finished workdir as train.py leaves it: results.json (stages + table), config.json."""
  path.mkdir(parents=True)
  table, stages = [], {}
  for model, metrics in values.items():
    row = {"model": model}
    for k, v in metrics.items():
      row[k], row[f"{k}_ci95"] = v, None if v is None else [v - 0.05, v + 0.05]
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
  # Per seed: the value and that run's own interval (results.json's <metric>_ci95).
  assert "| finetune | 0.810 [0.760, 0.860] | 0.780 [0.730, 0.830] | 0.740 [0.690, 0.790] |" \
      in text
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
  assert "| probe | 0.600 (n=1) | - |" in text
  assert "| probe | - | - | - | 0.600 [0.550, 0.650] |" in text


def test_metrics_keeps_those_columns_in_order_the_first_the_headline(workdirs, capsys):
  assert report.main(["report", f"--workdirs={','.join(workdirs)}", "--metrics=auc"]) == 0
  text = capsys.readouterr().out
  assert "| model | auc |" in text and "balanced_accuracy" not in text
  assert "test auc per seed" in text
  assert "| finetune | 0.900 [0.850, 0.950] | 0.880 [0.830, 0.930] | 0.910 [0.860, 0.960] |" \
      in text
  assert report.main(["report", f"--workdirs={','.join(workdirs)}", "--metrics=dice"]) == 2
  assert "--metrics ['dice']: no run's table has them" in capsys.readouterr().err


def test_per_seed_cells_show_an_interval_only_where_the_run_has_one(tmp_path, capsys):
  runs = [_write_run(tmp_path / f"r{s}", s, {"m": {"paired/x/auc": 0.1 * (s + 1)}})
          for s in (0, 1)]
  table = json.loads((tmp_path / "r1" / "results.json").read_text())
  del table["table"][0]["paired/x/auc_ci95"]
  (tmp_path / "r1" / "results.json").write_text(json.dumps(table))
  assert report.main(["report", f"--workdirs={','.join(runs)}"]) == 0
  assert "| m | 0.100 [0.050, 0.150] | 0.200 |" in capsys.readouterr().out


# --------------------------------------------------------------------------- group mode
# GROUP_VALUES[group][seed][model]: one downstream config per encoder source. Each row's first
# metric is its headline (mean/auc, dice, map); every row also has a loss. `rn` has only
# seeds 1 and 0 and no detect stage.
def _rows(auc: float, dice: float, map_: float | None, loss: float) -> dict:
  rows = {"linear_1": {"mean/auc": auc, "loss": loss},
          "segment": {"dice": dice, "loss": loss + 0.1}}
  if map_ is not None:
    rows["detect"] = {"map": map_, "loss": loss + 0.2}
  return rows


GROUP_VALUES = {
    "hm": {0: _rows(0.80, 0.70, 0.40, 0.30), 1: _rows(0.84, 0.66, 0.45, 0.28),
           2: _rows(0.79, 0.73, 0.38, 0.35)},
    "sw": {0: _rows(0.75, 0.69, 0.41, 0.33), 1: _rows(0.77, 0.60, 0.40, 0.31),
           2: _rows(0.81, 0.65, 0.30, 0.36)},
    "rn": {1: _rows(0.60, 0.50, None, 0.50), 0: _rows(0.62, 0.45, None, 0.52)},
}
# The order each group's workdirs are listed in --groups: pairing must go by seed.
GROUP_SEEDS = {"hm": (0, 1, 2), "sw": (2, 0, 1), "rn": (1, 0)}
HEADLINES = {"linear_1": "mean/auc", "segment": "dice", "detect": "map"}


@pytest.fixture
def group_dirs(tmp_path) -> dict[str, list[str]]:
  return {g: [_write_run(tmp_path / f"{g}_s{s}", s, GROUP_VALUES[g][s]) for s in seeds]
          for g, seeds in GROUP_SEEDS.items()}


def _groups_arg(dirs: dict[str, list[str]]) -> str:
  return ";".join(f"{g}={','.join(ws)}" for g, ws in dirs.items())


def _values(group: str, model: str, metric: str) -> np.ndarray:
  """The group's values in its --groups order (seeds lacking the model left out)."""
  return np.array([GROUP_VALUES[group][s][model][metric] for s in GROUP_SEEDS[group]
                   if model in GROUP_VALUES[group][s]])


def _diffs(a: str, b: str, model: str, metric: str) -> dict[int, float]:
  """a - b per seed both groups have (and both have the model), by hand."""
  return {s: GROUP_VALUES[a][s][model][metric] - GROUP_VALUES[b][s][model][metric]
          for s in GROUP_SEEDS[a] if s in GROUP_VALUES[b]
          and model in GROUP_VALUES[a][s] and model in GROUP_VALUES[b][s]}


def test_parse_groups_keeps_order_and_workdirs():
  assert report.parse_groups(" hm=/a,/b ; sw=/c;") == [("hm", ["/a", "/b"]), ("sw", ["/c"])]


def test_group_pairs_may_name_labels_with_dashes():
  labels = ["hm", "hm-no-dis", "random"]
  assert report.parse_pairs(["hm-no-dis:random", "hm-no-dis-random", "hm-hm-no-dis"], labels,
                            kind="group", where="in --groups") == [
      ("hm-no-dis", "random"), ("hm-no-dis", "random"), ("hm", "hm-no-dis")]


def test_group_table_cells_are_mean_and_sd_of_each_rows_headline(group_dirs):
  r = report.make_group_report(list(group_dirs.items()))
  assert [g["label"] for g in r["groups"]] == ["hm", "sw", "rn"]
  assert [x["seed"] for x in r["groups"][1]["runs"]] == [2, 0, 1]
  assert r["models"] == ["linear_1", "segment", "detect"] and r["headlines"] == HEADLINES
  (table,) = r["tables"]
  for model, metric in HEADLINES.items():
    assert table["rows"][model]["metric"] == metric
    for g in group_dirs:
      c, v = table["rows"][model]["cells"][g], _values(g, model, metric)
      assert c["n"] == v.size
      if v.size:
        assert c["mean"] == pytest.approx(v.mean())
        assert c["sd"] == pytest.approx(v.std(ddof=1))
  assert table["rows"]["detect"]["cells"]["rn"]["n"] == 0
  # By hand: hm's dice 0.70, 0.66, 0.73 -> mean 0.69667, sd 0.035119.
  assert table["rows"]["segment"]["cells"]["hm"]["mean"] == pytest.approx(2.09 / 3)
  assert table["rows"]["segment"]["cells"]["hm"]["sd"] == pytest.approx(0.0351188, abs=1e-6)


def test_group_markdown_has_one_column_per_group(group_dirs, capsys):
  assert report.main(["report", f"--groups={_groups_arg(group_dirs)}"]) == 0
  text = capsys.readouterr().out
  assert "test headline metric by source: mean ± sd (n runs)" in text
  assert "| model | metric | hm | sw | rn |" in text
  assert "- sw: 3 runs (seeds 2, 0, 1)" in text and "- rn: 2 runs (seeds 1, 0)" in text
  cells = [f"{v.mean():.3f} ± {v.std(ddof=1):.3f} (n={v.size})"
           for v in (_values(g, "segment", "dice") for g in ("hm", "sw", "rn"))]
  assert f"| segment | dice | {' | '.join(cells)} |" in text
  hm, sw = _values("hm", "detect", "map"), _values("sw", "detect", "map")
  assert (f"| detect | map | {hm.mean():.3f} ± {hm.std(ddof=1):.3f} (n=3) | "
          f"{sw.mean():.3f} ± {sw.std(ddof=1):.3f} (n=3) | - |") in text
  assert "paired differences" not in text


def test_group_pairs_match_by_seed(group_dirs, capsys):
  r = report.make_group_report(list(group_dirs.items()), ["hm:sw", "hm-rn"])
  pairs = r["tables"][0]["pairs"]
  assert [(p["a"], p["b"]) for p in pairs] == [("hm", "sw"), ("hm", "rn")]
  for p in pairs:
    for model, metric in HEADLINES.items():
      expected = _diffs(p["a"], p["b"], model, metric)
      if not expected:
        assert model not in p["models"]
        continue
      d = p["models"][model]
      assert d["metric"] == metric
      assert {e["seed"]: e["value"] for e in d["diffs"]} == pytest.approx(expected)
      v = np.array(list(expected.values()))
      assert d["n"] == v.size and d["a_gt_b"] == int((v > 0).sum())
      assert d["mean"] == pytest.approx(v.mean()) and d["sd"] == pytest.approx(v.std(ddof=1))
      assert d["ci95"] == pytest.approx(_t_interval(v))
  # hm - sw on dice, by hand: seed 0 0.01, seed 1 0.06, seed 2 0.08.
  dice = pairs[0]["models"]["segment"]
  assert {e["seed"]: e["value"] for e in dice["diffs"]} == pytest.approx(
      {0: 0.01, 1: 0.06, 2: 0.08})
  assert pairs[1]["models"]["linear_1"]["n"] == 2  # rn has no seed 2
  assert "seeds [2] are in only one of the groups" in capsys.readouterr().err
  text = report.group_markdown(r)
  v = np.array([0.01, 0.06, 0.08])
  lo, hi = _t_interval(v)
  assert "| model | metric | hm - sw | hm - rn |" in text
  assert (f"| segment | dice | {v.mean():+.3f} ± {v.std(ddof=1):.3f} [{lo:+.3f}, {hi:+.3f}] "
          f"(n=3; a>b 3/3) |") in text
  assert text.rstrip().endswith("| detect | map | " + report._diff_cell(
      pairs[0]["models"]["detect"]) + " | - |")


def test_group_runs_without_seeds_pair_by_position(tmp_path, capsys):
  a = [_write_run(tmp_path / f"a{i}", None, {"m": {"acc": v}}) for i, v in enumerate((0.5, 0.7))]
  b = [_write_run(tmp_path / f"b{i}", s, {"m": {"acc": v}})
       for i, (s, v) in enumerate(((1, 0.4), (0, 0.6)))]
  r = report.make_group_report([("a", a), ("b", b)], ["a:b"])
  d = r["tables"][0]["pairs"][0]["models"]["m"]
  assert [(e["workdir_a"], e["workdir_b"]) for e in d["diffs"]] == list(zip(a, b))
  assert [e["value"] for e in d["diffs"]] == pytest.approx([0.1, 0.1])
  assert [e["seed"] for e in d["diffs"]] == [None, None]
  assert "matching their runs by position" in capsys.readouterr().err


def test_group_metrics_gives_one_table_per_metric(group_dirs, capsys):
  argv = ["report", f"--groups={_groups_arg(group_dirs)}", "--metrics=loss,dice",
          "--pairs=sw:rn"]
  assert report.main(argv) == 0
  text = capsys.readouterr().out
  assert "test loss by source" in text and "test dice by source" in text
  assert "headline" not in text
  loss = [_values(g, "detect", "loss") for g in ("hm", "sw")]
  assert ("| detect | loss | " + " | ".join(f"{v.mean():.3f} ± {v.std(ddof=1):.3f} (n=3)"
                                            for v in loss) + " | - |") in text
  assert "| linear_1 | dice | - | - | - |" in text  # a row without the metric
  r = report.make_group_report(list(group_dirs.items()), ["sw:rn"], ["loss", "dice"])
  assert [t["metric"] for t in r["tables"]] == ["loss", "dice"]
  d = r["tables"][0]["pairs"][0]["models"]["segment"]
  assert {e["seed"]: e["value"] for e in d["diffs"]} == pytest.approx(
      _diffs("sw", "rn", "segment", "loss"))
  assert "linear_1" not in r["tables"][1]["pairs"][0]["models"]


def test_group_null_headline_stays_the_rows_headline(tmp_path):
  runs = [_write_run(tmp_path / f"r{s}", s, {"segment": {"dice": v, "loss": 0.3}})
          for s, v in ((1, None), (0, 0.6), (2, 0.8))]  # the null one first
  r = report.make_group_report([("only", runs)])
  c = r["tables"][0]["rows"]["segment"]
  assert c["metric"] == "dice"
  assert c["cells"]["only"]["n"] == 2 and c["cells"]["only"]["mean"] == pytest.approx(0.7)


def test_group_main_writes_json_and_md_without_svg(group_dirs, tmp_path, capsys):
  prefix = tmp_path / "out" / "downstream"
  groups = _groups_arg(group_dirs)
  assert report.main(["report", f"--groups={groups}", "--pairs=hm:sw", f"--out={prefix}"]) == 0
  printed = capsys.readouterr().out
  saved = json.loads((tmp_path / "out" / "downstream.json").read_text())
  assert saved == report.make_group_report(report.parse_groups(groups), ["hm:sw"])
  assert (tmp_path / "out" / "downstream.md").read_text() == printed
  assert not (tmp_path / "out" / "downstream.svg").exists()


@pytest.mark.parametrize("make_argv, message", [
    (lambda g, w: ["--groups=" + g, "--workdirs=" + w],
     "report: --workdirs and --groups are mutually exclusive"),
    (lambda g, w: ["--groups=hm/tmp/x;" + g], "report: bad --groups entry 'hm/tmp/x'"),
    (lambda g, w: ["--groups=a:b=" + w], "report: bad --groups entry 'a:b="),
    (lambda g, w: [f"--groups={g};hm={w}"], "report: duplicate --groups label 'hm'"),
    (lambda g, w: [f"--groups={g};empty= , "],
     "report: --groups entry 'empty= ,': group 'empty' has no workdirs"),
    (lambda g, w: ["--groups=;;"], "report: --groups ';;' has no LABEL=W1,W2,... entry"),
    (lambda g, w: ["--groups=" + g, "--pairs=hm:swav"],
     "report: pair 'hm:swav': no group 'swav' in --groups; valid groups: hm, sw, rn"),
    (lambda g, w: ["--groups=" + g, "--metrics=iou"], "report: --metrics ['iou']: no run's"),
])
def test_group_errors_exit_2_with_one_line(group_dirs, make_argv, message, capsys):
  argv = ["report"] + make_argv(_groups_arg(group_dirs), group_dirs["hm"][0])
  assert report.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), lines


def test_group_workdir_without_results_exits_2(group_dirs, tmp_path, capsys):
  missing = tmp_path / "never_ran"
  missing.mkdir()
  assert report.run([], groups=f"{_groups_arg(group_dirs)};bad={missing}") == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      f"report: no results.json: {missing / 'results.json'}"]
  assert report.main(["report"]) == 2
  assert "or --groups=" in capsys.readouterr().err
