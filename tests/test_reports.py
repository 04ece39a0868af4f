"""Notebook reports: every notebook runs under papermill on toy data; the CLI fails clearly on bad input.

    .venv/bin/python -m pytest tests/test_reports.py -x -q
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill as pm
import pytest

from dermaid.config import compose, to_plain
from dermaid.errors import DermaidError
from dermaid.reporting.runner import (
    FIGURES_PARAM, KERNEL_NAME, build_report, hydra_args, notebooks_dir, record_figures, report_names,
    resolve_kernel_name, stray_stderr,
)

NOTEBOOKS = sorted(p.name for p in notebooks_dir().glob("*.ipynb"))
FIGURE_TAG = re.compile(r'<img[^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{200,}')


def _report_files(folder: str | Path) -> tuple[str, dict]:
    folder = Path(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["key_figures.json", "report.html", "report.ipynb"]
    assert_reads_clean(folder / "report.ipynb")
    return (folder / "report.html").read_text(), json.loads((folder / "key_figures.json").read_text())


def _assert_sections(html: str, headings: list[str], min_figures: int) -> None:
    found = [re.sub(r"<[^>]+>", "", h).replace("¶", "").strip() for h in re.findall(r"<h2[^>]*>(.*?)</h2>", html)]
    for heading in headings:
        assert heading in found, f"missing section {heading!r}; found {found}"
    figures = len(FIGURE_TAG.findall(html))
    assert figures >= min_figures, f"{figures} embedded PNG figures, expected at least {min_figures}"
    assert "Traceback" not in html and "decision support" in html


def assert_reads_clean(executed: str | Path) -> None:
    """No stderr output (a red box in the HTML) in an executed report but the documented EXPECTED_STDERR."""
    stray = stray_stderr(executed)
    assert not stray, f"stray stderr in {executed} (fix it or document it in runner.EXPECTED_STDERR): {stray}"


def _no_partial_reports(reports_dir: Path) -> None:
    leftovers = [p.name for p in reports_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


# --------------------------------------------------------------------------- unit

def test_hydra_args_rewrites_the_shorthand():
    argv = ["eda", "data_root=data/x", "seed=3", "paths.reports_dir=/r", "data.root=/d", "out=/o", "--cfg", "job",
            "+hydra.x=1"]
    assert hydra_args(argv) == ["report=eda", "++params.data_root=data/x", "++params.seed=3", "paths.reports_dir=/r",
                                "data.root=/d", "out=/o", "--cfg", "job", "+hydra.x=1"]
    assert hydra_args(["--help"]) == ["--help"]
    with pytest.raises(DermaidError, match="unknown report 'summary'.*train-report"):
        hydra_args(["summary"])


def test_reports_take_the_keys_of_every_command():
    """`dermaid report eda data.root=...` (as for prepare and train) feeds the notebook's data_root; a bare
    notebook parameter (`data_root=`, `samples_per_class=`) still wins."""
    spec = to_plain(compose("report", hydra_args(["eda", "data.root=/data/isic", "data=ham10000"])))
    assert spec["report"]["params"]["data_root"] == "/data/isic" and spec["report"]["params"]["layout"] == "ham10000"
    plain = to_plain(compose("report", hydra_args(["eda", "data_root=/x", "samples_per_class=2"])))
    assert plain["params"] == {"data_root": "/x", "samples_per_class": 2}
    gallery = to_plain(compose("report", hydra_args(["saliency-gallery", "data.root=/d", "checkpoint=/c"])))
    assert gallery["report"]["params"]["data_root"] == "/d" and gallery["params"] == {"checkpoint": "/c"}
    assert {"eda", "saliency-gallery", "train-report", "tune-report", "compare-runs"} <= set(report_names())


def test_record_figures_merges_and_writes_strict_json(tmp_path):
    path = str(tmp_path / "figures.json")
    record_figures({"a": np.float64(0.5), "n": np.int64(3)}, path)
    record_figures({"ece": float("nan"), "per": {"MEL": np.float32(1.0)}}, path)
    text = Path(path).read_text()
    assert json.loads(text) == {"a": 0.5, "n": 3, "ece": None, "per": {"MEL": 1.0}}
    assert "NaN" not in text
    assert record_figures({"x": 1}, "") == {"x": 1}  # JupyterLab: nothing written


def test_stray_stderr_is_found_and_documented_warnings_pass(tmp_path, monkeypatch):
    """The check every executed report passes (_report_files): a red stderr box fails it unless documented."""
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    from dermaid.reporting import runner

    warning = "tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter and ipywidgets."
    cell = new_code_cell("import x", outputs=[new_output("stream", name="stdout", text="fine\n"),
                                               new_output("stream", name="stderr", text=warning)])
    path = tmp_path / "executed.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("1"), cell]), str(path))
    assert stray_stderr(path) == [f"cell 1: {warning}"]
    monkeypatch.setitem(runner.EXPECTED_STDERR, r"TqdmWarning: IProgress not found", "an example of a documented one")
    assert stray_stderr(path) == []


def test_kernel_runs_this_interpreter():
    from jupyter_client.kernelspec import KernelSpecManager

    name = resolve_kernel_name()
    spec = KernelSpecManager().get_kernel_spec(name)
    assert name in (KERNEL_NAME, "python3")
    assert spec.argv[0] in ("python", "python3") or Path(spec.argv[0]).parent == Path(sys.executable).parent


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebooks_are_stripped_and_parameterized(notebook):
    nb = nbformat.read(notebooks_dir() / notebook, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == KERNEL_NAME
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs must be stripped"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "import" in nb.cells[tagged[0] - 1].source  # the imports cell comes right before
    declared = pm.inspect_notebook(str(notebooks_dir() / notebook))
    lines = [l for l in nb.cells[tagged[0]].source.splitlines() if l.strip()]
    assert len(declared) == len(lines), "every parameter line must parse (one '=' per line)"
    assert FIGURES_PARAM in declared
    for name, param in declared.items():
        assert param["inferred_type_name"] != "None", f"{notebook}: {name} has no type annotation"
        assert param["help"], f"{notebook}: {name} has no comment"


# --------------------------------------------------------------------------- command line

def test_cli_rejects_bad_input_before_running(tmp_path, toy_raw, dermaid_cli):
    reports = tmp_path / "reports"
    unknown = dermaid_cli("report", "eda", f"data_root={toy_raw}", "colour=red", f"paths.reports_dir={reports}",
                          cwd=tmp_path)
    assert unknown.returncode == 2, unknown.stderr
    assert "error: report eda: unknown parameter(s) colour" in unknown.stderr and "data_root" in unknown.stderr
    missing = dermaid_cli("report", "train-report", "run_dir=runs/nowhere", f"paths.reports_dir={reports}",
                          cwd=tmp_path)
    assert missing.returncode == 2 and "run_dir=" in missing.stderr and "nowhere' does not exist" in missing.stderr
    typed = dermaid_cli("report", "eda", f"data_root={toy_raw}", "folds=many", f"paths.reports_dir={reports}",
                        cwd=tmp_path)
    assert typed.returncode == 2 and "folds='many' should be int" in typed.stderr
    name = dermaid_cli("report", "summary", cwd=tmp_path)
    assert name.returncode == 2 and "unknown report 'summary'" in name.stderr and "train-report" in name.stderr
    assert "Traceback" not in unknown.stderr + missing.stderr + typed.stderr + name.stderr
    assert not reports.exists()


def test_eda_report_from_the_command_line(tmp_path, toy_raw, dermaid_cli):
    reports = tmp_path / "reports"
    result = dermaid_cli("report", "eda", f"data.root={toy_raw}", "samples_per_class=2", "max_size_images=40",
                         f"paths.reports_dir={reports}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = result.stdout.strip().splitlines()[-1]
    assert Path(folder).parent == reports and Path(folder).name.startswith("eda-")
    html, figures = _report_files(folder)
    _assert_sections(html, ["Class counts and imbalance", "Age, sex and anatomical site", "Missing metadata",
                            "Images per lesion", "Image sizes", "Sample images per class",
                            "Fold and test balance"], min_figures=8)
    records = pd.read_csv(Path(toy_raw) / "ISIC_2019_Training_GroundTruth.csv")
    assert figures["num_images"] == len(records) == 240
    assert figures["class_counts"]["NV"] == int(records["NV"].sum())
    assert figures["imbalance_ratio"] >= 1.0 and 0 <= figures["missing/age"] < 1
    _no_partial_reports(reports)


def test_failing_cell_fails_the_report_and_names_the_cell(tmp_path, toy_raw):
    reports = tmp_path / "reports"
    with pytest.raises(DermaidError) as info:  # an ISIC layout read as HAM10000: the reader fails in cell 3
        build_report("eda", notebooks_dir() / "01-eda.ipynb", {"data_root": toy_raw, "layout": "ham10000"},
                     str(reports), path_params=["data_root"])
    message = str(info.value)
    assert "report eda failed in cell 3 of 01-eda.ipynb" in message
    assert "data_root = project_path(data_root)" in message and "DatasetError" in message
    assert "HAM10000_metadata.csv" in message
    kept = [p.name for p in reports.iterdir()]
    assert len(kept) == 1 and kept[0].endswith("-FAILED.ipynb")  # never a folder that looks complete


# --------------------------------------------------------------------------- the other notebooks

def _calibrated_run(tmp_path: Path, trained_run: str, calibrated_checkpoint: str) -> str:
    """A copy of trained_run whose best/ is the calibrated checkpoint (card with `ood` and `triage` blocks)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    shutil.rmtree(run_dir / "best")
    shutil.copytree(calibrated_checkpoint, run_dir / "best")
    return str(run_dir)


