r"""One experiment over several seeds: mean, sd and 95% t-interval per model and metric;
or the same experiment run from several sources (e.g. encoders), one column per source.

  python -m medguide_jax.report --workdirs=/tmp/ft_s0,/tmp/ft_s1,/tmp/ft_s2 \
      [--pairs=finetune:scratch,probe:probe_random] [--out=/tmp/ssl_report]

  python -m medguide_jax.report \
      --groups='hybridmed=/tmp/hm0,/tmp/hm1;swav=/tmp/sw0,/tmp/sw1;random=/tmp/rn0,/tmp/rn1' \
      [--pairs=hybridmed:random,hybridmed:swav] [--metrics=dice,map] [--out=/tmp/downstream]

Each workdir is a finished run (train.py) of the same config with a different seed: its
results.json table gives the test metrics of each model (stage), its config.json the seed.
The generalisation of ssl_report.py to any experiment and any table metric.

Printed as Markdown:

* per model and table metric: mean ± sd [95% t-interval of the mean] (n runs). Runs of
  different experiments are accepted: models and metrics are the union, n is per cell;
* per seed, the headline metric (the first table column, or the first of --metrics), with
  that run's own 95% interval where its table has one (its bootstrap over test cases; for a
  `paired/<stage>/<metric>` of evaluation/paired.py, the paired bootstrap);
* with --pairs, paired differences a - b per metric, matched by workdir (so by seed): mean ±
  sd [95% t-interval] and how many seeds have a > b. A pair is `a:b`; `a-b` is accepted too,
  since stage names hold no '-'.

--out=PREFIX also writes PREFIX.json (everything, machine-readable), PREFIX.md and PREFIX.svg
(per model: the seeds' headline values, their mean and its 95% interval).

Exit code 2, with one line on stderr, for a workdir without results.json or a pair naming a
stage that is in no table; duplicate seeds across workdirs are warned about on stderr.

Group mode (--groups, instead of --workdirs): `LABEL=W1,W2,...` entries separated by ';', one
per source (a label holds no ':', ',' or ';'), each a list of finished workdirs of the same
config, one per seed. Printed as Markdown:

* "<metric> by source": rows = the models (union, in table order of first appearance), one
  column per group in the given order, cell = mean ± sd (n runs) of the row's headline metric
  (the first metric of that model's table row; the `metric` column names it, since rows
  differ), '-' where a group has no value. With --metrics=m1,m2: one such table per listed
  metric instead (a row lacking it gets '-');
* with --pairs=a:b naming group labels (`a-b` too, where only one '-' splits it into two
  labels): per model, the paired difference a - b of the same metric, matched by SEED
  (config.json's seed; where a group has runs without a seed, or a seed twice, its runs are
  matched by position and a warning is printed; seeds only one group has are left out, with a
  warning): mean ± sd [95% t-interval] (n; seeds with a > b), as in the per-stage pairs.

--out=PREFIX writes PREFIX.json (everything, each run's value included) and PREFIX.md; no
PREFIX.svg in group mode: the per-seed plot has one metric on one axis, while the rows of a
group table differ in metric.

Exit code 2, with one line, also for --groups with --workdirs (or neither), a malformed group
entry (named), a duplicate label, a group without workdirs, a pair naming an unknown group.
"""
from __future__ import annotations

import html
import math
import sys
from typing import Sequence

import numpy as np
from absl import app, flags
from etils import epath
from scipy import stats

from medguide_jax import metric_writers

# Our own FlagValues: ssl_report defines --workdirs and --out in the global FLAGS, and absl
# refuses the same name from two modules once both are imported (as under pytest).
_FLAGS = flags.FlagValues()
_WORKDIRS = flags.DEFINE_list("workdirs", None, "Finished workdirs, one per seed.",
                              flag_values=_FLAGS)
_PAIRS = flags.DEFINE_list("pairs", [], "Paired differences `a:b` (a minus b); `a-b` too.",
                           flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", "", "Also write PREFIX.json, PREFIX.md and PREFIX.svg.",
                           flag_values=_FLAGS)
_GROUPS = flags.DEFINE_string(
    "groups", "", "Instead of --workdirs: `LABEL=W1,W2,...` entries separated by ';', one "
    "column per label (e.g. encoder source); --pairs then names labels.", flag_values=_FLAGS)
