"""dermaid.api: one function per command, the command line's config and code path, typed results; the quickstart.

    .venv/bin/python -m pytest tests/test_api.py -x -q

Every API function runs on toy data in this process and is compared with the `dermaid` command run in this
process (the dermaid_cli fixture) on the same overrides. Tuning reuses the session's search (toy_tune_result,
run through api.tune in tests/conftest.py); training is one in-process epoch of two steps each way.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from dermaid import api
from dermaid.errors import DermaidError


def _version_overrides(toy_prepared: str) -> list[str]:
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    return [f"data.prepared_dir={prepared_dir}", f"data.version={version}"]


# --------------------------------------------------------------------------- composing, fast


def test_keyword_values_are_written_in_hydra_grammar():
    assert api.overrides_from(("experiment=toy",), {"optim__lr": 3e-4, "data.root": "/tmp/a b", "tags": ["a", 1],
                                                    "x": None, "flag": True, "s": "3e-4", "d": {"k": [1, 2]}}) == [
        "experiment=toy", "optim.lr=0.0003", "data.root='/tmp/a b'", "tags=[a,1]", "x=null", "flag=true", "s='3e-4'",
        "d={k:[1,2]}"]
    by_keyword = api.config("train", experiment="toy", optim__lr=5e-4, train__image_size=64, model__name="resnet10t")
    by_string = api.config("train", "experiment=toy", "optim.lr=0.0005", "train.image_size=64", "model.name=resnet10t")
    assert OmegaConf.to_container(by_keyword) == OmegaConf.to_container(by_string)
    assert by_keyword.optim.lr == 5e-4 and by_keyword.model.name == "resnet10t" and by_keyword.logger.name == "none"


def test_the_config_is_the_one_the_command_line_composes(dermaid_cli, tmp_path):
    shown = dermaid_cli("train", "experiment=toy", "optim.lr=0.0005", "scaling.num_workers=1", "--cfg", "job",
                        cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    composed = api.config("train", "experiment=toy", optim__lr=5e-4, scaling__num_workers=1)
    assert OmegaConf.to_container(OmegaConf.create(shown.stdout)) == OmegaConf.to_container(composed)
    # a command's shorthand works as on the command line (`dermaid report eda k=v`)
    report = api.config("report", "eda", samples_per_class=2, data__root="/data/x")
    assert report.params == {"samples_per_class": 2} and report.report.params.data_root == "/data/x"


def test_mistakes_are_the_command_lines_messages(dermaid_cli, tmp_path):
    cli = dermaid_cli("evaluate", cwd=tmp_path)
    with pytest.raises(DermaidError) as missing:
        api.evaluate()
    assert cli.returncode == 2 and cli.stderr.strip() == f"error: {missing.value}"
    assert "checkpoint= is required" in str(missing.value)
    with pytest.raises(DermaidError, match="Could not override 'nokey'"):
        api.train("nokey=3")
    with pytest.raises(DermaidError, match="unknown command 'trian'"):
        api.call("trian")
    with pytest.raises(DermaidError, match="unknown report 'summary'"):
        api.report("summary")
    assert callable(api.labels_export) and callable(api.db)  # every command of dermaid.cli.COMMANDS
    with pytest.raises(AttributeError):
        api.no_such_command  # noqa: B018


# --------------------------------------------------------------------------- each command, equal to the CLI


def test_prepare_equals_the_cli_and_reports_progress(toy_raw, dermaid_cli, tmp_path, capsys):
    overrides = [f"data.root={toy_raw}", "data.image_size=32", f"paths.root={tmp_path}"]
    ours, theirs = f"memory://api-{uuid.uuid4().hex[:8]}", f"memory://cli-{uuid.uuid4().hex[:8]}"
    result = api.prepare(*overrides, out=ours, tag="toy")
    progress = capsys.readouterr().out
    cli = dermaid_cli("prepare", *overrides, f"out={theirs}", "tag=toy", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert f"dataset version {result.version}: 240 images" in cli.stdout  # the same content-addressed version
    assert isinstance(result, api.PrepareResult) and result.num_images == 240 and result.tags == ["toy"]
    assert result.version_url == f"{ours}/{result.version}" and result.counts == result.raw["counts"]
    assert "prepare: 240/240 images" in progress  # plain progress lines in the cell, as on the command line


def test_commands_without_a_typed_result(dermaid_cli, tiny_checkpoint, tmp_path):
    """synth and export (as distill, quantize, pipeline, download, ... and any command added later) return a
    CommandResult holding what the command returned; the files equal the command line's."""
    synth = api.synth(out=str(tmp_path / "api-toy"), n=16, seed=3)
    cli = dermaid_cli("synth", f"out={tmp_path / 'cli-toy'}", "n=16", "seed=3", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert isinstance(synth, api.CommandResult) and synth.command == "synth" and synth.out == str(tmp_path / "api-toy")
    assert sum(synth.raw["counts"].values()) == 16
    ours = sorted(p.relative_to(tmp_path / "api-toy") for p in (tmp_path / "api-toy").rglob("*") if p.is_file())
    assert ours == sorted(p.relative_to(tmp_path / "cli-toy") for p in (tmp_path / "cli-toy").rglob("*") if p.is_file())
    for name in ours:
        assert (tmp_path / "api-toy" / name).read_bytes() == (tmp_path / "cli-toy" / name).read_bytes()
    exported = api.export(checkpoint=tiny_checkpoint, format="torchscript", out=str(tmp_path / "ts"), check_batch=2)
    assert exported.command == "export" and (tmp_path / "ts" / "card.json").exists()


@pytest.mark.integration(reason="two in-process trainings (~6 s): kept out of the fast tier's 3 minutes")
def test_train_equals_the_cli(toy_prepared, dermaid_cli, tmp_path):
    overrides = ["experiment=toy", *_version_overrides(toy_prepared), "model.name=resnet10t", "train.epochs=1",
                 "train.image_size=64", "train.max_steps_per_epoch=2", "scaling.num_workers=0", "train.torch_threads=1",
                 "logger=none"]
    import torch

    threads = torch.get_num_threads()
    try:
        result = api.train(*overrides, out=str(tmp_path / "api"))
        cli = dermaid_cli("train", *overrides, f"out={tmp_path / 'cli'}", cwd=tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert isinstance(result, api.TrainResult) and result.run_dir == str(tmp_path / "api")
    assert result.checkpoint == str(tmp_path / "api" / "best") and (Path(result.checkpoint) / "card.json").exists()
    assert result.dataset_version == toy_prepared.rstrip("/").rsplit("/", 1)[1] and result.best_epoch == 1
    theirs = json.loads((tmp_path / "cli" / "summary.json").read_text())
    timing = ("seconds", "train/images_per_s")
    assert {k: v for k, v in result.metrics.items() if k not in timing} == pytest.approx(
        {k: v for k, v in theirs["best_metrics"].items() if k not in timing})


@pytest.mark.integration(reason="two evaluations of a trained checkpoint: kept out of the fast tier's 3 minutes")
def test_evaluate_equals_the_cli(trained_run, toy_prepared, dermaid_cli, tmp_path):
    overrides = [f"checkpoint={trained_run}/best", *_version_overrides(toy_prepared), "split=test"]
    result = api.evaluate(*overrides, out=str(tmp_path / "api"))
    cli = dermaid_cli("evaluate", *overrides, f"out={tmp_path / 'cli'}", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "api" / "predictions.csv").read_text() == (tmp_path / "cli" / "predictions.csv").read_text()
    assert json.loads((tmp_path / "api" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "cli" / "metrics.json").read_text())
    assert isinstance(result, api.EvaluateResult) and result.split == "test" and result.num_images > 0
    assert result.predictions == str(tmp_path / "api" / "predictions.csv")
    assert result.metrics["balanced_accuracy"] == result.raw["balanced_accuracy"]
    assert result.dataset_version == toy_prepared.rstrip("/").rsplit("/", 1)[1]
    assert "per_class" in result.raw and "per_class" not in result.metrics  # scalars only in .metrics


@pytest.mark.integration(reason="fits every OOD detector (~12 s): kept out of the fast tier's 3 minutes")
def test_calibrate_equals_the_command_function(trained_run, toy_prepared, calibrated_checkpoint, tmp_path):
    """api.calibrate on a fresh copy of trained_run's best/ stores what `dermaid calibrate`'s function stored in
    calibrated_checkpoint (tests/conftest.py) with the same overrides."""
    from dermaid.models.card import load_card

    checkpoint = tmp_path / "best"
    shutil.copytree(Path(trained_run) / "best", checkpoint)
    prepared_dir = toy_prepared.rstrip("/").rsplit("/", 1)[0]
    result = api.calibrate(checkpoint=str(checkpoint), data__prepared_dir=prepared_dir,
                           ood__validation_set__n_per_kind=4)
    theirs, ours = load_card(calibrated_checkpoint), load_card(str(checkpoint))
    assert isinstance(result, api.CalibrateResult) and result.checkpoint == str(checkpoint)
    assert result.ood_method == ours.ood["method"] == theirs.ood["method"]
    assert result.ood_threshold == pytest.approx(theirs.ood["threshold"])
    assert result.triage_cutoff == pytest.approx(theirs.triage["cutoff"]) == pytest.approx(ours.triage["cutoff"])


def test_tune_result_names_the_search_and_its_best_trial(toy_tune_result, toy_prepared, dermaid_cli, tmp_path):
    result = toy_tune_result  # made by api.tune (tests/conftest.py), trials on the session's Ray
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    results = pd.read_csv(Path(result.run_dir) / "results.csv")
    assert isinstance(result, api.TuneResult) and result.num_trials == len(results) == 2 and result.finished == 2
    assert result.best_trial == summary["best"]["trial_id"] and result.checkpoint == summary["best"]["checkpoint"]
    assert result.metrics["val/balanced_accuracy"] == pytest.approx(results["val/balanced_accuracy"].max())
    assert result.dataset_version == toy_prepared.rstrip("/").rsplit("/", 1)[1]
    assert result.overrides and "optim.lr=" in result.overrides
    # the config api.tune ran is the one `dermaid tune` composes from the same overrides
    overrides = ["hparams_search=toy", "tune.num_samples=2", "train.epochs=1", "scaling.num_workers=1"]
    shown = dermaid_cli("tune", *overrides, "--cfg", "job", cwd=tmp_path)
    assert OmegaConf.to_container(OmegaConf.create(shown.stdout)) == OmegaConf.to_container(api.config("tune", *overrides))


# --------------------------------------------------------------------------- notebooks under papermill


@pytest.mark.integration(reason="a Jupyter kernel trains, evaluates and explains a model (papermill)")
def test_quickstart_notebook_runs_small(tmp_path, monkeypatch):
    from dermaid.reporting.runner import build_report, notebooks_dir

    # ipykernel stops forwarding output written to the process's own stdout (the training worker's epoch lines)
    # into cells when it sees it runs under pytest; the notebook is checked as JupyterLab shows it
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)

    params = {"workdir": str(tmp_path / "work"), "n_images": 240, "epochs": 1, "num_workers": 0,
              "model_name": "resnet10t", "image_size": 64, "max_steps_per_epoch": 2,
              "prepared_dir": f"memory://quickstart-{uuid.uuid4().hex[:8]}",  # in the kernel: no Ray tasks
              "serve_url": "http://127.0.0.1:9"}  # nothing answers there: the cell says so and moves on
    folder = Path(build_report("quickstart", notebooks_dir() / "00-quickstart.ipynb", params, str(tmp_path / "reports")))
    html = (folder / "report.html").read_text()
    figures = json.loads((folder / "key_figures.json").read_text())
    for heading in ("1. Toy data", "2. Prepare a dataset version", "3. Train on Ray", "4. Metrics and learning curves",
                    "5. One Grad-CAM", "6. Ask the HTTP API", "7. Your runs side by side"):
        assert heading in html
    assert "Traceback" not in html and "decision support" in html
    assert figures["num_images"] == 240 and figures["best_epoch"] == 1 and figures["served"] is False
    assert 0 <= figures["test/balanced_accuracy"] <= 1 and figures["num_runs"] == 2  # the run and its evaluation
    assert "No <code>dermaid serve</code> answers at" in html and "(ConnectionError): start one" in html
    assert "epoch   1/1" in html and "prepare: 240/240 images" in html  # progress shown in the cells
    run_dir = Path(figures["run_dir"])
    assert (run_dir / "best" / "card.json").exists() and (run_dir / "eval-test" / "metrics.json").exists()
