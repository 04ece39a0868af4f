"""Shared pytest fixtures and the automatic `integration` mark.

    make test-fast      # pytest -m "not integration": no Ray cluster, no Serve, no browser, no PostgreSQL
    make test           # everything

A test is marked `integration` when its fixtures reach something expensive (INTEGRATION_FIXTURES:
a Ray cluster, the Ray-trained toy run, a Serve app, a browser, PostgreSQL); nobody has to remember
the mark. A test that starts such a thing without one of these fixtures carries the mark itself,
with a reason: `@pytest.mark.integration(reason="...")`.

Fast fixtures: toy_raw (synthetic ISIC layout), toy_prepared (prepared in this process),
trained_run (a few epochs in this process: Ray Train's local mode, no cluster), tiny_checkpoint
(untrained), dermaid_cli (the `dermaid` command run in this process). Expensive ones, shared once
per session: ray_session (one local Ray cluster), toy_run (trained on that cluster), postgres_url.

Append fixtures here; keep edits small (several engineers share this file).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

# fixture name -> what it reaches (a test whose fixture closure holds one is marked `integration`)
INTEGRATION_FIXTURES = {
    "ray_session": "a Ray cluster",
    "ray_head": "a Ray cluster started by `ray start` (test_pipeline.py)",
    "toy_run": "a run trained on Ray Train",
    "server": "a Serve app (test_serve.py)",
    "app": "a Serve app (test_web.py)",
    "browser": "a browser",
    "postgres_url": "a PostgreSQL server",
    "calibrated_checkpoint": "a run calibrated by `dermaid calibrate` (about a minute of OOD fitting)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test whose fixtures reach an INTEGRATION_FIXTURES entry as `integration`."""
    for item in items:
        reached = [name for name in INTEGRATION_FIXTURES if name in getattr(item, "fixturenames", ())]
        if reached and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration(reason=", ".join(INTEGRATION_FIXTURES[n] for n in reached)))


def _ray_is_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request: pytest.FixtureRequest):
    """A test without the `integration` mark that starts Ray in this process fails: it needs ray_session."""
    running_before = request.node.get_closest_marker("integration") is not None or _ray_is_running()
    yield
    if not running_before and _ray_is_running():
        pytest.fail(f"{request.node.nodeid} started Ray without an integration fixture: take ray_session "
                    "(or mark it @pytest.mark.integration(reason=...))", pytrace=False)


# ---------------------------------------------------------------------------------------------
# Fast: in this process, no Ray cluster


