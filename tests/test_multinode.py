"""More than one Ray node: a 2-node cluster on this machine (ray.cluster_utils.Cluster, 1 CPU per node) trains with
its two workers on both nodes, `dermaid cv` runs two folds at once (one per node), and a node-local run directory is
refused before training with the key to set.

The cluster runs in a child process (this file run as a script): the session's own Ray (conftest's ray_session) is
one per process, and a second Ray started from a Ray process needs RAY_AUTH_MODE=disabled. Placement is certain by
arithmetic, not luck: a worker takes 0.6 CPU and a node has 1, so two workers (or two folds) never share a node.
Local paths stand for shared storage here (both nodes are this machine), which run.shared_storage=true declares.

    .venv/bin/python -m pytest tests/test_multinode.py -q          # ~2-3 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD_TIMEOUT_S = 540
WORKER_CPUS = 0.6  # more than half a node: two workers (or two folds' workers) cannot share one 1-CPU node


@pytest.mark.integration(reason="starts a 2-node Ray cluster in a child process")
def test_two_node_cluster_trains_across_nodes_and_runs_folds_side_by_side(toy_raw, tmp_path):
    prepared = tmp_path / "prepared"
    _prepare_two_folds(toy_raw, prepared)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    child = subprocess.run([sys.executable, __file__, str(prepared), str(tmp_path / "runs")], env=env,
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    lines = [json.loads(line[len("RESULT "):]) for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and lines, child.stdout[-3000:] + child.stderr[-5000:]
    result = lines[-1]
    assert result["nodes"] == 2
    # a node-local out= on a 2-node cluster: refused before training, naming the key
    assert "run.shared_storage=true" in result["refused"] and "2 nodes" in result["refused"]
    assert not result["refused_trained"]
    # one run, two workers, one per node
    assert len(result["worker_nodes"]) == 1 and len(set(result["worker_nodes"][0])) == 2, result
    assert result["train_best_epoch"] == 1
    # `dermaid cv`: both folds at the same time, their workers on different nodes; the OOF covers every image
    assert result["cv_overlap_s"] > 0, result
    assert len(result["cv_worker_nodes"]) == 2 and len(set(result["cv_worker_nodes"])) == 2, result
    assert result["oof_images"] == result["training_images"]


def _prepare_two_folds(toy_raw: str, out: Path) -> None:
    from dermaid.config import compose, to_plain
    from dermaid.data.prepare import prepare_dataset

    data_cfg = to_plain(compose("prepare", [f"data.root={toy_raw}", f"data.prepared_dir={out}", "data.image_size=96",
                                            "data.folds=2"]).data)
    prepare_dataset(data_cfg, out=str(out), tag="toy2", in_process=True)


# --- the child: runs the cluster ---------------------------------------------------------------------------------

def _overrides(prepared: str, out: Path, *extra: str) -> list[str]:
    return ["experiment=toy", f"data.prepared_dir={prepared}", "data.version=toy2", f"out={out}",
            "model.name=resnet10t", "train.image_size=64", "train.epochs=1", "train.max_steps_per_epoch=3",
            "logger=none", "ray.address=auto", f"scaling.cpus_per_worker={WORKER_CPUS}", *extra]


def _worker_groups(size: int) -> list[list[str]]:
    """The nodes of the training workers of each worker group of `size` workers this cluster ran, from the placement
    groups Ray Train reserved (the GCS keeps removed ones, with the node of every bundle)."""
    from dermaid.ray_compat import placement_group_table

    groups = []
    for record in placement_group_table():
        bundles = [b for b in record.bundles if abs(b.unit_resources.get("CPU", 0) - WORKER_CPUS) < 1e-6]
        if bundles and len(bundles) == len(record.bundles) == size:
            groups.append([b.node_id.hex() for b in bundles])
    return groups


def _child(prepared: str, runs: str) -> dict:
    import time

    import ray
    from ray.cluster_utils import Cluster

    from dermaid.config import compose
    from dermaid.errors import DermaidError
    from dermaid.training.cv import cross_validate
    from dermaid.training.driver import train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address)
    result: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    runs_dir = Path(runs)
    try:
        train_overrides = ["scaling.num_workers=2", "scaling.placement_strategy=SPREAD"]
        refused = runs_dir / "refused"
        try:
            train(compose("train", _overrides(prepared, refused, *train_overrides)))
            result["refused"] = ""
        except DermaidError as exc:
            result["refused"] = str(exc)
        result["refused_trained"] = (refused / "summary.json").exists() or (refused / "ray").exists()

        shared = runs_dir / "shared"
        summary = train(compose("train", _overrides(prepared, shared, *train_overrides, "run.shared_storage=true")))
        result["train_best_epoch"] = summary["best_epoch"]
        result["worker_nodes"] = _worker_groups(2)

        cv_out = runs_dir / "cv"
        started = time.time()
        cv = cross_validate(compose("cv", _overrides(prepared, cv_out, "scaling.num_workers=1", "run.shared_storage=true",
                                                     "cv.max_concurrent=2", "cv.bootstrap=50", "cv.ensemble=false")))
        trials = {fold: json.loads((cv_out / f"fold-{fold}" / "cv_trial.json").read_text()) for fold in (0, 1)}
        result["cv_overlap_s"] = (min(t["finished"] for t in trials.values())
                                  - max(t["started"] for t in trials.values()))
        result["cv_trial_nodes"] = {fold: t["node_id"] for fold, t in trials.items()}
        result["cv_worker_nodes"] = [nodes[0] for nodes in _worker_groups(1)]
        result["cv_seconds"] = time.time() - started
        result["oof_images"] = cv["oof"]["num_images"]
        from dermaid.data.loading import load_records, resolve_version

        records = load_records(resolve_version(prepared, "toy2"), with_images=False, columns=["image_id", "fold"])
        result["training_images"] = int((records["fold"] >= 0).sum())
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(_child(sys.argv[1], sys.argv[2])), flush=True)
