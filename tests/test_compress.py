"""dermaid.compress: distillation on Ray Train, ONNX Runtime int8 quantization, ONNX/TorchScript export,
the Predictor loaders for every artifact kind, and the compression table script (tiny settings).

The teacher is conftest's trained_run: a real resnet10t trained for a few epochs in-process (no Ray cluster)
on the session's toy set at 64 px, so its predictions are decisive enough to compare artifacts on.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dermaid.config import compose
from dermaid.errors import DermaidError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def teacher(trained_run) -> str:
    """A trained resnet10t checkpoint (64 px, metadata branch) whose card names the toy version: conftest's
    trained_run (read-only; artifacts go elsewhere)."""
    return f"{trained_run}/best"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Where this module's artifacts go (the table script reuses them from work/artifacts/)."""
    return tmp_path_factory.mktemp("compress")


def _data_overrides(toy_prepared: str) -> list[str]:
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    return [f"data.prepared_dir={prepared_dir}", f"data.version={version}"]


def _val_top1(url: str, toy_prepared: str) -> np.ndarray:
    """Top-1 class of every toy validation image through Predictor (the Serve path) for any artifact kind."""
    from dermaid.data.loading import load_records
    from dermaid.data.torch_dataset import create_eval_loader
    from dermaid.inference import Predictor

    predictor = Predictor(url)
    val = load_records(toy_prepared, split="val", fold=0)
    top = [predictor.forward(images, metadata).argmax(1) for images, metadata, _ in
           create_eval_loader(val, predictor.input_spec, batch_size=16)]
    return np.concatenate(top)


# ---------------------------------------------------------------------------------------------
# Distillation