_METRICS = flags.DEFINE_list(
    "metrics", [], "Only these table metrics, in this order (the first is the headline); "
    "default: every one, the runs' headline first.", flag_values=_FLAGS)


class ReportError(Exception):
  """Bad input: main() prints the message as one line and exits 2."""


def _warn(message: str) -> None:
  print(f"report: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- inputs
def _number(x) -> float | None:
  """A table cell as float; None for anything else (a nested list, null, a bool)."""
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return None
  return float(x)


def _read_run(workdir: str) -> dict:
  """One workdir: its seed and table {model: {metric: value}} (+ per-run bootstrap CIs)."""
  path = epath.Path(workdir) / "results.json"
  if not path.exists():
    raise ReportError(f"no results.json: {path}")
  config_path = epath.Path(workdir) / "config.json"
  try:
    table = metric_writers.read_json(path)["table"]
    seed = metric_writers.read_json(config_path).get("seed") if config_path.exists() else None
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ReportError(f"unreadable results.json or config.json in {workdir}: {e!r}") from e
  rows, cis, headlines = {}, {}, {}
  for row in table:
    # The row's headline is its first metric, whatever its value (a null is still first).
    firsts = [k for k in row if k != "model" and not k.endswith("_ci95")]
    if firsts:
      headlines[row["model"]] = firsts[0]
    rows[row["model"]] = {k: _number(v) for k, v in row.items()
                          if k != "model" and not k.endswith("_ci95") and _number(v) is not None}
    cis[row["model"]] = {k.removesuffix("_ci95"): v for k, v in row.items() if k.endswith("_ci95")}
  return {"workdir": str(workdir), "seed": seed, "table": rows, "ci95": cis,
          "headlines": headlines}


def _union(lists) -> list:
  """Ordered union: the first run's order, then what later runs add."""
  out = []
  for items in lists:
    out += [x for x in items if x not in out]
  return out


def _labels(runs: list[dict]) -> list[str]:
  """Column names of the per-seed table: the seed, qualified by the workdir if repeated."""
  seeds = [r["seed"] for r in runs]
  labels = []
  for r in runs:
    name = epath.Path(r["workdir"]).name or r["workdir"]
    if r["seed"] is None:
      labels.append(name)
    else:
      labels.append(f"seed {r['seed']}" + (f" ({name})" if seeds.count(r["seed"]) > 1 else ""))
  return labels


def collect(workdirs: Sequence[str]) -> dict:
  """Reads every workdir: runs (workdir, seed, label, table), the union of models/metrics.

  Raises ReportError for a workdir without (a readable) results.json.
  """
  runs = [_read_run(w) for w in workdirs]
  for run_, label in zip(runs, _labels(runs)):
    run_["label"] = label
  models = _union(r["table"] for r in runs)
  metrics = _union(m for r in runs for m in r["table"].values())
  return {"runs": runs, "models": models, "metrics": metrics,
          "headline": metrics[0] if metrics else None}


def _check_runs(collected: dict) -> None:
  """Warnings only: the numbers are still right, but probably not what was meant."""
  seen: dict = {}
  for r in collected["runs"]:
    if r["seed"] is not None:
      seen.setdefault(r["seed"], []).append(r["workdir"])
  for seed, dirs in seen.items():
    if len(dirs) > 1:
      _warn(f"seed {seed} appears in {len(dirs)} workdirs: {', '.join(dirs)}")
  model_sets = {tuple(sorted(r["table"])) for r in collected["runs"]}
  if len(model_sets) > 1:
    _warn("the workdirs' tables have different models (different experiments?); "
          "n is given per cell")


# --------------------------------------------------------------------------- statistics
def summarise(values: Sequence[float | None]) -> dict:
  """n, mean, sample sd (ddof=1) and 95% t-interval of the mean over the finite values.

  sd and ci95 are None with fewer than two values, mean too with none.
  """
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  out = {"n": int(v.size), "mean": float(v.mean()) if v.size else None, "sd": None,
         "ci95": None}
  if v.size > 1:
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, v.size - 1)) * sd / math.sqrt(v.size)
    out.update(sd=sd, ci95=[out["mean"] - half, out["mean"] + half])
  return out


def _finite(x: float | None) -> float | None:
  return x if x is not None and math.isfinite(x) else None


