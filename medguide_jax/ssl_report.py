r"""The SSL claims over several seeds: SSL init vs random init, convergence, robustness.

  python -m medguide_jax.ssl_report --workdirs=/tmp/ft_s0,/tmp/ft_s1,/tmp/ft_s2 \
      [--target_fraction=0.95] [--out=/tmp/ssl_report.json]

Each workdir is a finished configs/ssl_finetune.py run (one seed). Printed (and written as
JSON):

* test balanced accuracy / AUC per stage: mean, sd and a 95% t-interval over seeds
  (per-seed bootstrap CIs are in each results.json);
* convergence (Ghesu et al.: "up to 85% fewer steps"): for every SSL-initialised stage
  (finetune<suffix>, hybrid<suffix>) and its random-init twin scratch<suffix> (suffix '' or
  '_<labelled %>'), per seed, the target is `target_fraction` x the best validation
  balanced accuracy the twin reaches; steps_to_target is the first evaluated step at which
  a stage's validation metric reaches it (none if never), and the saving is
  1 - steps(stage) / steps(twin);
* robustness: test balanced accuracy under each perturbation, and its drop from clean.
"""
from __future__ import annotations

import json
import math
import sys

from absl import app, flags
from etils import epath

from medguide_jax import metric_writers
from medguide_jax import report as report_lib

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Finished ssl_finetune workdirs (one per seed).")
_TARGET = flags.DEFINE_float("target_fraction", 0.95, "Target = this x scratch's best val metric.")
_METRIC = flags.DEFINE_string("metric", "balanced_accuracy", "Validation metric to track.")
_OUT = flags.DEFINE_string("out", "", "Write the report here as JSON.")

def summarise(values: list[float]) -> dict:
  """report_lib.summarise (mean, sd, 95% t-interval over seeds; nan dropped) with the values."""
  kept = [float(x) for x in values if x is not None and math.isfinite(x)]
  return {**report_lib.summarise(kept), "values": kept}


def eval_curve(stage_dir: epath.Path, metric: str) -> list[tuple[int, float]]:
  """(step, validation metric) pairs from a stage's metrics.jsonl."""
  key = f"eval/validation/{metric}"
  path = stage_dir / "metrics.jsonl"
  if not path.exists():
    return []
  curve = []
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if key in row:
      curve.append((int(row["step"]), float(row[key])))
  return curve


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
  """First evaluated step whose metric is >= target (None if it never gets there)."""
  for step, value in curve:
    if value >= target:
      return step
  return None


def _twins(stages) -> list[tuple[str, str]]:
  """(SSL-initialised stage, its scratch twin) for every 'scratch<suffix>' stage (suffix ''
  or '_<fraction>'): 'finetune<suffix>' and 'hybrid<suffix>' where they exist."""
  out = []
  for name in sorted(stages):
    if name.startswith("scratch"):
      suffix = name[len("scratch"):]
      out += [(kind + suffix, name) for kind in ("finetune", "hybrid")
              if kind + suffix in stages]
  return out


def seed_report(workdir: epath.Path, target_fraction: float, metric: str) -> dict:
  results = metric_writers.read_json(workdir / "results.json")
  out = {"test": {}, "robust": {}, "convergence": {}}
  for name, stage in results["stages"].items():
    m = stage["metrics"]
    if f"test/{metric}" not in m:
      continue
    out["test"][name] = {k: m.get(f"test/{k}") for k in (metric, "auc", "accuracy")}
    out["robust"][name] = {k.split("/")[2]: v for k, v in m.items()
                           if k.startswith("test/robust/") and k.endswith(f"/{metric}")}
  for ssl_stage, scratch_stage in _twins(results["stages"]):
    scratch = eval_curve(workdir / scratch_stage, metric)
    if not scratch:
      continue
    target = target_fraction * max(v for _, v in scratch)
    sc = steps_to_target(scratch, target)
    curve = eval_curve(workdir / ssl_stage, metric)
    ft = steps_to_target(curve, target) if curve else None
    out["convergence"][ssl_stage] = {
        "scratch": scratch_stage, "target": target, "steps": ft, "scratch_steps": sc,
        "saving": (1.0 - ft / sc) if ft is not None and sc else None}
  return out


def report(workdirs: list[str], target_fraction: float = 0.95,
           metric: str = "balanced_accuracy") -> dict:
  seeds = [seed_report(epath.Path(w), target_fraction, metric) for w in workdirs]
  stages = sorted({s for r in seeds for s in r["test"]})
  summary = {"workdirs": workdirs, "metric": metric, "target_fraction": target_fraction,
             "test": {}, "robust": {}, "convergence": {}}
  for s in stages:
    summary["test"][s] = {k: summarise([r["test"].get(s, {}).get(k) for r in seeds])
                          for k in (metric, "auc")}
    kinds = sorted({k for r in seeds for k in r["robust"].get(s, {})})
    summary["robust"][s] = {k: summarise([r["robust"].get(s, {}).get(k) for r in seeds])
                            for k in kinds}
  for s in sorted({s for r in seeds for s in r["convergence"]}):
    rows = [r["convergence"][s] for r in seeds if s in r["convergence"]]
    entry = {"scratch": rows[0]["scratch"]}
    for key in ("steps", "scratch_steps", "saving"):
      entry[key] = summarise([float(x[key]) for x in rows if x[key] is not None])
      entry[key]["never_reached"] = sum(1 for x in rows if x[key] is None)
    summary["convergence"][s] = entry
  return summary


def _fmt(s: dict) -> str:
  if not s.get("n"):
    return "-"
  text = f"{s['mean']:.3f}"
  if s.get("ci95"):
    text += f" ± {s['sd']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
  return text


def markdown(summary: dict) -> str:
  m = summary["metric"]
  lines = [f"test {m} and AUC over {len(summary['workdirs'])} seeds (mean ± sd [95% CI])", "",
           f"| stage | {m} | auc |", "|---|---|---|"]
  for s, v in summary["test"].items():
    lines.append(f"| {s} | {_fmt(v[m])} | {_fmt(v['auc'])} |")
  lines += ["", f"steps to reach {summary['target_fraction']:.2f} x the scratch twin's best "
            f"validation {m} (never: seeds that did not reach it)", "",
            "| stage | steps | scratch twin | its steps | saving 1 - steps/scratch's |",
            "|---|---|---|---|---|"]
  for s, c in summary["convergence"].items():
    never = lambda x: f" (never: {x['never_reached']})" if x["never_reached"] else ""
    lines.append(f"| {s} | {_fmt(c['steps'])}{never(c['steps'])} | {c['scratch']} | "
                 f"{_fmt(c['scratch_steps'])}{never(c['scratch_steps'])} | "
                 f"{_fmt(c['saving'])} |")
  kinds = sorted({k for v in summary["robust"].values() for k in v})
  if kinds:
    lines += ["", f"test {m} under perturbation", "",
              "| stage | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for s, v in summary["robust"].items():
      lines.append(f"| {s} | " + " | ".join(_fmt(v.get(k, {})) for k in kinds) + " |")
  return "\n".join(lines)


def main(argv) -> int:
  del argv
  summary = report(_WORKDIRS.value, _TARGET.value, _METRIC.value)
  print(markdown(summary))
  if _OUT.value:
    try:
      metric_writers.write_json_atomic(epath.Path(_OUT.value), summary)
    except metric_writers.OutputPathError as e:
      print(f"ssl_report: {e}", file=sys.stderr)
      return 2
    except OSError as e:
      print(f"ssl_report: {e}", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("workdirs")
  app.run(lambda argv: sys.exit(main(argv)))
