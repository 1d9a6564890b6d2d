"""Results generated from a run, never typed: ``RUN_DIR/results.md`` and run-to-run comparison.

:func:`summarize_run` reads every stage's ``metrics.json`` in a run folder and keeps the
headline numbers and claims (each with its interval and how the interval was formed);
:func:`render_markdown` turns that summary into the results page; :func:`compare_runs`
puts two runs side by side and says, for every claim, whether it holds in both. The
pipeline writes ``RUN_DIR/results.md`` and ``RUN_DIR/summary.json`` after its last
notebook; ``docs/results.md`` is the page of a named run, regenerated from its committed
summary by ``python -m cxrlib results --summary docs/results/summary.json``.

Claims are worded by :mod:`cxrlib.evaluate.claims`: "higher" / "lower" (or "helps" /
"hurts") only when the 95% interval of the difference excludes zero, otherwise
"no difference shown".
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrlib import config, runs
from cxrlib.evaluate.claims import Claim, difference_claim
from cxrlib.evaluate.external import drop_claim
from cxrlib.stages import METRICS, STAGES, output_path

SUMMARY = "summary.json"
RESULTS = "results.md"


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _interval(value: Any) -> tuple[float, float]:
    if isinstance(value, Sequence) and len(value) == 2:
        return _num(value[0]), _num(value[1])
    return float("nan"), float("nan")


def git_commit(mark_changes: bool = False) -> str:
    """The checkout's commit (short hash), ``"unknown"`` outside a git checkout; with
    ``mark_changes``, ``"+changes"`` appended when tracked files differ from that commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=config.PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10, check=False)
        commit = out.stdout.strip() or "unknown"
        if mark_changes and commit != "unknown":
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=config.PROJECT_ROOT,
                                    capture_output=True, text=True, timeout=10, check=False)
            commit += "+changes" if status.stdout.strip() else ""
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- collecting


def _metric(name: str, estimate: Any, low: Any = None, high: Any = None, **info: Any) -> dict[str, Any]:
    return {"name": name, "estimate": _num(estimate), "low": _num(low), "high": _num(high), **info}


def _claim(claim: Claim, **info: Any) -> dict[str, Any]:
    return {"subject": claim.subject, "estimate": claim.estimate, "low": claim.low, "high": claim.high,
            "up": claim.up, "down": claim.down, "verdict": claim.verdict, **info}