@pytest.fixture(scope="session")
def toy_raw(tmp_path_factory) -> str:
    """A 240-image toy set in the ISIC 2019 layout (dermaid.data.synth, seed 0); its root path."""
    from dermaid.data.synth import generate

    root = tmp_path_factory.mktemp("toy_raw") / "toy"
    generate(str(root), n=240, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def toy_prepared(toy_raw, tmp_path_factory) -> str:
    """toy_raw prepared at image_size 96 in this process (no Ray; the same version Ray tasks give),
    tagged "toy": the version directory URL."""
    from dermaid.config import compose, to_plain
    from dermaid.data.prepare import prepare_dataset
    from dermaid.files import join

    out = str(tmp_path_factory.mktemp("toy_prepared"))
    overrides = [f"data.root={toy_raw}", f"data.prepared_dir={out}", "data.image_size=96"]
    data_cfg = to_plain(compose("prepare", overrides).data)
    manifest = prepare_dataset(data_cfg, out=out, tag="toy", in_process=True)
    return join(out, manifest["version"])


def _toy_train_overrides(toy_prepared: str, out: Path | str, *extra: str) -> list[str]:
    """The toy experiment with resnet10t at 64 px on toy_prepared, written to out.

    resnet10t rather than the toy default (mobilenetv3_small_050): it leaves chance within 2-3 epochs, where the
    MobileNet needs about 5, so tests that need a model which learned something stay short."""
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    return ["experiment=toy", f"data.prepared_dir={prepared_dir}", f"data.version={version}", f"out={out}",
            "model.name=resnet10t", "train.epochs=3", "train.image_size=64", "logger=none", *extra]


@pytest.fixture(scope="session")
def trained_run(toy_prepared, tmp_path_factory) -> str:
    """A real 3-epoch `dermaid train` run in this process (scaling.num_workers=0: Ray Train's local mode runs the
    same worker code here, no Ray cluster) on toy_prepared: the run directory (best/, last/, history.csv,
    config.yaml, summary.json), whose best model is well above chance. Read-only for tests: copy it first.

    For tests that need *a* trained checkpoint (evaluate, reports, compression, Serve, web); Ray Train itself is
    tested with toy_run. The project's own worker rather than a second training loop written for the tests."""
    import torch

    from dermaid.config import compose
    from dermaid.training.driver import train

    out = tmp_path_factory.mktemp("trained_run") / "run"
    threads = torch.get_num_threads()  # the worker sets this process's torch thread count: give it back after
    try:
        train(compose("train", _toy_train_overrides(
            toy_prepared, out, "scaling.num_workers=0", f"train.torch_threads={max(1, min(2, os.cpu_count() or 1))}")))
    finally:
        torch.set_num_threads(threads)
    return str(out)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A real timm model (test_efficientnet, 64 px, metadata branch, T=1.5), untrained, as a checkpoint dir."""
    import torch

    from dermaid.models.card import build_card, save_checkpoint
    from dermaid.models.classifier import create_classifier, resolve_input_spec

    torch.manual_seed(0)
    model_cfg = {"name": "test_efficientnet", "pretrained": False, "use_metadata": True}
    model = create_classifier(model_cfg)
    url = str(tmp_path_factory.mktemp("tiny_checkpoint") / "best")
    save_checkpoint(url, build_card(model_cfg, resolve_input_spec(model, 64), temperature=1.5), model.state_dict())
    return url



@pytest.fixture(scope="session")
def promotable_checkpoint(tiny_checkpoint, tmp_path_factory) -> str:
    """tiny_checkpoint plus what `dermaid calibrate` adds (a fitted msp detector and its statistics file, a triage
    cut-off): a card that passes the registry's promotion checks, made in well under a second (untrained: the
    numbers are placeholders; calibrated_checkpoint is the real thing). Read-only for tests."""
    import shutil

    import numpy as np

    from dermaid.evaluation.ood import create_detector, save_statistics
    from dermaid.models.card import load_card, replace_card

    url = str(tmp_path_factory.mktemp("promotable_checkpoint") / "best")
    shutil.copytree(tiny_checkpoint, url)
    logits = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)  # (N, C)
    detector = create_detector("msp").fit(None, logits, np.arange(32) % 8)
    card = load_card(url)
    replace_card(url, card.with_calibration(
        {"method": "msp", "statistics": save_statistics(url, {"msp": detector}), "threshold": 0.5,
         "refuse_share": 0.05, "scale": 1.0},
        {"cutoff": 0.3, "target_sensitivity": 0.9, "sensitivity": 0.9, "specificity": 0.5}))
    return url

def start_test_app(checkpoint: str, app_name: str, tmp_path_factory, *overrides: str, ready_s: float = 180) -> str:
    """`dermaid serve`'s app on the session's Ray (blocking=false), sized for 2 CPUs, its uploads and prediction log
    in temporary folders; returns the base URL once /readyz answers 200. `overrides` (key=value) win over these
    defaults; the caller shuts Serve down (`serve.shutdown()`) when its module is done."""
    import time

    import requests

    from dermaid.config import compose
    from dermaid.processes import free_port
    from serve.launcher import start

    settings = {
        "port": str(free_port()), "app_name": app_name, "blocking": "false",
        "storage.url": str(tmp_path_factory.mktemp(f"{app_name}_uploads")),
        "monitoring.url": str(tmp_path_factory.mktemp(f"{app_name}_monitoring")),  # out of the checkout
        "classifier.num_cpus": "0.5", "classifier.torch_threads": "1",   # a fraction of the session's 2 CPUs
        "explainer.num_cpus": "0.25", "explainer.torch_threads": "1", "ingress.num_cpus": "0.1",
    }
    settings.update(override.split("=", 1) for override in overrides)
    base = start(compose("serve", [f"checkpoint={checkpoint}", *(f"{k}={v}" for k, v in settings.items())]))
    deadline = time.monotonic() + ready_s
    while requests.get(f"{base}/readyz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, f"serve app {app_name} never became ready"
        time.sleep(0.5)
    return base


@dataclass
class CliResult:
    """What a `dermaid ...` call left: like subprocess.CompletedProcess's fields."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def dermaid_cli(capsys, monkeypatch) -> Callable[..., CliResult]:
    """Run `dermaid <args>` in this process through dermaid.cli.main: run(*args, cwd=None) -> CliResult.

    cwd (default: the test's current directory) is where Hydra's outputs/ and relative paths land."""
    from dermaid.cli import main

    def run(*args: str, cwd: str | Path | None = None) -> CliResult:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() points sys.argv at the command for Hydra
        capsys.readouterr()
        code, message = 0, ""
        try:
            main(list(args))
        except SystemExit as exc:  # sys.exit(2) for a user error, as the command line sees it
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                code, message = 1, f"{exc.code}\n"
        out, err = capsys.readouterr()
        return CliResult(code, out, err + message)

    return run