def test_distillation_loss_and_teacher_adapter():
    from dermaid.compress.distill import DistillationLoss, TeacherModel
    from dermaid.models.classifier import create_classifier, resolve_input_spec

    torch.manual_seed(0)
    logits, labels = torch.randn(6, 8, requires_grad=True), torch.randint(0, 8, (6,))
    hard = torch.nn.CrossEntropyLoss()
    assert DistillationLoss(hard, 0.0, 4.0)(logits, labels, torch.randn(6, 8)).item() == pytest.approx(
        hard(logits, labels).item())
    kd = DistillationLoss(hard, 1.0, 4.0)
    assert kd(logits, labels, logits.detach()).item() == pytest.approx(0.0, abs=1e-6)  # student = teacher
    teacher_logits = torch.randn(6, 8) * 3
    kd(logits, labels, teacher_logits).backward()  # the gradient pulls the student towards the teacher
    step = logits - 10 * logits.grad
    assert kd(step, labels, teacher_logits) < kd(logits, labels, teacher_logits)

    model = create_classifier({"name": "resnet10t", "use_metadata": False}).eval()
    teacher_spec = resolve_input_spec(model, 64)
    student_spec = {**teacher_spec, "input_size": [3, 48, 48], "mean": [0.5] * 3, "std": [0.25] * 3}
    adapter = TeacherModel(model, student_spec, teacher_spec).train()
    assert not adapter.model.training and not any(p.requires_grad for p in adapter.parameters())
    raw = torch.rand(2, 3, 48, 48)  # (B, 3, H, W) in [0, 1]
    student_view = (raw - 0.5) / 0.25
    teacher_view = torch.nn.functional.interpolate(
        (raw - torch.tensor(teacher_spec["mean"]).view(1, 3, 1, 1)) / torch.tensor(teacher_spec["std"]).view(1, 3, 1, 1),
        size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(adapter(student_view), model(teacher_view), atol=1e-4, rtol=1e-4)


def test_distill_refuses_a_teacher_with_other_classes(teacher, toy_prepared, tmp_path):  # before Ray starts
    from dermaid.training.driver import train

    bad = tmp_path / "other-classes"
    shutil.copytree(teacher, bad)
    card = json.loads((bad / "card.json").read_text())
    card["classes"] = list(reversed(card["classes"]))
    (bad / "card.json").write_text(json.dumps(card))
    cfg = compose("distill", ["experiment=toy", f"teacher={bad}", f"out={tmp_path / 'student'}",
                              *_data_overrides(toy_prepared)])
    with pytest.raises(DermaidError, match="teacher predicts classes .* same order"):
        train(cfg)
    assert not (tmp_path / "student" / "best").exists()


def test_one_epoch_distillation_gives_a_working_student(teacher, toy_prepared, work, ray_session):
    from dermaid.compress.distill import run_distill
    from dermaid.inference import Predictor
    from dermaid.models.card import load_card

    out = work / "student"
    summary = run_distill(compose("distill", [
        "experiment=toy", f"teacher={teacher}", "model.name=mobilenetv3_small_050", f"out={out}",
        "train.epochs=1", "train.image_size=64", "train.batch_size=16", "distill.alpha=0.7",
        *_data_overrides(toy_prepared)]))
    card = load_card(str(out / "best"))
    assert card.teacher == teacher and card.model_name == "mobilenetv3_small_050"
    assert card.config["distill"]["alpha"] == 0.7 and card.kind == "float"
    assert summary["best_metrics"]["val/balanced_accuracy"] >= 0.0 and np.isfinite(summary["best_metrics"]["val/loss"])
    probs = Predictor(str(out / "best")).forward(torch.randn(3, 3, 64, 64))
    assert probs.shape == (3, 8) and np.allclose(probs.sum(1), 1.0)


# ---------------------------------------------------------------------------------------------
# Quantization and export: every artifact loads through Predictor and agrees with the float model


@pytest.mark.parametrize("variant", ["int8_static", "int8_dynamic", "onnx", "torchscript"])
def test_artifacts_load_and_agree_with_the_float_model(variant, teacher, toy_prepared, work, capsys):
    from dermaid.compress.export import run_export
    from dermaid.compress.quantize import run_quantize
    from dermaid.models.card import load_card

    out = work / "artifacts" / "teacher" / variant
    if variant.startswith("int8"):
        method = variant.split("_")[1]
        result = run_quantize(compose("quantize", [f"checkpoint={teacher}", f"out={out}", f"method={method}",
                                                   "calibration_images=96", *_data_overrides(toy_prepared)]))
        kind = f"quantized_{method}"
        assert result["agreement_top1"] >= 0.95 and result["bytes"] < 0.5 * result["float_bytes"]
        assert abs(result["balanced_accuracy"] - result["float/balanced_accuracy"]) <= 0.1
    else:
        result = run_export(compose("export", [f"checkpoint={teacher}", f"out={out}", f"format={variant}"]))
        kind = variant
        assert "max abs logit difference" in capsys.readouterr().out and result["max_abs_diff"] < 1e-3
    card = load_card(str(out))
    assert card.kind == kind and card.compression_source == teacher
    assert card.input == load_card(teacher).input

    agreement = float((_val_top1(str(out), toy_prepared) == _val_top1(teacher, toy_prepared)).mean())
    assert agreement >= 0.95, f"{variant}: top-1 agreement {agreement:.3f}"


def test_compressing_an_artifact_again_is_refused(teacher, work, toy_prepared):
    from dermaid.compress.export import run_export
    from dermaid.compress.quantize import run_quantize

    quantized = work / "artifacts" / "teacher" / "int8_static"
    if not (quantized / "card.json").exists():
        pytest.skip("needs the int8_static artifact of the test above")
    with pytest.raises(DermaidError, match="quantized_static artifact already"):
        run_quantize(compose("quantize", [f"checkpoint={quantized}", f"out={work / 'again'}",
                                          *_data_overrides(toy_prepared)]))
    with pytest.raises(DermaidError, match="quantized_static artifact already"):
        run_export(compose("export", [f"checkpoint={quantized}", f"out={work / 'again'}"]))
    assert not (work / "again").exists()


def test_quantize_and_export_reject_bad_options(teacher, tmp_path):
    from dermaid.compress.export import run_export
    from dermaid.compress.quantize import run_quantize

    with pytest.raises(DermaidError, match="method='fast'"):
        run_quantize(compose("quantize", [f"checkpoint={teacher}", "method=fast", f"out={tmp_path / 'q'}"]))
    with pytest.raises(DermaidError, match="format='tflite'"):
        run_export(compose("export", [f"checkpoint={teacher}", "format=tflite", f"out={tmp_path / 'e'}"]))
    with pytest.raises(DermaidError, match="checkpoint= is required"):
        run_export(compose("export"))
    with pytest.raises(DermaidError, match="not a DermAID checkpoint"):
        run_export(compose("export", [f"checkpoint={tmp_path / 'missing'}", f"out={tmp_path / 'e'}"]))


# ---------------------------------------------------------------------------------------------
# The trade-off table


def test_compression_table_script_runs(teacher, toy_prepared, work):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import compression_table
    finally:
        sys.path.pop(0)
    student = work / "student" / "best"
    args = [f"checkpoint={teacher}", f"out={work}", "rounds=1", "iters=2", "val_limit=24",
            "variants=float,int8_static,torchscript", *_data_overrides(toy_prepared)]
    if (student / "card.json").exists():
        args += [f"student={student}", "student_variants=float"]
    table = compression_table.main(args)
    assert list(table["model"][:3]) == ["teacher float", "teacher int8_static", "teacher torchscript"]
    assert (table[["b1 ms", "b8 ms", "file MB"]] > 0).all().all() and table["balanced acc"].between(0, 1).all()
    assert table.loc[0, "speed-up b1"] == pytest.approx(1.0) and table.loc[0, "agreement"] == 1.0
    assert table.loc[1, "file MB"] < 0.5 * table.loc[0, "file MB"]  # int8 weights
    markdown = (work / "compression_table.md").read_text()
    assert markdown.startswith("| model |") and "teacher int8_static" in markdown
    assert (work / "compression_table.csv").read_text().count("\n") == len(table) + 1