def cell(collected: dict, model: str, metric: str) -> dict:
  """One model x metric: each run's value (with seed, workdir, bootstrap CI) and summary."""
  values = []
  for r in collected["runs"]:
    if metric in r["table"].get(model, {}):
      entry = {"seed": r["seed"], "workdir": r["workdir"],
               "value": _finite(r["table"][model][metric])}
      if metric in r["ci95"].get(model, {}):
        entry["ci95"] = r["ci95"][model][metric]
      values.append(entry)
  return {"values": values, **summarise([e["value"] for e in values])}


def paired(collected: dict, a: str, b: str) -> dict:
  """a - b per metric, matched by workdir (runs lacking either value are left out)."""
  out = {"a": a, "b": b, "metrics": {}}
  for metric in collected["metrics"]:
    diffs = []
    for r in collected["runs"]:
      va = _finite(r["table"].get(a, {}).get(metric))
      vb = _finite(r["table"].get(b, {}).get(metric))
      if va is not None and vb is not None:
        diffs.append({"seed": r["seed"], "workdir": r["workdir"], "value": va - vb})
    if diffs:
      out["metrics"][metric] = {"diffs": diffs, **summarise([d["value"] for d in diffs]),
                                "a_gt_b": sum(d["value"] > 0 for d in diffs)}
  return out


def _split_pair(text: str, names: Sequence[str]) -> list[str]:
  """`a:b`, else `a-b`; a name with '-' in it is found by trying each '-' as the split."""
  if ":" in text:
    return text.split(":")
  parts = text.split("-")
  if len(parts) > 2:
    splits = [["-".join(parts[:i]), "-".join(parts[i:])] for i in range(1, len(parts))]
    valid = [s for s in splits if all(x in names for x in s)]
    if len(valid) == 1:
      return valid[0]
  return parts


def parse_pairs(pairs: Sequence[str], models: Sequence[str], kind: str = "stage",
                where: str = "in the tables") -> list[tuple[str, str]]:
  """`a:b` (or `a-b`) strings as (a, b); ReportError naming the valid stages otherwise
  (`kind`/`where` word the message for other names, e.g. "group", "in --groups")."""
  out = []
  for text in pairs:
    parts = _split_pair(text, models)
    if len(parts) != 2 or not all(parts):
      raise ReportError(f"bad pair {text!r}: expected a:b (a minus b)")
    unknown = [p for p in parts if p not in models]
    if unknown:
      raise ReportError(f"pair {text!r}: no {kind} {', '.join(map(repr, unknown))} {where}; "
                        f"valid {kind}s: {', '.join(models)}")
    out.append((parts[0], parts[1]))
  return out


def make_report(workdirs: Sequence[str], pairs: Sequence[str] = (),
                metrics: Sequence[str] = ()) -> dict:
  """collect + every model x metric cell + the paired differences, as one JSON-able dict;
  `metrics` keeps those metrics only, in that order (a name no run has is a ReportError)."""
  collected = collect(workdirs)
  if metrics:
    unknown = [m for m in metrics if m not in collected["metrics"]]
    if unknown:
      raise ReportError(f"--metrics {unknown}: no run's table has them; they have "
                        f"{collected['metrics']}")
    collected = {**collected, "metrics": list(metrics), "headline": metrics[0]}
  pair_list = parse_pairs(pairs, collected["models"])
  _check_runs(collected)
  return {
      "workdirs": list(workdirs),
      "runs": [{k: r[k] for k in ("workdir", "seed", "label")} for r in collected["runs"]],
      "models": collected["models"], "metrics": collected["metrics"],
      "headline": collected["headline"],
      "summary": {m: {k: cell(collected, m, k) for k in collected["metrics"]}
                  for m in collected["models"]},
      "pairs": [paired(collected, a, b) for a, b in pair_list],
      # Each run's own 95% interval of the headline (its bootstrap over test cases; for a
      # paired/<stage>/... metric, the paired bootstrap), where its table has one.
      "headline_ci95": {m: {r["workdir"]: r["ci95"][m][collected["headline"]]
                            for r in collected["runs"]
                            if collected["headline"] in r["ci95"].get(m, {})}
                        for m in collected["models"]},
  }