# ---------------------------------------------------------------------------------------------
# Integration: shared once per session


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster (2 CPUs) for the whole session, started the one way DermAID starts Ray; shut down
    at the end."""
    import ray

    from dermaid.ray_runtime import ensure_ray

    ensure_ray("local", 2, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def toy_run(toy_prepared, ray_session, tmp_path_factory) -> str:
    """A real 3-epoch `dermaid train` run on Ray Train (toy experiment, 1 worker, resnet10t, 64 px) on
    toy_prepared: the run directory (best/, last/, history.csv, config.yaml, summary.json). Read-only for
    tests: copy it first. Only for tests of Ray Train itself (training, resume, fine-tuning); others take
    trained_run."""
    from dermaid.config import compose
    from dermaid.training.driver import train

    out = tmp_path_factory.mktemp("toy_run") / "run"
    train(compose("train", _toy_train_overrides(toy_prepared, out, "scaling.num_workers=1")))
    return str(out)


def fresh_postgres_database(prefix: str = "dermaid_test"):
    """A new empty database on $DERMAID_TEST_POSTGRES_URL's server, dropped after: a generator of its URL.

    Skips when the variable is unset (CI sets it: .ci/run starts PostgreSQL on loopback)."""
    import uuid

    import sqlalchemy as sa

    server = os.environ.get("DERMAID_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("DERMAID_TEST_POSTGRES_URL is not set (no PostgreSQL server for this run)")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for this session (fresh_postgres_database); skips without a server."""
    yield from fresh_postgres_database()


@pytest.fixture()
def fresh_postgres_url():
    """A fresh PostgreSQL database for one test (fresh_postgres_database); skips without a server."""
    yield from fresh_postgres_database("dermaid_fresh")


@pytest.fixture(scope="session")
def calibrated_checkpoint(trained_run, toy_prepared, tmp_path_factory) -> str:
    """trained_run's best/ copied and calibrated in this process (`dermaid calibrate`'s function, a small generated
    OOD set): a checkpoint with OOD statistics and a triage operating point. Read-only for tests: copy it first."""
    import shutil

    from dermaid.config import compose
    from dermaid.evaluation.calibrate import calibrate

    checkpoint = tmp_path_factory.mktemp("calibrated_checkpoint") / "best"
    shutil.copytree(Path(trained_run) / "best", checkpoint)
    prepared_dir = toy_prepared.rstrip("/").rsplit("/", 1)[0]  # data.version: the card's own
    calibrate(compose("calibrate", [f"checkpoint={checkpoint}", f"data.prepared_dir={prepared_dir}",
                                    "ood.validation_set.n_per_kind=4"]))
    return str(checkpoint)


@pytest.fixture(scope="session")
def toy_tune_result(toy_prepared, ray_session, tmp_path_factory):
    """A real `dermaid tune hparams_search=toy` through dermaid.api.tune (the command line's code path), cut down to
    2 concurrent one-epoch trials over lr and augment: its dermaid.api.TuneResult. Read-only for tests."""
    from dermaid import api

    out = tmp_path_factory.mktemp("toy_tune") / "tune"
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    return api.tune(
        "hparams_search=toy", f"data.prepared_dir={prepared_dir}", f"data.version={version}", f"out={out}",
        "tune.num_samples=2", "train.epochs=1", "train.image_size=64", "train.batch_size=16",
        "scaling.num_workers=1", "tune.scheduler.name=fifo", "tune.max_concurrent_trials=2", "logger=none",
        "~hparams_search.space", "+hparams_search.space={optim.lr:{loguniform:[0.001,0.01]},augment:{choice:[none,light]}}",
    )  # both trials at once: 2 x (0.1 driver + 0.5 worker) CPUs fit the session's 2-CPU Ray


@pytest.fixture(scope="session")
def toy_tune(toy_tune_result) -> str:
    """toy_tune_result's search directory (results.csv, summary.json, best/, trials/<id>/). Read-only for tests."""
    return toy_tune_result.run_dir