def _segmentation(metrics: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    low, high = _interval(metrics.get("dice_ci95"))
    return [_metric("segmentation Dice, both lungs (test)", metrics.get("dice_mean"), low, high)], []


def _cyclegan(metrics: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    rows = []
    for generator in ("G_NC", "G_PC"):
        report = metrics.get(generator) or {}
        if not report:
            continue
        rows.append(_metric(f"{generator}: oracle calls the translated images COVID-19",
                            report.get("oracle_covid_rate_after"), *_interval(report.get("oracle_covid_rate_after_ci95"))))
        rows.append(_metric(f"{generator}: real vs synthetic detectability AUC", report.get("detectability_auc"),
                            *_interval(report.get("detectability_auc_ci95"))))
        if report.get("oracle_covid_rate_after_blurred") is not None:
            rows.append(_metric(f"{generator}: oracle calls the translated images COVID-19 once the period-two "
                                "texture is blurred away", report.get("oracle_covid_rate_after_blurred"),
                                *_interval(report.get("oracle_covid_rate_after_blurred_ci95"))))
    first = next((metrics.get(g) for g in ("G_NC", "G_PC") if (metrics.get(g) or {}).get("oracle_covid_rate_real")
                  is not None), None)
    if first:
        rows.append(_metric("real COVID-19 test images the oracle calls COVID-19", first.get("oracle_covid_rate_real"),
                            *_interval(first.get("oracle_covid_rate_real_ci95"))))
        rows.append(_metric("the same images once the period-two texture is blurred away",
                            first.get("oracle_covid_rate_real_blurred"),
                            *_interval(first.get("oracle_covid_rate_real_blurred_ci95"))))
    return rows, []


def _classifiers(metrics: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    claims = []
    for treatment, records in (metrics.get("comparisons") or {}).items():
        for row in records:
            subject = (f"{row['task']} {row['arch']} {row['imbalance']}, {row['metric']}: "
                       f"{treatment} minus {row['baseline']}")
            claim = difference_claim(subject, row.get("difference"), row.get("difference_low"),
                                     row.get("difference_high"), up="higher", down="lower")
            claims.append(_claim(claim, per_seed={"baseline": row.get("baseline_per_seed"),
                                                  "treatment": row.get("treatment_per_seed")},
                                 interval=row.get("interval", metrics.get("headline", {}).get("ci_method", ""))))
    rows = []
    for row in metrics.get("seed_mean_summary") or []:
        if row.get("metric") in ("sensitivity", "auc"):
            rows.append(_metric(f"{row['task']} {row['arch']} {row['imbalance']} {row['condition']}: {row['metric']}",
                                row.get("estimate"), row.get("low"), row.get("high")))
    floor = metrics.get("shortcut_floor") or {}
    for name, value in floor.items() if isinstance(floor, Mapping) else []:
        if isinstance(value, Mapping) and "auc" in value:
            rows.append(_metric(f"shortcut floor ({name}): image-statistics AUC", value.get("auc"),
                                value.get("auc_low"), value.get("auc_high")))
    return rows, claims


def _analysis(metrics: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    saliency = metrics.get("saliency") or {}
    rows, claims = [], []
    for method, values in (saliency.get("methods") or {}).items():
        for measure in ("pointing_game", "lesion_energy"):
            value = (values or {}).get(measure) or {}
            if value:
                rows.append(_metric(f"{method}: {measure.replace('_', ' ')}", value.get("estimate"), value.get("low"),
                                    value.get("high")))
    for row in saliency.get("versus_random") or []:
        subject = f"{row['method']} minus random map, {row['measure'].replace('_', ' ')}"
        claims.append(_claim(difference_claim(subject, row.get("difference"), row.get("low"), row.get("high"),
                                              up="better than a random map", down="worse than a random map"),
                             interval=saliency.get("ci_method", "")))
    return rows, claims


def _diffusion(metrics: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    rows = []
    for name, report in (metrics.get("generators") or {}).items():
        rows.append(_metric(f"{name}: oracle COVID-19 rate of its COVID-19 images", report.get("oracle_covid_rate"),
                            *_interval(report.get("oracle_covid_rate_ci95"))))
        rows.append(_metric(f"{name}: real vs synthetic detectability AUC", report.get("detectability_auc"),
                            *_interval(report.get("detectability_auc_ci95"))))
    if "reader_scripted_accuracy" in metrics:
        rows.append(_metric("scripted reader accuracy (real vs synthetic)", metrics.get("reader_scripted_accuracy"),
                            *_interval(metrics.get("reader_scripted_accuracy_ci95"))))
    return rows, []


def _external(metrics: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """Notebook 04's internal / external / floor table (``metrics["external"]``) as rows of plain
    numbers, and the internal-minus-external differences as claims (AUC; sensitivity where the
    cohort has positives only, so no AUC)."""
    external = metrics.get("external") or {}
    if not isinstance(external, Mapping) or not external.get("table"):
        return [], []
    keys = ("task", "arch", "condition", "imbalance")
    drops: dict[tuple, dict] = {}
    for row in external.get("drops") or []:
        if row.get("metric") in ("auc", "sensitivity") and not math.isnan(_num(row.get("difference"))):
            key = (*(row.get(k) for k in keys), row.get("external"))
            if row["metric"] == "auc" or key not in drops:
                drops[key] = row
    rows = []
    for row in external["table"]:
        out = {k: row.get(k) for k in (*keys, "evaluation_set", "versus_floor")}
        for metric in ("auc", "sensitivity", "specificity", "floor_auc", "floor_sensitivity"):
            if metric in row:  # floor_sensitivity: runs since it was added
                out[metric] = {"estimate": _num(row.get(metric)), "low": _num(row.get(f"{metric}_low")),
                               "high": _num(row.get(f"{metric}_high"))}
        out["n"], out["n_patients"] = row.get("n"), row.get("n_patients")
        drop = drops.get((*(row.get(k) for k in keys), row.get("evaluation_set")))
        if drop is not None:
            out["difference"] = _claim(drop_claim(drop), metric=drop["metric"], interval=external.get("interval", ""))
        rows.append(out)
    claims = [row["difference"] for row in rows if "difference" in row]
    return rows, claims


_COLLECTORS = {"02": _segmentation, "03": _cyclegan, "04": _classifiers, "05": _analysis, "06": _diffusion}


def summarize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The headline numbers and claims of every stage that ran in ``run_dir`` (plain JSON data)."""
    run_dir = Path(run_dir)
    pipeline_json = run_dir / "pipeline.json"
    context = runs.read_json(pipeline_json) if pipeline_json.is_file() else {}
    stages = []
    for stage in STAGES:
        path = output_path(run_dir, stage, METRICS)
        if not path.is_file():
            continue
        metrics = runs.read_json(path)
        params_path = output_path(run_dir, stage, "params.json")
        params = runs.read_json(params_path) if params_path.is_file() else {}
        rows, claims = _COLLECTORS.get(stage.key, lambda m: ([], []))(metrics)
        entry = {"stage": stage.name, "title": stage.title, "metrics": rows, "claims": claims,
                 "profile": (params.get("params") or {}).get("PROFILE"), "threads": params.get("torch_threads")}
        external, drop_claims = _external(metrics)
        if external:  # notebook 04 with external cohorts: the held-out table and its drop claims
            entry["external"] = external
            entry["claims"] = [*claims, *drop_claims]
        stages.append(entry)
    return runs.to_plain({
        "run": run_dir.name,
        "dataset": context.get("dataset"),
        "profile": context.get("profile"),
        "seed": context.get("seed"),
        "commit": context.get("commit") or git_commit(),
        "cxrlib_version": context.get("cxrlib_version"),
        "machine": context.get("cpu") or config.cpu_description(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).date().isoformat(),
        "stages": stages,
    })


# ----------------------------------------------------------------------------- rendering


def _fmt(value: Any, digits: int = 3) -> str:
    value = _num(value)
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _fmt_interval(row: Mapping[str, Any], digits: int = 3, sign: bool = False) -> str:
    spec = f"+.{digits}f" if sign else f".{digits}f"
    values = [_num(row.get(k)) for k in ("estimate", "low", "high")]
    if math.isnan(values[0]):
        return "n/a"
    text = format(values[0], spec)
    if not any(math.isnan(v) for v in values[1:]):
        text += f" ({format(values[1], spec)} to {format(values[2], spec)})"
    return text


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The results page of one run (Markdown), every number and claim taken from ``summary``."""
    machine = summary.get("machine") or {}
    lines = [
        f"# Results of run `{summary.get('run')}`",
        "",
        "Generated from the run's `metrics.json` files by `cxrlib.results`; do not edit by hand.",
        "",
        f"- dataset `{summary.get('dataset')}`, profile `{summary.get('profile')}`, seed {summary.get('seed')}",
        f"- commit `{summary.get('commit')}`, cxrlib {summary.get('cxrlib_version')}, Python {summary.get('python')}, "
        f"generated {summary.get('date')}",
        f"- machine: {machine.get('model', '?')}, {machine.get('cores', '?')} cores, PyTorch CPU capability "
        f"{machine.get('torch_capability', '?')}",
        "",
        "Intervals are 95% intervals. A comparison is called a difference only when the interval of the "
        "difference excludes zero; otherwise it reads \"no difference shown\".",
    ]
    for stage in summary.get("stages", []):
        if not stage.get("metrics") and not stage.get("claims"):
            continue
        lines += ["", f"## {stage['stage']}: {stage['title']}", ""]
        if stage.get("claims"):
            lines += ["| comparison | difference (95% CI) | verdict |", "|---|---|---|"]
            lines += [f"| {c['subject']} | {_fmt_interval(c, sign=True)} | **{c['verdict']}** |"
                      for c in stage["claims"]]
            methods = sorted({c.get("interval") for c in stage["claims"] if c.get("interval")})
            lines += ["", *(f"Interval: {m}" for m in methods)] if methods else []
            lines.append("")
        if stage.get("metrics"):
            lines += ["| measure | estimate (95% CI) |", "|---|---|"]
            lines += [f"| {m['name']} | {_fmt_interval(m)} |" for m in stage["metrics"]]
        if stage.get("external"):
            lines += _external_lines(stage["external"])
    return "\n".join(lines) + "\n"


def _external_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The internal / external / floor table of notebook 04 (rows of :func:`_external`)."""
    with_sensitivity = any("floor_sensitivity" in row for row in rows)
    lines = ["", "### Internal test split vs external cohorts vs the shortcut floor", "",
             "Seed-means at each model's validation threshold; the floor is a logistic regression on global image "
             "statistics trained on the same training split. A positives-only cohort has a sensitivity only"
             + (" (there the floor is read on sensitivity)." if with_sensitivity else "."), "",
             "| task | condition | evaluation set | AUC (95% CI) | sensitivity (95% CI) | specificity (95% CI) | "
             "floor AUC (95% CI) | " + ("floor sensitivity (95% CI) | " if with_sensitivity else "")
             + "versus floor | internal minus external | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_sensitivity else "")]
    for row in rows:
        drop = row.get("difference") or {}
        difference = f"{drop.get('metric')}: {_fmt_interval(drop, sign=True)}" if drop else ""
        floor_sensitivity = f"{_fmt_interval(row['floor_sensitivity'])} | " if "floor_sensitivity" in row else (
            "n/a | " if with_sensitivity else "")
        lines.append(f"| {row.get('task')} | {row.get('condition')} | {row.get('evaluation_set')} | "
                     f"{_fmt_interval(row['auc'])} | {_fmt_interval(row['sensitivity'])} | "
                     f"{_fmt_interval(row['specificity'])} | {_fmt_interval(row['floor_auc'])} | {floor_sensitivity}"
                     f"{row.get('versus_floor') or ''} | {difference} | "
                     f"{('**' + drop['verdict'] + '**') if drop else ''} |")
    return lines


#: The lines between which README.md holds the held-out-site table (:func:`update_readme`).
README_MARKERS: tuple[str, str] = (
    "<!-- external-table: generated from docs/results/ by `python -m cxrlib results ... --readme README.md` -->",
    "<!-- end of external-table -->",
)


def render_external_brief(summary: Mapping[str, Any]) -> str:
    """A short internal vs external vs floor table of a run (notebook 04's external rows): one
    row per task, condition and external cohort, every number from ``summary``. Empty when
    the run had no external cohort."""
    rows = [row for stage in summary.get("stages") or [] for row in stage.get("external") or []]
    internal = {(r.get("task"), r.get("arch"), r.get("condition"), r.get("imbalance")): r
                for r in rows if r.get("evaluation_set") == "internal"}
    lines = ["| task | condition | external cohort | AUC internal | AUC external | internal minus external | "
             "floor AUC internal / external | external versus floor |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("evaluation_set") == "internal":
            continue
        inside = internal.get((row.get("task"), row.get("arch"), row.get("condition"), row.get("imbalance")), {})
        drop = row.get("difference") or {}
        difference = f"{_fmt_interval(drop, digits=2, sign=True)} **{drop['verdict']}**" if drop else "n/a"
        floor_in = _fmt_interval({"estimate": inside["floor_auc"]["estimate"]}, digits=2) if inside else "n/a"
        lines.append(f"| {row.get('task')} | {row.get('condition')} | {row.get('evaluation_set')} | "
                     f"{_fmt_interval(inside['auc'], digits=2) if inside else 'n/a'} | "
                     f"{_fmt_interval(row['auc'], digits=2)} | {difference} | "
                     f"{floor_in} / {_fmt_interval({'estimate': row['floor_auc']['estimate']}, digits=2)} | "
                     f"{row.get('versus_floor') or ''} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def update_readme(readme: str | os.PathLike, summary: str | os.PathLike | Mapping[str, Any]) -> bool:
    """Replace the text between :data:`README_MARKERS` in ``readme`` with
    :func:`render_external_brief` of ``summary`` (written atomically); True if it changed.
    Raises ``ValueError`` when the markers are missing or the run has no external rows."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    start, end = README_MARKERS
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{path}: needs one line {start!r} and, after it, one line {end!r}")
    table = render_external_brief(_load_summary(summary))
    if not table:
        raise ValueError(f"{path}: the run {_load_summary(summary).get('run')!r} has no external cohort to show")
    new = text[:text.index(start) + len(start)] + "\n" + table + text[text.index(end):]
    if new != text:
        runs.atomic_write(path, lambda stream: stream.write(new), mode="w")
    return new != text


def write_results(run_dir: str | os.PathLike) -> Path:
    """Write ``RUN_DIR/summary.json`` and ``RUN_DIR/results.md``; return the Markdown path."""
    run_dir = Path(run_dir)
    summary = summarize_run(run_dir)
    runs.write_json(run_dir / SUMMARY, summary)
    text = render_markdown(summary)
    runs.atomic_write(run_dir / RESULTS, lambda stream: stream.write(text), mode="w")
    return run_dir / RESULTS


# ----------------------------------------------------------------------------- comparing runs


def _load_summary(run: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(run, Mapping):
        return dict(run)
    path = Path(run)
    if path.is_dir():
        return runs.read_json(path / SUMMARY) if (path / SUMMARY).is_file() else summarize_run(path)
    return runs.read_json(path)


def compare_runs(*runs_to_compare: str | os.PathLike | Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every headline metric and claim of several runs side by side.

    Returns ``{"claims": [...], "metrics": [...]}``; each claim row has the subject, every
    run's estimate, interval and verdict, and ``holds_in_all``: the same verdict in every run
    (a claim in all, or "no difference shown" in all).
    """
    summaries = [_load_summary(run) for run in runs_to_compare]
    labels = [s.get("run") or f"run{i}" for i, s in enumerate(summaries)]
    if len(set(labels)) < len(labels):
        labels = [f"{label}#{i}" for i, label in enumerate(labels)]
    claim_rows: dict[str, dict[str, Any]] = {}
    metric_rows: dict[str, dict[str, Any]] = {}
    for label, summary in zip(labels, summaries, strict=True):
        for stage in summary.get("stages", []):
            for claim in stage.get("claims", []):
                row = claim_rows.setdefault(f"{stage['stage']}: {claim['subject']}",
                                            {"stage": stage["stage"], "subject": claim["subject"]})
                row[label] = {k: claim[k] for k in ("estimate", "low", "high", "verdict")}
            for metric in stage.get("metrics", []):
                row = metric_rows.setdefault(f"{stage['stage']}: {metric['name']}",
                                             {"stage": stage["stage"], "name": metric["name"]})
                row[label] = {k: metric[k] for k in ("estimate", "low", "high")}
    for row in claim_rows.values():
        verdicts = {row[label]["verdict"] for label in labels if label in row}
        row["holds_in_all"] = len(verdicts) == 1 and all(label in row for label in labels)
    return {"labels": labels, "claims": list(claim_rows.values()), "metrics": list(metric_rows.values())}


def render_comparison(comparison: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`compare_runs` (claims first, then metrics)."""
    labels = comparison["labels"]
    lines = ["claims (difference, 95% CI, verdict) per run; 'same' = the same verdict in every run", ""]
    for row in comparison["claims"]:
        cells = [f"{_fmt_interval(row[label], sign=True)} {row[label]['verdict']}" if label in row else "missing"
                 for label in labels]
        lines.append(f"[{'same' if row['holds_in_all'] else 'DIFFERS'}] {row['subject']}")
        lines += [f"    {label}: {cell}" for label, cell in zip(labels, cells, strict=True)]
    lines += ["", "metrics (estimate, 95% CI) per run", ""]
    for row in comparison["metrics"]:
        cells = [_fmt_interval(row[label]) if label in row else "missing" for label in labels]
        lines.append(f"{row['name']}: " + " | ".join(f"{label}: {cell}" for label, cell in zip(labels, cells,
                                                                                               strict=True)))
    n_same = sum(row["holds_in_all"] for row in comparison["claims"])
    lines += ["", f"{n_same} of {len(comparison['claims'])} claims have the same verdict in all runs"]
    return "\n".join(lines) + "\n"


def render_comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """:func:`compare_runs` as a Markdown table of claims: each run's difference, interval and verdict."""
    labels = comparison["labels"]
    lines = ["| comparison | " + " | ".join(f"`{label}`" for label in labels) + " | same verdict in all |",
             "|---|" + "---|" * len(labels) + "---|"]
    for row in comparison["claims"]:
        cells = [f"{_fmt_interval(row[label], sign=True)} {row[label]['verdict']}" if label in row else "missing"
                 for label in labels]
        lines.append(f"| {row['subject']} | " + " | ".join(cells) + f" | {'yes' if row['holds_in_all'] else '**no**'} |")
    n_same = sum(row["holds_in_all"] for row in comparison["claims"])
    lines += ["", f"{n_same} of {len(comparison['claims'])} claims have the same verdict in every run."]
    return "\n".join(lines) + "\n"


def render_page(main: str | os.PathLike | Mapping[str, Any],
                reruns: Sequence[str | os.PathLike | Mapping[str, Any]] = (),
                notes: Mapping[str, str] | None = None) -> str:
    """The results page of a named run, and, given ``reruns``, whether its claims hold in them.

    ``main`` and ``reruns`` are run folders, ``summary.json`` files or loaded summaries;
    ``notes`` maps a run name to how it was run (load, threads), shown with the comparison.
    """
    summary = _load_summary(main)
    text = render_markdown(summary)
    if reruns:
        others = [_load_summary(run) for run in reruns]
        comparison = compare_runs(summary, *others)
        lines = ["", "## Do the claims hold when the run is repeated?", "",
                 "The same profile and seed, rerun on the same machine under other conditions. Each cell: the "
                 "difference, its 95% interval and the verdict worded from it.", ""]
        for other in [summary, *others]:
            note = (notes or {}).get(other.get("run", ""), "")
            machine = other.get("machine") or {}
            lines.append(f"- `{other.get('run')}`: commit `{other.get('commit')}`, {machine.get('model', '?')}"
                         + (f"; {note}" if note else ""))
        text += "\n".join(lines) + "\n\n" + render_comparison_markdown(comparison)
    return text
