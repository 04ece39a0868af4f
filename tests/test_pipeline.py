"""`dermaid pipeline` as a Ray Job on a real local cluster: `ray start --head` on loopback, the job
submitted through the Jobs API, SUCCEEDED, the model registered and the reports written; a second
submission skips every step whose output exists; the head is stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dermaid.processes import free_port, start_process_group, stop_process_group

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
DERMAID = str(Path(sys.executable).parent / "dermaid")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head --block` cluster on loopback (2 CPUs, dashboard for the Jobs API).

    Stopped by signalling its own process group, never `ray stop`, which would also kill the test
    session's cluster and any other Ray on the machine."""
    temp = tmp_path_factory.mktemp("ray_head")
    gcs_port, dash_port = free_port(), free_port()
    # every port with a fixed default gets a free one: the test session's own Ray already holds e.g. the
    # dashboard agent's 52365, and a second agent there never registers ("No available agent to submit job")
    ports = {flag: free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port",
                                             "ray-client-server-port", "node-manager-port", "object-manager-port")}
    home = tmp_path_factory.mktemp("ray_head_home")
    # A loopback head without token auth and with a HOME of its own: the session's ray.init() sets
    # RAY_AUTH_MODE=token in this process and writes ~/.ray/auth_token, neither of which belongs to this head
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    log = open(temp / "ray-start.log", "wb")  # shown when the Jobs API never answers
    head = start_process_group(
        [RAY, "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--temp-dir={temp}", "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{dash_port}", temp / "ray-start.log"
    finally:
        stop_process_group(head, signal.SIGTERM, timeout_s=60)
        log.close()


def _submit(client, **job) -> str:
    """Submit a job; the dashboard answers before the node's job agent has registered ("No available
    agent to submit job"), so that one error is retried for up to two minutes."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(3)


def _wait(client, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status)
        time.sleep(3)
    client.stop_job(job_id)
    return "TIMEOUT"


def test_pipeline_runs_as_a_ray_job_and_skips_existing_steps(ray_head, toy_raw, tmp_path):
    from ray.job_submission import JobSubmissionClient

    address, head_log = ray_head

    client = None
    for _ in range(60):  # `ray start --block` returns nothing: poll until the Jobs API answers
        try:
            client = JobSubmissionClient(address)
            break
        except Exception:
            time.sleep(3)
    assert client is not None, f"the Jobs API at {address} never answered: {head_log.read_text()[-3000:]}"

    home = tmp_path / "home"
    entrypoint = (
        f"{DERMAID} pipeline experiment=toy paths.root={home} data.root={toy_raw} data.image_size=96 "
        "train.image_size=64 train.epochs=1 'pipeline.reports=[eda,train-report]' pipeline.evaluate_split=val"
    )
    runtime_env = {"working_dir": str(REPO), "env_vars": {"RAY_DEDUP_LOGS": "0", "WANDB_MODE": "offline"},
                   "excludes": ["/.venv", "/.git", "/data", "/runs", "/reports", "/outputs"]}
    first = _submit(client, entrypoint=entrypoint, runtime_env=runtime_env)
    status = _wait(client, first, timeout_s=1200)
    logs = client.get_job_logs(first)
    assert status == "SUCCEEDED", logs[-4000:]

    registered = list((home / "registry" / "dermaid-isic2019" / "versions").glob("*/version.json"))
    assert len(registered) == 1, logs[-2000:]
    entry = json.loads(registered[0].read_text())
    card = json.loads((registered[0].parent / "model" / "card.json").read_text())
    assert card["dataset_version"] == entry["provenance"]["dataset_version"] and entry["problems"] == []
    assert (registered[0].parent / "model" / card["artifact"]).stat().st_size > 0
    assert card["ood"]["threshold"] is not None and card["triage"]["cutoff"] is not None  # the calibrate step ran
    assert (registered[0].parent / "model" / card["ood"]["statistics"]).stat().st_size > 0
    metrics = json.loads((registered[0].parent / "metrics.json").read_text())
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and "cutoff" in metrics["triage"]
    for name in ("eda", "train-report"):
        html = list((home / "runs" / "pipeline").glob(f"report-{name}-*/report/report.html"))
        assert html and "data:image/png;base64" in html[0].read_text(), name

    # The same pipeline again: every step's output exists, so nothing retrains.
    second = _submit(client, entrypoint=entrypoint, runtime_env=runtime_env)
    assert _wait(client, second, timeout_s=600) == "SUCCEEDED", client.get_job_logs(second)[-4000:]
    again = client.get_job_logs(second)
    for step in ("train", "calibrate", "evaluate", "register"):
        assert any(line.split()[:1] == [step] and "skipped (exists)" in line for line in again.splitlines()), again[-3000:]


def test_pipeline_config_composes_with_cluster_overrides(tmp_path, monkeypatch, dermaid_cli):
    monkeypatch.setenv("DERMAID_HOME", "gs://bucket")
    out = dermaid_cli("pipeline", "experiment=toy", "scaling=gpu4", "pipeline.search=true",
                      "registry.url=gs://bucket/registry", "--cfg", "job", "--resolve", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "gs://bucket/registry" in out.stdout and "num_workers: 4" in out.stdout


def test_search_pipeline_reports_on_the_best_trial_run_dir(tmp_path, monkeypatch):
    """pipeline.search=true: tune writes into the train step's folder, and the training report reads the best
    trial's run directory (the tuning directory has no history.csv / summary.json of its own)."""
    import dermaid.pipeline as pipeline
    import dermaid.reporting.runner as runner
    import dermaid.tuning as tuning
    from dermaid.config import compose, to_plain

    config = to_plain(compose("pipeline", ["experiment=toy", f"paths.root={tmp_path}", "pipeline.search=true",
                                           "pipeline.reports=[train-report,tune-report]"]))
    seen: dict = {}

    def fake_tune(cfg):
        seen["tune_out"] = cfg["out"]
        seen["tune_ray"] = cfg["ray"]
        return {"out": cfg["out"], "best": {"trial_id": "t1", "trial_dir": f"{cfg['out']}/trials/t1"}}

    def fake_report(cfg):
        seen.setdefault("reports", {})[cfg["report"]["name"]] = cfg["params"]
        return cfg["out"]

    monkeypatch.setattr(pipeline, "prepare_data", lambda config: f"{tmp_path}/prepared/v1")
    monkeypatch.setattr(tuning, "tune", fake_tune)
    monkeypatch.setattr(pipeline, "evaluate_model", lambda config, checkpoint, out: {
        "metrics": {"balanced_accuracy": 0.5}, "num_images": 3, "checkpoint": checkpoint})
    monkeypatch.setattr(runner, "build_report_from_config", fake_report)
    monkeypatch.setattr(pipeline, "register_model", lambda checkpoint, *args: {"source": checkpoint})
    monkeypatch.setattr(pipeline, "calibrate_model", lambda config, checkpoint: {"checkpoint": checkpoint})

    summary = pipeline.run_pipeline(config)
    train_dir = summary["steps"]["train"]["out"]
    assert seen["tune_out"] == train_dir and seen["tune_ray"] == config["ray"]
    assert seen["reports"]["train-report"] == {"run_dir": f"{train_dir}/trials/t1"}
    assert seen["reports"]["tune-report"] == {"tune_dir": train_dir}
    assert summary["steps"]["register"]["result"]["source"] == f"{train_dir}/best"
    assert summary["steps"]["calibrate"]["result"]["checkpoint"] == f"{train_dir}/best"  # the search's best copy

    again = pipeline.run_pipeline(config)  # every step's output exists: the recorded run_dir is reused
    assert again["steps"]["train"]["skipped"] and again["steps"]["report:train-report"]["skipped"]


def test_a_missing_data_root_is_said_before_ray_starts(tmp_path, monkeypatch):
    import dermaid.ray_runtime
    from dermaid.config import compose, to_plain
    from dermaid.errors import DermaidError
    from dermaid.pipeline import run_pipeline

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before data.root was checked")

    monkeypatch.setattr(dermaid.ray_runtime, "ensure_ray", no_ray)
    monkeypatch.setattr(dermaid.ray_runtime, "ensure_ray_for", no_ray)
    config = to_plain(compose("pipeline", ["experiment=toy", f"data.root={tmp_path}/nonexistent",
                                           f"pipeline.out={tmp_path}/pipe"]))
    with pytest.raises(DermaidError, match="raw data folder does not exist"):
        run_pipeline(config)