# --------------------------------------------------------------------------- groups
def parse_groups(text: str) -> list[tuple[str, list[str]]]:
  """`LABEL=W1,W2;LABEL2=W3` as [(label, [workdirs])], in order; empty entries (a trailing
  ';') are skipped. ReportError naming the entry for a malformed one, a duplicate label or a
  group without workdirs."""
  groups: list[tuple[str, list[str]]] = []
  for entry in text.split(";"):
    if not entry.strip():
      continue
    label, eq, dirs = entry.partition("=")
    label = label.strip()
    if not eq or not label or any(c in label for c in ":,"):
      raise ReportError(f"bad --groups entry {entry.strip()!r}: expected LABEL=W1,W2,... "
                        "(a label without ':' or ',')")
    if label in [g[0] for g in groups]:
      raise ReportError(f"duplicate --groups label {label!r}")
    workdirs = [w.strip() for w in dirs.split(",") if w.strip()]
    if not workdirs:
      raise ReportError(f"--groups entry {entry.strip()!r}: group {label!r} has no workdirs")
    groups.append((label, workdirs))
  if not groups:
    raise ReportError(f"--groups {text!r} has no LABEL=W1,W2,... entry")
  return groups


def _row_headlines(collected: list[dict], models: Sequence[str]) -> dict[str, str]:
  """Each model's headline: the first metric of its row in the first run that has it; a run
  whose row starts with another metric is warned about (the first one is used)."""
  out: dict[str, str] = {}
  for model in models:
    seen = [(r["workdir"], r["headlines"][model]) for c in collected for r in c["runs"]
            if model in r["headlines"]]
    if not seen:
      continue
    out[model] = seen[0][1]
    other = [w for w, h in seen if h != out[model]]
    if other:
      _warn(f"model {model!r}: headline {out[model]!r} in {seen[0][0]}, another metric first "
            f"in {', '.join(other)}; using {out[model]!r}")
  return out


def _match_by_seed(a_label: str, a: dict, b_label: str, b: dict) -> list[tuple[dict, dict]]:
  """The (run of a, run of b) pairs with the same seed, in a's order. Where either group has
  a run without a seed, or a seed twice, the runs are matched by position instead (warned)."""
  def seeds_ok(c):
    seeds = [r["seed"] for r in c["runs"]]
    return None not in seeds and len(set(seeds)) == len(seeds)
  if not (seeds_ok(a) and seeds_ok(b)):
    _warn(f"pair {a_label}:{b_label}: runs without a seed (or with a repeated seed) in "
          f"{a_label!r} or {b_label!r}; matching their runs by position")
    if len(a["runs"]) != len(b["runs"]):
      _warn(f"pair {a_label}:{b_label}: {len(a['runs'])} runs against {len(b['runs'])}; "
            "the extra runs are left out")
    return list(zip(a["runs"], b["runs"]))
  b_by_seed = {r["seed"]: r for r in b["runs"]}
  matched = [(r, b_by_seed[r["seed"]]) for r in a["runs"] if r["seed"] in b_by_seed]
  a_seeds = {r["seed"] for r in a["runs"]}
  lone = [r["seed"] for r in a["runs"] if r["seed"] not in b_by_seed] + [
      r["seed"] for r in b["runs"] if r["seed"] not in a_seeds]
  if lone:
    _warn(f"pair {a_label}:{b_label}: seeds {lone} are in only one of the groups; left out")
  return matched


def group_paired(matched: list[tuple[dict, dict]], a: str, b: str, models: Sequence[str],
                 metric_of: dict[str, str | None]) -> dict:
  """Groups a - b per model on the model's metric (`metric_of`), over the matched runs
  (those lacking either value are left out); the summary of paired()."""
  out = {"a": a, "b": b, "models": {}}
  for model in models:
    metric, diffs = metric_of.get(model), []
    for ra, rb in matched:
      va = _finite(ra["table"].get(model, {}).get(metric))
      vb = _finite(rb["table"].get(model, {}).get(metric))
      if va is not None and vb is not None:
        diffs.append({"seed": ra["seed"] if ra["seed"] == rb["seed"] else None,
                      "workdir_a": ra["workdir"], "workdir_b": rb["workdir"],
                      "value": va - vb})
    if diffs:
      out["models"][model] = {"metric": metric, "diffs": diffs,
                              **summarise([d["value"] for d in diffs]),
                              "a_gt_b": sum(d["value"] > 0 for d in diffs)}
  return out


