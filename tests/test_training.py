"""Training on Ray Train: the toy run learns, writes cards and history, resumes after a worker
failure, fine-tunes from a checkpoint; sharded reading, the plain-torch loop, bad input."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from dermaid.classes import CLASS_CODES, NUM_CLASSES
from dermaid.config import compose, to_plain
from dermaid.errors import DermaidError
from dermaid.models.card import CheckpointError, build_card, load_card, load_state_dict, save_checkpoint
from dermaid.models.classifier import create_classifier, resolve_input_spec
from dermaid.training import loop
from dermaid.training.history import read_history


def _train_overrides(toy_prepared: str, out, *extra: str) -> list[str]:
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    return ["experiment=toy", f"data.prepared_dir={prepared_dir}", f"data.version={version}", f"out={out}",
            "train.image_size=64", *extra]


# ---------------------------------------------------------------------------------------------
# The run directory of a real toy run (conftest's toy_run: 3 epochs, 1 worker)


def test_toy_run_writes_checkpoints_cards_history_and_summary(toy_run, toy_prepared):
    run = Path(toy_run)
    for name in ("best", "last"):
        assert (run / name / "card.json").exists() and (run / name / "model.pt").exists()
    card = load_card(str(run / "best"))
    assert card.class_codes == CLASS_CODES
    assert card.input["input_size"] == [3, 64, 64] and len(card.input["mean"]) == 3
    assert card.uses_metadata is True and card.model_name == "resnet10t"
    assert card.dataset_version == toy_prepared.rstrip("/").rsplit("/", 1)[-1]
    assert card.dataset_versions == [card.dataset_version]
    assert 0.05 <= card.temperature <= 20.0
    assert card.metrics["val/balanced_accuracy"] is not None and "confusion_matrix" in card.metrics["val"]
    assert card.config["train"]["epochs"] == 3 and card.code_version
    history = read_history(toy_run)
    assert history["epoch"].tolist() == [1, 2, 3]
    for column in ("train/loss", "val/loss", "val/balanced_accuracy", "val/auc_macro", "val/ece", "val/nll",
                   "val/nll_calibrated", "val/temperature", "lr", "seconds"):
        assert column in history and history[column].notna().all(), column
    assert load_card(str(run / "last")).epoch == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == card.epoch and summary["dataset_version"] == card.dataset_version
    assert (run / "config.yaml").exists()
    # the best card is the epoch with the highest val/balanced_accuracy
    assert card.metrics["val/balanced_accuracy"] == pytest.approx(history["val/balanced_accuracy"].max(), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 2 Ray workers (DDP over gloo) learn; a worker failure resumes from the saved epoch


def test_two_workers_learn_and_resume_after_a_worker_failure(ray_session, toy_prepared, tmp_path):
    from dermaid.training.driver import train
    from dermaid.training.worker import FAIL_MARKER

    out = tmp_path / "run"
    summary = train(compose("train", _train_overrides(
        toy_prepared, out, "model.name=resnet10t", "train.epochs=4", "train.batch_size=8", "train.fail_at_epoch=3",
        "run.max_failures=1",
        "scaling.num_workers=2", "logger=wandb", "logger.mode=offline")))
    assert (out / FAIL_MARKER).exists()  # the failure really happened
    history = read_history(str(out))
    assert history["epoch"].tolist() == [1, 2, 3, 4]  # no epoch repeated, none lost
    # epochs 1-2 ran in the first attempt; the restarted worker group went on from epoch 3
    assert history["attempt"].tolist() == [1, 1, 2, 2]
    assert summary["last_epoch"] == 4
    best = summary["best_metrics"]["val/balanced_accuracy"]
    assert best >= 0.35, f"2-worker toy training did not learn: balanced accuracy {best:.3f} (chance 0.125)"
    assert history["train/loss"].iloc[-1] < history["train/loss"].iloc[0]
    # Ray's own checkpoints: best-2 by score plus the latest, each a DermAID checkpoint too
    ray_checkpoints = sorted(p for p in (out / "ray").glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(ray_checkpoints) <= 3
    assert all((c / "card.json").exists() and (c / "train_state.pt").exists() for c in ray_checkpoints)
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run kept under the run directory"


def test_fine_tune_from_a_checkpoint_lists_both_dataset_versions(ray_session, toy_run, toy_prepared, tmp_path):
    from dermaid.training.driver import train

    source = tmp_path / "source"
    shutil.copytree(Path(toy_run) / "best", source)
    card = json.loads((source / "card.json").read_text())
    card["dataset_versions"] = ["00000000000000aa"]  # as if trained on another version
    (source / "card.json").write_text(json.dumps(card))
    out = tmp_path / "finetune"
    ctrl_c_handler = signal.getsignal(signal.SIGINT)
    summary = train(compose("train", _train_overrides(
        toy_prepared, out, f"train.init_from={source}", "train.epochs=1", "optim.lr=1e-9",
        "optim.warmup_epochs=0", "scaling.num_workers=1", "logger=none")))
    assert signal.getsignal(signal.SIGINT) is ctrl_c_handler  # Ray Train's own Ctrl-C handler is gone again
    new_card = load_card(str(out / "last"))
    assert new_card.dataset_versions == ["00000000000000aa", card["dataset_version"]]
    assert new_card.model_name == card["model"]["name"] and new_card.input == card["input"]
    assert summary["dataset_versions"] == new_card.dataset_versions
    # it started from the checkpoint's weights (a near-zero learning rate leaves them in place)
    before, after = load_state_dict(str(source)), load_state_dict(str(out / "last"))
    weights = [k for k in before if "running_" not in k and "num_batches" not in k]
    assert weights and all(torch.allclose(before[k], after[k], atol=1e-5) for k in weights)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before any worker starts


def test_missing_or_misfit_fine_tune_checkpoint_is_a_clear_error(toy_prepared, tmp_path):
    from dermaid.training.driver import build_trainer

    with pytest.raises(CheckpointError, match="not a DermAID checkpoint"):
        build_trainer(compose("train", _train_overrides(toy_prepared, tmp_path / "a", f"train.init_from={tmp_path}/nope")))
    # weights of a resnet10t under a card that claims another architecture
    model_cfg = {"name": "resnet10t", "pretrained": False, "use_metadata": True}
    model = create_classifier(model_cfg)
    wrong = tmp_path / "wrong"
    save_checkpoint(str(wrong), build_card({**model_cfg, "name": "test_resnet"}, resolve_input_spec(model, 64)),
                    model.state_dict())
    with pytest.raises(CheckpointError, match="do not fit architecture 'test_resnet'"):
        build_trainer(compose("train", _train_overrides(toy_prepared, tmp_path / "b", f"train.init_from={wrong}")))
    (wrong / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="unreadable weights"):
        build_trainer(compose("train", _train_overrides(toy_prepared, tmp_path / "c", f"train.init_from={wrong}")))


def test_an_out_dir_holding_another_model_is_refused(trained_run, toy_prepared):
    from dermaid.training.driver import build_trainer

    with pytest.raises(DermaidError, match="holds a run of model 'resnet10t'"):
        build_trainer(compose("train", _train_overrides(toy_prepared, trained_run, "model.name=test_resnet")))


def test_bad_fold_and_bad_version_are_clear_errors(toy_prepared, tmp_path):
    from dermaid.training.driver import build_trainer

    with pytest.raises(DermaidError, match="fold 7 is out of range"):
        build_trainer(compose("train", _train_overrides(toy_prepared, tmp_path / "a", "data.fold=7")))
    with pytest.raises(DermaidError, match="no dataset version or tag named 'nope'"):
        build_trainer(compose("train", _train_overrides(toy_prepared, tmp_path / "b", "data.version=nope")))


@pytest.mark.parametrize("override, message", [
    ("data.root={tmp}/nonexistent", "raw data folder does not exist"),
    ("data.version=0123456789abcdef", "has no manifest.json"),
])
def test_missing_data_is_a_fast_error_before_ray_starts(override, message, tmp_path, monkeypatch):
    import time

    import dermaid.ray_runtime
    from dermaid.training import driver

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(dermaid.ray_runtime, "ensure_ray", no_ray)  # what a prepare would start Ray with
    monkeypatch.setattr(driver, "ensure_ray", no_ray)
    started = time.perf_counter()
    with pytest.raises(DermaidError, match=message):
        driver.train(compose("train", ["experiment=toy", override.format(tmp=tmp_path),
                                       f"data.prepared_dir={tmp_path}/prepared", f"out={tmp_path}/run"]))
    assert time.perf_counter() - started < 20  # no local Ray start (tens of seconds on a busy machine)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_wrong_or_missing_config_key_fails_at_start_with_its_name(tmp_path):
    from dermaid.training.driver import build_trainer

    cfg = to_plain(compose("train", ["experiment=toy", f"out={tmp_path}/run"]))
    del cfg["train"]["epochs"]
    cfg["optim"]["lr"] = "fast"
    cfg["model"]["metadata_dropuot"] = 0.1
    with pytest.raises(DermaidError) as info:
        build_trainer(cfg)
    assert "train.epochs: Field required" in str(info.value) and "optim.lr" in str(info.value)
    assert "model.metadata_dropuot" in str(info.value)
    with pytest.raises(DermaidError, match="train.imbalance"):
        build_trainer(compose("train", ["experiment=toy", "train.imbalance=oversample", f"out={tmp_path}/run"]))


def test_a_bad_loss_hook_is_a_clear_error():
    from dermaid.training.hooks import load_loss_hook

    with pytest.raises(DermaidError, match="expected 'package.module:Class'"):
        load_loss_hook("dermaid.compress.distill")
    with pytest.raises(DermaidError, match="cannot be imported"):
        load_loss_hook("dermaid.compress.distill:NoSuchHook")
    with pytest.raises(DermaidError, match="not a loss hook"):
        load_loss_hook("dermaid.compress.distill:DistillationLoss")
    assert load_loss_hook("dermaid.compress.distill:DistillationHook").section == "distill"


def test_training_modules_do_not_import_compress():
    import subprocess
    import sys

    code = ("import sys, dermaid.training.driver, dermaid.training.worker, dermaid.training.hooks; "
            "bad = [m for m in sys.modules if m.startswith('dermaid.compress')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# ---------------------------------------------------------------------------------------------
# Sharded reading: each worker reads only its block


def test_each_worker_reads_its_own_block_and_not_every_image(toy_prepared):
    from dermaid.data.loading import load_records
    from dermaid.data.torch_dataset import read_worker_records

    full = load_records(toy_prepared, "train", 0, with_images=False)
    parts = [read_worker_records(toy_prepared, "train", 0, rank, 2) for rank in range(2)]
    ids = [set(records["image_id"]) for records, _ in parts]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(full["image_id"])
    total_rows = sum(parts[0][1]["class_counts"]) + len(load_records(toy_prepared, "val", 0, with_images=False)) \
        + len(load_records(toy_prepared, "test", 0, with_images=False))
    for records, info in parts:
        assert info["num_total"] == len(full) and abs(info["num_rank"] - len(full) / 2) <= 1
        assert info["rows_read"] < total_rows  # only the row groups holding this block were read
        assert records["image"].map(len).min() > 100  # JPEG bytes, not placeholders
    assert parts[0][1]["class_counts"] == np.bincount(full["label_idx"], minlength=NUM_CLASSES).tolist()


# ---------------------------------------------------------------------------------------------
# loop.py: plain torch


def test_cosine_schedule_warms_up_then_decays():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = loop.create_cosine_schedule(optimizer, total_steps=100, warmup_steps=10, min_lr_ratio=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < 0.2 and max(lrs) == pytest.approx(1.0) and int(np.argmax(lrs)) == 10
    assert lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_class_weights_favour_rare_classes():
    weights = loop.compute_class_weights([100, 10, 0, 1], power=1.0)
    assert weights[2] == 0 and weights[3] > weights[1] > weights[0]
    assert weights[[0, 1, 3]].mean() == pytest.approx(1.0)


def test_tta_views_are_the_dihedral_group():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = loop.tta_views(x, 8)
    assert len(views) == 8 and len({v.flatten().tolist().__str__() for v in views}) == 8
    assert len(loop.tta_views(x, 0)) == 1
    with pytest.raises(ValueError, match="tta=3"):
        loop.tta_views(x, 3)


def test_train_one_epoch_learns_a_separable_toy_problem():
    loop.set_seed(0)
    model = create_classifier({"name": "test_resnet", "use_metadata": True, "drop_rate": 0.0})
    images = torch.randn(64, 3, 32, 32)
    labels = torch.arange(64) % NUM_CLASSES
    metadata = torch.zeros(64, 14)
    metadata[torch.arange(64), labels] = 1.0  # the label is written in the metadata vector
    batches = [(images[i:i + 16], metadata[i:i + 16], labels[i:i + 16]) for i in range(0, 64, 16)]
    optimizer = loop.create_optimizer(model, 1e-2, 0.0)
    losses = [loop.train_one_epoch(model, batches, optimizer, None, torch.nn.CrossEntropyLoss(),
                                   torch.device("cpu"))["loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    probs = loop.predict_probabilities(model, batches, device="cpu")
    assert probs.shape == (64, NUM_CLASSES) and np.allclose(probs.sum(1), 1.0)
    assert (probs.argmax(1) == labels.numpy()).mean() > 0.8


def test_amp_and_channels_last_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loop.resolve_amp_dtype("auto", cpu) is None and loop.resolve_amp_dtype("bf16", cpu) == torch.bfloat16
    assert loop.resolve_amp_dtype("fp16", cuda) == torch.float16 and loop.resolve_amp_dtype("off", cuda) is None
    assert loop.resolve_channels_last("auto", cpu) is False and loop.resolve_channels_last("auto", cuda) is True
    with pytest.raises(ValueError, match="train.amp"):
        loop.resolve_amp_dtype("fp8", cpu)


def test_loop_module_imports_without_ray_pandas_or_hydra():
    import subprocess
    import sys

    code = ("import sys, dermaid.training.loop, dermaid.models.classifier; "
            "bad = [m for m in ('ray', 'pandas', 'hydra', 'omegaconf', 'sklearn') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_benchmark_runs_its_training_step_on_cpu():
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "train_throughput.py"), "--no-ray", "--model",
                           "test_resnet", "--size", "32", "--batch", "8", "--steps", "3", "--warmup", "1"],
                          capture_output=True, text=True, check=True, cwd="/")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["plain_images_per_s"] > 0 and result["ray_over_plain"] is None and result["device"] == "cpu"


def test_train_config_defaults_resolve():
    cfg = to_plain(compose("train", ["experiment=toy"]))
    assert cfg["scaling"] == {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5, "placement_strategy": "PACK"}
    assert cfg["model"]["name"] == "mobilenetv3_small_050" and cfg["train"]["torch_threads"] == 1
    assert cfg["train"]["imbalance"] == "balanced_sampler"
    finetune = to_plain(compose("train", ["experiment=finetune", "train.init_from=runs/x/best"]))
    assert finetune["train"]["init_from"] == "runs/x/best" and finetune["optim"]["backbone_lr_scale"] < 1
    gpu = to_plain(compose("train", ["scaling=gpu4", "model.name=efficientnet_b3", "data.root=gs://bucket/isic2019"]))
    assert gpu["scaling"]["num_workers"] == 4 and gpu["scaling"]["use_gpu"] is True
    assert gpu["model"]["pretrained"] is True and gpu["data"]["root"] == "gs://bucket/isic2019"
    from dermaid.training.driver import build_scaling_config

    scaling = build_scaling_config(gpu["scaling"])
    assert scaling.num_workers == 4 and scaling.use_gpu and scaling.resources_per_worker == {"CPU": 8.0, "GPU": 1.0}
