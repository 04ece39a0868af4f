"""Shared pytest fixtures: one Ray cluster per session, toy data generated and prepared once.

Append fixtures here; keep edits small (several engineers share this file).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster (2 CPUs) for the whole session; shut down at the end."""
    import ray

    for attempt in range(3):  # a busy machine can miss Ray's fixed 30 s raylet start-up window
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
        except Exception as exc:  # ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def toy_raw(tmp_path_factory) -> str:
    """A 240-image toy set in the ISIC 2019 layout (dermaid.data.synth, seed 0); its root path."""
    from dermaid.data.synth import generate

    root = tmp_path_factory.mktemp("toy_raw") / "toy"
    generate(str(root), n=240, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def toy_prepared(toy_raw, ray_session, tmp_path_factory) -> str:
    """toy_raw prepared at image_size 96 (on the session's Ray): the version directory URL."""
    from dermaid.config import compose, to_plain
    from dermaid.data.prepare import prepare_dataset
    from dermaid.files import join

    out = str(tmp_path_factory.mktemp("toy_prepared"))
    data_cfg = to_plain(compose("prepare", [f"data.root={toy_raw}", f"data.prepared_dir={out}", "data.image_size=96"]).data)
    manifest = prepare_dataset(data_cfg, out=out, tag="toy")
    return join(out, manifest["version"])


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for this session on $DERMAID_TEST_POSTGRES_URL's server (dropped at the end).

    Skips when the variable is unset (CI sets it: .ci/run starts PostgreSQL on loopback)."""
    import os
    import uuid

    import sqlalchemy as sa

    server = os.environ.get("DERMAID_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("DERMAID_TEST_POSTGRES_URL is not set (no PostgreSQL server for this run)")
    name = f"dermaid_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


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
def toy_run(toy_prepared, tmp_path_factory) -> str:
    """A real 3-epoch `dermaid train` run (toy experiment with resnet10t, 1 worker, 64 px) on toy_prepared: the
    run directory (best/, last/, history.csv, config.yaml, summary.json). Read-only for tests: copy it first.

    resnet10t rather than the toy default (mobilenetv3_small_050): it leaves chance within 2-3 epochs, where the
    MobileNet needs about 5, so tests that need a model which learned something stay short."""
    from dermaid.config import compose
    from dermaid.training.train import train

    out = tmp_path_factory.mktemp("toy_run") / "run"
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    train(compose("train", [
        "experiment=toy", f"data.prepared_dir={prepared_dir}", f"data.version={version}", f"out={out}",
        "model.name=resnet10t", "train.epochs=3", "train.image_size=64", "scaling.num_workers=1", "logger=none",
    ]))
    return str(out)
