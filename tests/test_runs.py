"""The runs table (dermaid.runs, `dermaid runs`, dermaid.api.runs) and the compare-runs report.

    .venv/bin/python -m pytest tests/test_runs.py -x -q

Folders are made of real outputs: copies of the session's trained_run and of its tuning search (toy_tune),
registry versions written by dermaid.registry, and broken folders as a crash or a hand edit leaves them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dermaid import api
from dermaid.errors import DermaidError
from dermaid.runs import config_differences, format_differences, runs_table, wandb_row


def _copy_run(trained_run: str, target: Path, lr: float | None = None) -> Path:
    shutil.copytree(trained_run, target)
    if lr is not None:  # as if trained with another learning rate
        config = target / "config.yaml"
        text = config.read_text()
        assert "lr: 0.003" in text
        config.write_text(text.replace("lr: 0.003", f"lr: {lr}", 1))
    return target


def _broken_folders(root: Path, trained_run: str) -> dict[str, str]:
    """name -> a piece of the problem the table must name."""
    (root / "crashed").mkdir(parents=True)
    shutil.copy(Path(trained_run) / "config.yaml", root / "crashed" / "config.yaml")  # died before its first epoch
    (root / "hand-edited").mkdir()
    (root / "hand-edited" / "config.yaml").write_text("model: [unclosed\n")
    (root / "hand-edited" / "history.csv").write_text("epoch\n1\n")
    shutil.copytree(trained_run, root / "bad-card")
    (root / "bad-card" / "best" / "card.json").write_text("{not json")
    return {"crashed": "no best/card.json", "hand-edited": "ParserError", "bad-card": "card"}


# --------------------------------------------------------------------------- fast: train runs, no Ray


def test_train_runs_with_config_differences_and_broken_folders(tmp_path, trained_run):
    root = tmp_path / "runs"
    _copy_run(trained_run, root / "base")
    _copy_run(trained_run, root / "lower-lr", lr=0.001)
    problems = _broken_folders(root, trained_run)
    summary = json.loads((Path(trained_run) / "summary.json").read_text())

    table = runs_table(str(root), baseline="base")
    rows = table.set_index("name")
    assert set(rows.index) >= {"base", "lower-lr", *problems}
    assert set(rows.loc[["base", "lower-lr"], "kind"]) == {"train"}
    base = rows.loc["base"]
    assert base["balanced_accuracy"] == pytest.approx(summary["best_metrics"]["val/balanced_accuracy"])
    assert base["auc_macro"] == pytest.approx(summary["best_metrics"]["val/auc_macro"])
    assert base["ece_calibrated"] == pytest.approx(summary["best_metrics"]["val/ece_calibrated"])
    assert base["model"] == summary["model"]["name"] and base["image_size"] == 64
    assert base["dataset_version"] == summary["dataset_version"] and base["checkpoint"].endswith("base/best")
    assert pd.isna(base["ood_method"])  # not calibrated
    assert base["config_diff"] == "(baseline)" and rows.loc["lower-lr", "config_diff"] == "optim.lr 0.003->0.001"
    for name, problem in problems.items():  # listed with their problem, not fatal
        assert problem in rows.loc[name, "problem"], rows.loc[name, "problem"]
    assert rows.loc[["base", "lower-lr"], "problem"].isna().all()

    with pytest.raises(DermaidError, match=r"baseline=nope: no run of that name .*'base'"):
        runs_table(str(root), baseline="nope")
    with pytest.raises(DermaidError, match="no such folder"):
        runs_table(str(tmp_path / "nowhere"))


def test_the_cli_prints_and_writes_what_the_api_returns(tmp_path, trained_run, dermaid_cli):
    root = tmp_path / "runs"
    _copy_run(trained_run, root / "base")
    _copy_run(trained_run, root / "lower-lr", lr=0.001)
    _broken_folders(root, trained_run)
    table = api.runs(root=str(root), baseline="base")
    cli = dermaid_cli("runs", f"root={root}", "baseline=base", f"out={tmp_path / 'runs.csv'}", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    written = pd.read_csv(tmp_path / "runs.csv")
    assert list(written["name"]) == list(table["name"]) and list(written["kind"]) == list(table["kind"])
    assert written["balanced_accuracy"].tolist() == pytest.approx(table["balanced_accuracy"].tolist(), nan_ok=True)
    assert "optim.lr 0.003->0.001" in cli.stdout and "crashed: no best/card.json" in cli.stdout
    assert "config_diff: against base" in cli.stdout


def test_config_differences_ignore_where_things_go():
    base = {"optim.lr": 0.003, "out": "/a", "paths.root": "/x", "train.epochs": 3, "augment.name": "light"}
    other = {"optim.lr": 0.001, "out": "/b", "paths.root": "/y", "train.epochs": 3, "augment.name": "none",
             "model.drop_rate": 0.1}
    diff = config_differences(base, other)
    assert diff == {"augment.name": ("light", "none"), "model.drop_rate": (None, 0.1), "optim.lr": (0.003, 0.001)}
    assert format_differences(diff) == "augment.name light->none; model.drop_rate null->0.1; optim.lr 0.003->0.001"


def test_wandb_offline_says_so_and_uses_the_local_runs(tmp_path, trained_run, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no `wandb login` either
    _copy_run(trained_run, tmp_path / "runs" / "base")
    table = api.runs(root=str(tmp_path / "runs"), wandb="someone/dermaid")
    said = capsys.readouterr().out
    assert "W&B: offline" in said and "someone/dermaid" in said and "local runs" in said
    assert list(table["name"]) == ["base"] and table.attrs["notes"] == [said.strip()]


def test_a_wandb_run_becomes_a_row():
    class Run:  # the fields of wandb.apis.public.Run the table reads
        name, url, created_at = "toy-1", "https://wandb.example/run/1", "2026-11-29T10:00:00Z"
        config = {"model": {"name": "resnet10t"}, "train": {"image_size": 64}, "dataset_version": "abc"}
        summary = {"val/balanced_accuracy": 0.5, "val/auc_macro": 0.8, "val/ece_calibrated": 0.1, "epoch": 3}

    row = wandb_row(Run())
    assert row["kind"] == "wandb" and row["name"] == "toy-1" and row["model"] == "resnet10t"
    assert row["image_size"] == 64 and row["dataset_version"] == "abc"
    assert (row["balanced_accuracy"], row["auc_macro"], row["ece_calibrated"]) == (0.5, 0.8, 0.1)


def test_registered_versions_and_cv_folders_are_rows(tmp_path, trained_run):
    from dermaid.registry import Registry

    root = tmp_path / "runs"
    reg = Registry(str(root / "registry"))
    version = reg.register(f"{trained_run}/best", "isic", "v1")
    reg.promote("isic", "v1", by="test") if not version.problems else None
    cv = root / "cv" / "toy"  # `dermaid cv`'s layout (dermaid/training/cv.py)
    _copy_run(trained_run, cv / "fold-0")
    (cv / "fold-0" / "oof").mkdir()
    (cv / "fold-0" / "oof" / "metrics.json").write_text(json.dumps({"balanced_accuracy": 0.5, "split": "val"}))
    (cv / "fold-0" / "oof" / "predictions.csv").write_text("image,MEL\n")
    shutil.copy(Path(trained_run) / "config.yaml", cv / "cv_config.yaml")
    (cv / "oof_metrics.json").write_text(json.dumps({"balanced_accuracy": 0.61, "auc_macro": 0.9,
                                                     "balanced_accuracy_ci": [0.5, 0.7], "dataset_version": "abc"}))
    (cv / "tune").mkdir()  # Ray Tune's state: not walked
    (root / "cv" / "running").mkdir()
    shutil.copy(Path(trained_run) / "config.yaml", root / "cv" / "running" / "cv_config.yaml")
    rows = runs_table(str(root)).set_index("name")
    registered = rows.loc[[n for n in rows.index if n.startswith("registry/isic@v1")]]
    assert len(registered) == 1 and registered["kind"].item() == "registered"
    assert registered["model"].item() == "resnet10t" and pd.isna(registered["problem"].item())
    assert registered["balanced_accuracy"].item() == pytest.approx(version.metrics["val/balanced_accuracy"])
    assert rows.loc["cv/toy", "kind"] == "cv" and rows.loc["cv/toy", "balanced_accuracy"] == 0.61
    trained_on = json.loads((Path(trained_run) / "summary.json").read_text())["dataset_version"]
    assert rows.loc["cv/toy", "model"] == "resnet10t" and rows.loc["cv/toy", "dataset_version"] == trained_on
    assert rows.loc["cv/toy/fold-0", "kind"] == "cv-fold" and rows.loc["cv/toy/fold-0", "parent"] == "cv/toy"
    assert not any(name.startswith("cv/toy/fold-0/") for name in rows.index)  # its oof/ is the CV's own figure
    assert "no out-of-fold figures yet" in rows.loc["cv/running", "problem"]


# --------------------------------------------------------------------------- with the session's tuning search


def test_a_folder_with_a_train_run_a_tune_run_and_broken_folders(tmp_path, trained_run, toy_tune):
    root = tmp_path / "runs"
    _copy_run(trained_run, root / "toy")
    shutil.copytree(toy_tune, root / "tune" / "toy")
    problems = _broken_folders(root, trained_run)
    summary = json.loads((Path(toy_tune) / "summary.json").read_text())
    results = pd.read_csv(Path(toy_tune) / "results.csv")

    table = runs_table(str(root), baseline="toy")
    rows = table.set_index("name")
    assert rows.loc["toy", "kind"] == "train" and rows.loc["tune/toy", "kind"] == "tune"
    tune = rows.loc["tune/toy"]
    assert tune["balanced_accuracy"] == pytest.approx(summary["best"]["val/balanced_accuracy"])
    assert tune["checkpoint"].endswith("tune/toy/best") and tune["image_size"] == 64
    trials = rows[rows["kind"] == "trial"]
    assert sorted(n.rsplit("/", 1)[-1] for n in trials.index) == sorted(results["trial_id"])
    assert set(trials["parent"]) == {"tune/toy"} and trials["problem"].isna().all()
    for trial_id, lr in zip(results["trial_id"], results["config/optim.lr"]):
        assert f"optim.lr 0.003->{lr:.4g}" in rows.loc[f"tune/toy/trials/{trial_id}", "config_diff"]
    assert "optim.lr 0.003->" in tune["config_diff"]  # the best trial's values over the search's base
    for name, problem in problems.items():
        assert problem in rows.loc[name, "problem"]


@pytest.mark.integration(reason="a Jupyter kernel re-runs two checkpoints (papermill)")
def test_compare_runs_report(tmp_path, trained_run, toy_tune):
    """`dermaid report compare-runs` through dermaid.api.report: the table, a metric per run, per-class
    sensitivity, overlaid reliability curves and a confusion-matrix difference; no stray stderr."""
    from dermaid.reporting.runner import stray_stderr

    root = tmp_path / "runs"
    _copy_run(trained_run, root / "toy")
    shutil.copytree(toy_tune, root / "tune" / "toy")
    _broken_folders(root, trained_run)
    result = api.report("compare-runs", root=str(root), runs=["toy", "tune/toy"], baseline="toy",
                        paths__reports_dir=str(tmp_path / "reports"))
    assert isinstance(result, api.ReportResult) and Path(result.html).exists() and not stray_stderr(result.notebook)
    html = Path(result.html).read_text()
    for heading in ("Every run", "Metric per run", "Per-class sensitivity", "Reliability curves overlaid",
                    "Confusion-matrix difference of two runs", "Key figures"):
        assert heading in html
    assert html.count('src="data:image/png;base64,') >= 4 and "Traceback" not in html and "decision support" in html
    figures = result.key_figures
    assert figures["num_runs"] == 2 and figures["pair"] == ["toy", "tune/toy"]
    summary = json.loads((Path(trained_run) / "summary.json").read_text())
    # re-measured on the run's validation fold: training's own number comes back
    assert figures["toy/balanced_accuracy"] == pytest.approx(summary["best_metrics"]["val/balanced_accuracy"], abs=1e-6)
    assert all(0 <= figures[f"tune/toy/sensitivity/{code}"] <= 1 for code in ("MEL", "NV", "BCC"))
    assert "crashed" in html and "no best/card.json" in html  # broken folders listed in the table, not fatal


def test_compare_runs_report_rejects_a_missing_root(tmp_path, dermaid_cli):
    result = dermaid_cli("report", "compare-runs", f"root={tmp_path / 'nowhere'}",
                         f"paths.reports_dir={tmp_path / 'reports'}", cwd=tmp_path)
    assert result.returncode == 2 and "root=" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "reports").exists()