def test_train_report(tmp_path, trained_run, calibrated_checkpoint):
    from dermaid.data.synth_ood import OOD_KINDS
    from dermaid.models.card import load_card

    run_dir = _calibrated_run(tmp_path, trained_run, calibrated_checkpoint)
    folder = build_report("train-report", notebooks_dir() / "02-train-report.ipynb",
                          {"run_dir": run_dir, "num_errors": 3, "ood_per_kind": 2}, str(tmp_path / "reports"),
                          path_params=["run_dir"])
    html, figures = _report_files(folder)
    _assert_sections(html, ["Learning curves", "Confusion matrix", "Per-class ISIC metrics", "ROC curves per class",
                            "Calibration: reliability before and after temperature scaling", "Subgroup metrics",
                            "Most confident errors", "Knowing when not to answer"], min_figures=8)
    summary = json.loads((Path(trained_run) / "summary.json").read_text())
    # the report re-predicts the best checkpoint on the run's validation fold: training's number comes back
    assert figures["val/balanced_accuracy"] == pytest.approx(summary["best_metrics"]["val/balanced_accuracy"], abs=1e-6)
    assert figures["best_epoch"] == summary["best_epoch"]
    assert figures["temperature"] == pytest.approx(summary["temperature"])
    assert 0 <= figures["val/ece"] <= 1 and 0 <= figures["val/ece_calibrated"] <= 1
    assert figures["val/nll_calibrated"] <= figures["val/nll"] + 1e-6  # T minimises the val NLL
    assert {"val/worst_balanced_accuracy/sex", "val/worst_balanced_accuracy/site"} <= set(figures)

    # knowing when not to answer: the card's detector and cut-off, re-measured on the same validation fold
    card = load_card(calibrated_checkpoint)
    method = card.ood["method"]
    assert figures["ood/method"] == method and figures["ood/threshold"] == pytest.approx(card.ood["threshold"])
    assert figures["val/ood/refused_share"] == pytest.approx(card.ood["validation"][method]["refused_in"], abs=1e-9)
    assert figures["ood_set/num_images"] == 2 * len(OOD_KINDS)
    assert 0 <= figures["ood_set/refused_share"] <= 1 and 0.5 < figures["val/ood/auroc"] <= 1
    assert all(0 <= figures[f"val/ood/auroc/{kind}"] <= 1 for kind in OOD_KINDS)
    triage = card.triage
    assert figures["triage/cutoff"] == pytest.approx(triage["cutoff"])
    assert figures["triage/target_sensitivity"] == pytest.approx(triage["target_sensitivity"])
    assert figures["val/triage/sensitivity"] == pytest.approx(triage["sensitivity"])
    assert figures["val/triage/specificity"] == pytest.approx(triage["specificity"])
    assert "OOD score is above" in html and "Triage operating point" in html