def make_group_report(groups: Sequence[tuple[str, Sequence[str]]], pairs: Sequence[str] = (),
                      metrics: Sequence[str] = ()) -> dict:
  """Group mode as one JSON-able dict: per table (the rows' headlines, or each of `metrics`)
  and model, the metric and one cell() per group; per table and pair, group_paired().

  ReportError for a workdir without results.json, a metric no run has, a pair naming an
  unknown group.
  """
  labels = [label for label, _ in groups]
  collected = [collect(workdirs) for _, workdirs in groups]
  all_metrics = _union(c["metrics"] for c in collected)
  if metrics:
    unknown = [m for m in metrics if m not in all_metrics]
    if unknown:
      raise ReportError(f"--metrics {unknown}: no run's table has them; they have "
                        f"{all_metrics}")
  pair_list = parse_pairs(pairs, labels, kind="group", where="in --groups")
  for c in collected:
    _check_runs(c)
  models = _union(c["models"] for c in collected)
  headlines = _row_headlines(collected, models)
  specs = [(m, {model: m for model in models}) for m in metrics] or [(None, headlines)]
  matched = {(a, b): _match_by_seed(a, collected[labels.index(a)], b,
                                    collected[labels.index(b)]) for a, b in pair_list}
  tables = []
  for name, metric_of in specs:
    rows = {model: {"metric": metric_of.get(model),
                    "cells": {label: cell(c, model, metric_of.get(model))
                              for label, c in zip(labels, collected)}}
            for model in models}
    tables.append({"metric": name, "rows": rows,
                   "pairs": [group_paired(matched[(a, b)], a, b, models, metric_of)
                             for a, b in pair_list]})
  return {
      "groups": [{"label": label, "workdirs": list(workdirs),
                  "runs": [{k: r[k] for k in ("workdir", "seed", "label")} for r in c["runs"]]}
                 for (label, workdirs), c in zip(groups, collected)],
      "models": models, "headlines": headlines, "metrics": list(metrics), "tables": tables,
  }


# --------------------------------------------------------------------------- markdown
def format_cell(s: dict, signed: bool = False) -> str:
  """`0.512 ± 0.023 [0.475, 0.549] (n=4)`; `0.512 (n=1)`; `-` without a value."""
  if not s.get("n"):
    return "-"
  f = "+.3f" if signed else ".3f"
  text = format(s["mean"], f)
  if s.get("sd") is not None:
    text += f" ± {s['sd']:.3f} [{format(s['ci95'][0], f)}, {format(s['ci95'][1], f)}]"
  return text + f" (n={s['n']})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _per_seed_rows(report: dict) -> list[list[str]]:
  """Headline value per model and run, in the order of --workdirs, with the run's own 95%
  interval where its table has one."""
  h, rows = report["headline"], []
  for model in report["models"]:
    by_dir = {e["workdir"]: e["value"] for e in report["summary"][model][h]["values"]}
    cis = report.get("headline_ci95", {}).get(model, {})
    cell = lambda w: "-" if by_dir.get(w) is None else f"{by_dir[w]:.3f}" + (
        f" [{cis[w][0]:.3f}, {cis[w][1]:.3f}]" if w in cis else "")
    rows.append([model] + [cell(r["workdir"]) for r in report["runs"]])
  return rows


def markdown(report: dict) -> str:
  """The summary table, the per-seed headline table and (with pairs) the differences."""
  metrics, n = report["metrics"], len(report["runs"])
  lines = [f"test metrics over {n} runs: mean ± sd [95% t-interval of the mean] (n)", ""]
  lines += _table(["model"] + metrics,
                  [[m] + [format_cell(report["summary"][m][k]) for k in metrics]
                   for m in report["models"]])
  if report["headline"]:
    lines += ["", f"test {report['headline']} per seed", ""]
    lines += _table(["model"] + [r["label"] for r in report["runs"]], _per_seed_rows(report))
  if report["pairs"]:
    lines += ["", "paired differences a - b, matched by workdir: mean ± sd [95% t-interval] "
              "(n; seeds with a > b)", ""]
    rows = []
    for p in report["pairs"]:
      rows.append([f"{p['a']} - {p['b']}"] + [_diff_cell(p["metrics"].get(k, {})) for k in metrics])
    lines += _table(["pair"] + metrics, rows)
  return "\n".join(lines) + "\n"


