r"""One experiment over several seeds: mean, sd and 95% t-interval per model and metric.

  python -m medguide_jax.report --workdirs=/tmp/ft_s0,/tmp/ft_s1,/tmp/ft_s2 \
      [--pairs=finetune:scratch,probe:probe_random] [--out=/tmp/ssl_report]

Each workdir is a finished run (train.py) of the same config with a different seed: its
results.json table gives the test metrics of each model (stage), its config.json the seed.
The generalisation of ssl_report.py to any experiment and any table metric.

Printed as Markdown:

* per model and table metric: mean ± sd [95% t-interval of the mean] (n runs). Runs of
  different experiments are accepted: models and metrics are the union, n is per cell;
* per seed, the headline metric (the first table column);
* with --pairs, paired differences a - b per metric, matched by workdir (so by seed): mean ±
  sd [95% t-interval] and how many seeds have a > b. A pair is `a:b`; `a-b` is accepted too,
  since stage names hold no '-'.

--out=PREFIX also writes PREFIX.json (everything, machine-readable), PREFIX.md and PREFIX.svg
(per model: the seeds' headline values, their mean and its 95% interval).

Exit code 2, with one line on stderr, for a workdir without results.json or a pair naming a
stage that is in no table; duplicate seeds across workdirs are warned about on stderr.
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
  rows, cis = {}, {}
  for row in table:
    rows[row["model"]] = {k: _number(v) for k, v in row.items()
                          if k != "model" and not k.endswith("_ci95") and _number(v) is not None}
    cis[row["model"]] = {k.removesuffix("_ci95"): v for k, v in row.items() if k.endswith("_ci95")}
  return {"workdir": str(workdir), "seed": seed, "table": rows, "ci95": cis}


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


def parse_pairs(pairs: Sequence[str], models: Sequence[str]) -> list[tuple[str, str]]:
  """`a:b` (or `a-b`) strings as (a, b); ReportError naming the valid stages otherwise."""
  out = []
  for text in pairs:
    parts = text.split(":") if ":" in text else text.split("-")
    if len(parts) != 2 or not all(parts):
      raise ReportError(f"bad pair {text!r}: expected a:b (a minus b)")
    unknown = [p for p in parts if p not in models]
    if unknown:
      raise ReportError(f"pair {text!r}: no stage {', '.join(map(repr, unknown))} in the "
                        f"tables; valid stages: {', '.join(models)}")
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
  """Headline value per model and run, in the order of --workdirs."""
  h, rows = report["headline"], []
  for model in report["models"]:
    by_dir = {e["workdir"]: e["value"] for e in report["summary"][model][h]["values"]}
    rows.append([model] + ["-" if by_dir.get(r["workdir"]) is None else
                           f"{by_dir[r['workdir']]:.3f}" for r in report["runs"]])
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
  """PREFIX.json, PREFIX.md and (with a headline metric) PREFIX.svg; the paths written."""
  base = epath.Path(prefix)
  base.parent.mkdir(parents=True, exist_ok=True)
  paths = [base.parent / f"{base.name}.json", base.parent / f"{base.name}.md"]
  metric_writers.write_json_atomic(paths[0], report)
  metric_writers.write_text_atomic(paths[1], markdown(report))
  if report["headline"]:
    paths.append(base.parent / f"{base.name}.svg")
    metric_writers.write_text_atomic(paths[2], svg(report))
  return [str(p) for p in paths]


def run(workdirs: Sequence[str], pairs: Sequence[str] = (), out: str = "",
        metrics: Sequence[str] = ()) -> int:
  """Prints the Markdown report (and writes the --out files); the exit code."""
  if not workdirs:
    print("report: --workdirs is required (comma-separated)", file=sys.stderr)
    return 2
  try:
    report = make_report(workdirs, pairs, metrics)
  except ReportError as e:
    print(f"report: {e}", file=sys.stderr)
    return 2
  print(markdown(report), end="", flush=True)
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
  return run(_WORKDIRS.value or [], _PAIRS.value or [], _OUT.value, _METRICS.value or [])


if __name__ == "__main__":
  # Into the global FLAGS too, so that --help lists them; main() parses them itself.
  flags.FLAGS.append_flag_values(_FLAGS)
  for _name in _FLAGS:
    flags.declare_key_flag(_name)
  app.run(lambda _: sys.exit(main(sys.argv)))