def test_train_report_abstention_without_calibration(trained_run):
    """An uncalibrated checkpoint: the section says so and how to fix it; no detector, no figures, no failure."""
    from matplotlib.figure import Figure

    from dermaid.evaluation.metrics import compute_metrics
    from dermaid.reporting import abstention, training

    run = training.load_run(trained_run)
    assert run.card.ood is None and run.card.triage is None
    preds = training.predict_split(run)
    section = abstention.check_abstention(run, preds, ood_per_kind=1)
    text = abstention.summary_markdown(section)
    assert "No OOD detector" in text and "No triage cut-off" in text
    assert f"dermaid calibrate checkpoint={run.checkpoint}" in text and "never a diagnosis" in text
    assert isinstance(abstention.plot_ood_scores(section), Figure)
    assert isinstance(abstention.plot_ood_methods(section), Figure)
    assert abstention.ood_table(section).empty and abstention.triage_table(section).empty
    figures = training.key_figures(run, preds, compute_metrics(preds.labels, preds.probs), abstention=section)
    assert figures["ood/method"] is None and figures["triage/cutoff"] is None
    assert not any(key.startswith(("val/ood/", "val/triage/", "ood_set/")) for key in figures)


def test_saliency_gallery(tmp_path, trained_run, toy_raw):
    folder = build_report("saliency-gallery", notebooks_dir() / "04-saliency-gallery.ipynb",
                          {"checkpoint": f"{trained_run}/best", "data_root": toy_raw, "per_class": 1,
                           "methods": ["gradcam", "eigencam"], "target_images": 1},
                          str(tmp_path), path_params=["checkpoint", "images|data_root"])
    html, figures = _report_files(folder)
    _assert_sections(html, ["Overlays per class and per method", "One image, every target class"], min_figures=2)
    assert figures["num_images"] == 8 and figures["methods"] == ["gradcam", "eigencam"]
    assert figures["cam_layer"].startswith("backbone.")


def test_tune_report(tmp_path, toy_tune):
    folder = build_report("tune-report", notebooks_dir() / "03-tune-report.ipynb", {"tune_dir": toy_tune},
                          str(tmp_path), path_params=["tune_dir"])
    html, figures = _report_files(folder)
    _assert_sections(html, ["Trials", "Metric against each hyperparameter", "Learning curves per trial",
                            "Best configuration"], min_figures=2)
    results = pd.read_csv(Path(toy_tune) / "results.csv")
    summary = json.loads((Path(toy_tune) / "summary.json").read_text())
    assert figures["num_trials"] == len(results) == 2
    assert figures["best/val/balanced_accuracy"] == pytest.approx(results["val/balanced_accuracy"].max())
    assert figures["best/trial_id"] == summary["best"]["trial_id"]
    searched = [c[len("config/"):] for c in results.columns
                if c.startswith("config/") and results[c].astype(str).nunique() > 1]
    assert searched and all(f"best/{key}" in figures for key in searched)
    assert "Retrain with: <code>dermaid train " in html and str(Path(toy_tune) / "best" / "card.json") in html