def _diff_cell(s: dict) -> str:
  text = format_cell(s, signed=True)
  return text if text == "-" else text[:-1] + f"; a>b {s['a_gt_b']}/{s['n']})"


def format_mean_sd(s: dict) -> str:
  """`0.512 ± 0.023 (n=4)`; `0.512 (n=1)`; `-` without a value."""
  if not s.get("n"):
    return "-"
  sd = f" ± {s['sd']:.3f}" if s.get("sd") is not None else ""
  return f"{s['mean']:.3f}{sd} (n={s['n']})"


def group_markdown(report: dict) -> str:
  """Group mode: the runs per group, then per table the model x group cells and (with
  pairs) the model x pair differences."""
  labels = [g["label"] for g in report["groups"]]
  lines = ["runs per source:", ""]
  for g in report["groups"]:
    seeds = ", ".join("-" if r["seed"] is None else str(r["seed"]) for r in g["runs"])
    n = len(g["runs"])
    lines.append(f"- {g['label']}: {n} run{'s' * (n != 1)} (seed{'s' * (n != 1)} {seeds})")
  for t in report["tables"]:
    what = t["metric"] or "headline metric"
    lines += ["", f"test {what} by source: mean ± sd (n runs)", ""]
    lines += _table(["model", "metric"] + labels,
                    [[m, row["metric"] or "-"] + [format_mean_sd(row["cells"][g]) for g in labels]
                     for m, row in t["rows"].items()])
    if t["pairs"]:
      lines += ["", f"paired differences a - b of the {what}, matched by seed: mean ± sd "
                "[95% t-interval] (n; seeds with a > b)", ""]
      lines += _table(["model", "metric"] + [f"{p['a']} - {p['b']}" for p in t["pairs"]],
                      [[m, row["metric"] or "-"] +
                       [_diff_cell(p["models"].get(m, {})) for p in t["pairs"]]
                       for m, row in t["rows"].items()])
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot
# matplotlib is not a dependency of this project (and is not installed where this was
# written), so the plot is a small SVG assembled by hand rather than a PNG.
_W, _H, _PAD = 120, 320, 50  # px per model, plot height, margin


def _y_range(report: dict) -> tuple[float, float]:
  """Bounds covering every seed's value and every interval, with a little room."""
  ys = []
  for model in report["models"]:
    s = report["summary"][model][report["headline"]]
    ys += [e["value"] for e in s["values"] if e["value"] is not None] + (s["ci95"] or [])
  lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
  room = (hi - lo) * 0.1 or 0.05
  return lo - room, hi + room


