"""Results generated from a run's metrics: the summary, the page, and claims compared across runs."""

from __future__ import annotations

import json

import pytest

from cxrlib import results, runs, stages
from cxrlib.__main__ import main


def _comparison(difference, low, high):
    return {"task": "normal_vs_covid", "arch": "small_cnn", "imbalance": "1:20", "metric": "sensitivity",
            "baseline": "real", "treatment": "real_gnc_gpc", "difference": difference, "difference_low": low,
            "difference_high": high, "baseline_per_seed": [0.1, 0.2], "treatment_per_seed": [0.3, 0.4],
            "interval": "seeds then patients"}


def _make_run(root, name, difference, low, high, dice=0.97):
    run_dir = root / name
    runs.write_json(stages.stage_dir(run_dir, "02") / "metrics.json", {"dice_mean": dice, "dice_ci95": [0.96, 0.98]})
    runs.write_json(stages.stage_dir(run_dir, "04") / "metrics.json",
                    {"comparisons": {"real_gnc_gpc": [_comparison(difference, low, high)]}, "seed_mean_summary": []})
    runs.write_json(stages.stage_dir(run_dir, "04") / "params.json", {"params": {"PROFILE": "default"},
                                                                      "torch_threads": 1})
    runs.write_json(run_dir / "pipeline.json", {"dataset": "phantom", "profile": "default", "seed": 0,
                                                "cxrlib_version": "9.9", "cpu": {"model": "test CPU", "cores": 2}})
    return run_dir


def test_summary_and_page_come_from_the_metrics(tmp_path):
    run_dir = _make_run(tmp_path, "a", 0.12, 0.04, 0.20, dice=0.9713)
    page = results.write_results(run_dir)
    text = page.read_text()
    assert "0.971 (0.960 to 0.980)" in text and "+0.120 (+0.040 to +0.200)" in text and "**higher**" in text
    assert "test CPU" in text and "profile `default`" in text
    summary = json.loads((run_dir / results.SUMMARY).read_text())
    assert summary["stages"][1]["claims"][0]["verdict"] == "higher"
    # the page is a function of the summary alone
    assert results.render_markdown(summary) == text


def test_an_interval_across_zero_is_no_difference(tmp_path):
    summary = results.summarize_run(_make_run(tmp_path, "b", 0.05, -0.02, 0.12))
    assert summary["stages"][1]["claims"][0]["verdict"] == "no difference shown"


def test_compare_marks_claims_that_flip_between_runs(tmp_path):
    first = _make_run(tmp_path, "first", 0.12, 0.04, 0.20)
    same = _make_run(tmp_path, "same", 0.10, 0.01, 0.19)
    flipped = _make_run(tmp_path, "flipped", -0.03, -0.13, 0.08)
    comparison = results.compare_runs(first, same)
    assert [row["holds_in_all"] for row in comparison["claims"]] == [True]
    comparison = results.compare_runs(first, same, flipped)
    assert [row["holds_in_all"] for row in comparison["claims"]] == [False]
    text = results.render_comparison(comparison)
    assert "[DIFFERS]" in text and "0 of 1 claims" in text
    page = results.render_page(first, [same, flipped], notes={"flipped": "2 threads"})
    assert "| **no** |" in page and "2 threads" in page


def test_cli_results_and_compare(tmp_path, capsys):
    first = _make_run(tmp_path, "first", 0.12, 0.04, 0.20)
    second = _make_run(tmp_path, "second", 0.10, 0.01, 0.19)
    assert main(["compare", str(first), str(second)]) == 0
    assert "1 of 1 claims have the same verdict" in capsys.readouterr().out
    out = tmp_path / "page.md"
    assert main(["results", str(first), "--rerun", str(second), "--out", str(out)]) == 0
    assert "Do the claims hold" in out.read_text()
    assert main(["compare", str(first), str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_docs_results_page_is_generated_from_its_committed_summaries():
    """docs/results.md is the page of a named run: regenerating it from docs/results/*.json changes nothing."""
    from cxrlib import config

    folder = config.PROJECT_ROOT / "docs" / "results"
    manifest_path = folder / "page.json"
    if not manifest_path.is_file():
        pytest.skip("docs/results/page.json (the named runs behind docs/results.md) is not committed")
    page = json.loads(manifest_path.read_text())
    text = results.render_page(folder / page["main"], [folder / name for name in page.get("reruns", [])],
                               notes=page.get("notes"))
    assert text == (config.PROJECT_ROOT / "docs" / "results.md").read_text(), \
        "docs/results.md differs from its summaries: regenerate it with the command in docs/results/page.json"


def _external_summary() -> dict:
    def value(estimate, low, high):
        return {"estimate": estimate, "low": low, "high": high}

    base = {"task": "normal_vs_covid", "arch": "small_cnn", "condition": "real", "imbalance": "1:20"}
    internal = {**base, "evaluation_set": "internal", "auc": value(0.97, 0.93, 1.0),
                "floor_auc": value(0.99, 0.98, 1.0), "versus_floor": "not shown to beat image statistics"}
    held_out = {**base, "evaluation_set": "heldout_site", "auc": value(0.80, 0.64, 0.95),
                "floor_auc": value(0.57, 0.45, 0.69), "versus_floor": "above the image-statistics floor",
                "difference": {"estimate": 0.17, "low": 0.02, "high": 0.33, "verdict": "drops externally"}}
    return {"run": "demo", "stages": [{"stage": "04_classifiers", "external": [internal, held_out]}]}


def test_readme_table_is_rewritten_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    start, end = results.README_MARKERS
    readme.write_text(f"# title\n\n{start}\nold table\n{end}\n\nafter\n")
    assert results.update_readme(readme, _external_summary()) is True
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title") and text.endswith("after\n")
    row = [line for line in text.splitlines() if "heldout_site" in line][0]
    assert "0.97 (0.93 to 1.00)" in row and "0.80 (0.64 to 0.95)" in row
    assert "+0.17 (+0.02 to +0.33) **drops externally**" in row and "0.99 / 0.57" in row
    assert results.update_readme(readme, _external_summary()) is False  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="README.md: needs one line"):
        results.update_readme(readme, _external_summary())
    readme.write_text(f"{start}\n{end}\n")
    with pytest.raises(ValueError, match="no external cohort"):
        results.update_readme(readme, {"run": "plain", "stages": []})


def test_readme_external_table_comes_from_the_committed_results():
    """README.md's held-out-site table is the one the committed main run's summary renders."""
    from cxrlib import config

    folder = config.PROJECT_ROOT / "docs" / "results"
    page = json.loads((folder / "page.json").read_text())
    table = results.render_external_brief(results._load_summary(folder / page["main"]))
    readme = (config.PROJECT_ROOT / "README.md").read_text()
    start, end = results.README_MARKERS
    assert table, "the main run behind docs/results.md has no external cohort"
    assert readme[readme.index(start) + len(start):readme.index(end)] == "\n" + table, \
        "README.md's external table differs from docs/results: regenerate it with --readme README.md"


def test_single_run_pages_are_generated_from_their_committed_summaries():
    """docs/results/<page>.md of single runs (e.g. the real-data designs) render from their summaries."""
    from cxrlib import config

    folder = config.PROJECT_ROOT / "docs" / "results"
    pages = json.loads((folder / "page.json").read_text()).get("single_run_pages", {})
    for page, source in pages.items():
        assert (folder / page).read_text() == results.render_markdown(results._load_summary(folder / source)), \
            f"docs/results/{page} differs from {source}: regenerate it with the command in docs/results/page.json"