def _svg_axis(lo: float, hi: float, y, width: int) -> list[str]:
  out = [f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_PAD + _H}" stroke="black"/>']
  for v in np.linspace(lo, hi, 5):
    out.append(f'<line x1="{_PAD}" y1="{y(v):.1f}" x2="{width - 10}" y2="{y(v):.1f}" '
               'stroke="#ddd"/>')
    out.append(f'<text x="{_PAD - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
  return out


def _svg_model(i: int, model: str, s: dict, y) -> list[str]:
  """Seeds as grey dots (spread sideways), the mean as a bar, its 95% interval as a line."""
  cx = _PAD + _W * (i + 0.5)
  vals = [e["value"] for e in s["values"] if e["value"] is not None]
  out = [f'<text x="{cx}" y="{_PAD + _H + 20}" text-anchor="middle">{html.escape(model)}</text>']
  for j, v in enumerate(vals):
    dx = (j - (len(vals) - 1) / 2) * 6
    out.append(f'<circle cx="{cx - 20 + dx:.1f}" cy="{y(v):.1f}" r="3" fill="#888"/>')
  if s["ci95"]:
    out.append(f'<line x1="{cx + 10}" y1="{y(s["ci95"][0]):.1f}" x2="{cx + 10}" '
               f'y2="{y(s["ci95"][1]):.1f}" stroke="#c00" stroke-width="2"/>')
  if s["mean"] is not None:
    out.append(f'<line x1="{cx}" y1="{y(s["mean"]):.1f}" x2="{cx + 20}" y2="{y(s["mean"]):.1f}" '
               'stroke="#c00" stroke-width="3"/>')
  return out


def svg(report: dict) -> str:
  """The headline metric per model: seeds, mean and 95% t-interval, as an SVG document."""
  lo, hi = _y_range(report)
  # at least wide enough for the title
  width, height = max(2 * _PAD + _W * len(report["models"]), 480), _H + 2 * _PAD
  y = lambda v: _PAD + _H * (hi - v) / (hi - lo)  # noqa: E731
  body = _svg_axis(lo, hi, y, width)
  for i, model in enumerate(report["models"]):
    body += _svg_model(i, model, report["summary"][model][report["headline"]], y)
  title = (f"test {report['headline']}: seeds (grey), mean and 95% t-interval (red), "
           f"{len(report['runs'])} runs")
  return "\n".join([
      f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
      'font-family="sans-serif" font-size="11">',
      f'<text x="{_PAD}" y="20">{html.escape(title)}</text>', *body, "</svg>", ""])


# --------------------------------------------------------------------------- outputs
def write_outputs(report: dict, prefix: str) -> list[str]:
  """PREFIX.json, PREFIX.md and (with a headline metric, not in group mode) PREFIX.svg; the
  paths written."""
  base = epath.Path(prefix)
  base.parent.mkdir(parents=True, exist_ok=True)
  paths = [base.parent / f"{base.name}.json", base.parent / f"{base.name}.md"]
  grouped = "groups" in report
  metric_writers.write_json_atomic(paths[0], report)
  metric_writers.write_text_atomic(paths[1], group_markdown(report) if grouped
                                   else markdown(report))
  if not grouped and report["headline"]:
    paths.append(base.parent / f"{base.name}.svg")
    metric_writers.write_text_atomic(paths[2], svg(report))
  return [str(p) for p in paths]


def run(workdirs: Sequence[str], pairs: Sequence[str] = (), out: str = "",
        metrics: Sequence[str] = (), groups: str = "") -> int:
  """Prints the Markdown report (and writes the --out files); the exit code. `groups` is the
  --groups text (group mode, instead of `workdirs`)."""
  if workdirs and groups:
    print("report: --workdirs and --groups are mutually exclusive", file=sys.stderr)
    return 2
  if not workdirs and not groups:
    print("report: --workdirs is required (comma-separated), or --groups="
          "'LABEL=W1,W2,...;LABEL2=...'", file=sys.stderr)
    return 2
  try:
    if groups:
      report = make_group_report(parse_groups(groups), pairs, metrics)
    else:
      report = make_report(workdirs, pairs, metrics)
  except ReportError as e:
    print(f"report: {e}", file=sys.stderr)
    return 2
  print(group_markdown(report) if groups else markdown(report), end="", flush=True)
  if out:
    try:
      written = write_outputs(report, out)
    except metric_writers.OutputPathError as e:
      print(f"report: {e}", file=sys.stderr)
      return 2
    except OSError as e:  # OutputWriteError, or the folder cannot be made
      print(f"report: {e}", file=sys.stderr)
      return 1
    for path in written:
      print(f"wrote {path}", file=sys.stderr)
  return 0


def _is_absl_flag(arg: str) -> bool:
  """An argument app.run has already parsed into the global FLAGS (e.g. --verbosity=1)."""
  name = arg.lstrip("-").split("=")[0]
  return arg.startswith("-") and (name in flags.FLAGS or name.removeprefix("no") in flags.FLAGS)


def main(argv: Sequence[str]) -> int:
  """Parses this module's flags from argv (program name first) and runs; the exit code."""
  if _FLAGS.is_parsed():  # called in-process more than once: no value left from before
    _FLAGS.unparse_flags()
  try:
    rest = _FLAGS(list(argv), known_only=True)
  except flags.Error as e:
    print(f"report: {e}", file=sys.stderr)
    return 2
  stray = [a for a in rest[1:] if not _is_absl_flag(a)]
  if stray:
    print(f"report: unexpected arguments: {' '.join(stray)}", file=sys.stderr)
    return 2
  return run(_WORKDIRS.value or [], _PAIRS.value or [], _OUT.value, _METRICS.value or [],
             _GROUPS.value)


if __name__ == "__main__":
  # Into the global FLAGS too, so that --help lists them; main() parses them itself.
  flags.FLAGS.append_flag_values(_FLAGS)
  for _name in _FLAGS:
    flags.declare_key_flag(_name)
  app.run(lambda _: sys.exit(main(sys.argv)))
