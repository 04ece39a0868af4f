"""dermaid.models.card: the typed, versioned model card (format_version checked on load; card.json unchanged)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dermaid.classes import CLASS_CODES
from dermaid.models.card import (CARD_FILE, FORMAT_VERSION, CheckpointError, ModelCard, float_weights_for,
                                 load_card, model_version, save_checkpoint)


def _copy(tiny_checkpoint: str, tmp_path: Path, name: str = "ckpt") -> tuple[Path, dict]:
    target = tmp_path / name
    shutil.copytree(tiny_checkpoint, target)
    return target, json.loads((target / CARD_FILE).read_text())


def test_card_json_round_trips_through_the_typed_record(tiny_checkpoint, tmp_path):
    on_disk = json.loads((Path(tiny_checkpoint) / CARD_FILE).read_text())
    card = load_card(tiny_checkpoint)
    assert on_disk["format_version"] == FORMAT_VERSION == card.format_version
    assert card.to_dict() == on_disk and list(card.to_dict()) == list(on_disk)  # same keys, same order
    assert card.kind == "float" and card.is_float and card.compression_source is None
    assert card.model_name == "test_efficientnet" and card.input_size == (3, 64, 64)
    assert card.temperature == 1.5 and card.uses_metadata and card.class_codes == CLASS_CODES
    assert card.metadata["sexes"] and card.metadata["sites"]
    save_checkpoint(str(tmp_path / "again"), card, artifact_bytes=(Path(tiny_checkpoint) / "model.pt").read_bytes())
    assert json.loads((tmp_path / "again" / CARD_FILE).read_text()) == on_disk
    assert model_version(load_card(str(tmp_path / "again"))) == model_version(card)


def test_a_card_written_before_format_version_loads_as_version_1(tiny_checkpoint, tmp_path):
    target, data = _copy(tiny_checkpoint, tmp_path)
    del data["format_version"]
    (target / CARD_FILE).write_text(json.dumps(data))
    card = load_card(str(target))
    assert card.format_version == 1 and card.model_name == "test_efficientnet"


@pytest.mark.parametrize("version", [2, 999, "1", True])
def test_an_unknown_format_version_names_the_file_and_the_version(tiny_checkpoint, tmp_path, version):
    target, data = _copy(tiny_checkpoint, tmp_path)
    data["format_version"] = version
    (target / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{target / CARD_FILE}: model card format_version {version!r}"):
        load_card(str(target))


def test_unknown_keys_survive_and_a_card_needs_its_model_and_input(tiny_checkpoint, tmp_path):
    target, data = _copy(tiny_checkpoint, tmp_path)
    data["monitoring"] = {"reference": "x"}  # a key a later version might add
    (target / CARD_FILE).write_text(json.dumps(data))
    assert load_card(str(target)).to_dict()["monitoring"] == {"reference": "x"}
    del data["input"]
    with pytest.raises(CheckpointError, match="no 'input' block"):
        ModelCard.from_dict(data, source="somewhere/card.json")


def test_a_derived_artifact_card_names_its_float_source(tiny_checkpoint, tmp_path):
    card = load_card(tiny_checkpoint)
    onnx = card.derived("onnx", "model.onnx", {"source": tiny_checkpoint, "format": "onnx"})
    assert onnx.kind == "onnx" and not onnx.is_float and onnx.compression_source == tiny_checkpoint
    assert onnx.input == card.input and card.kind == "float"  # the source card is unchanged
    save_checkpoint(str(tmp_path / "onnx"), onnx, artifact_bytes=b"x")
    assert list(json.loads((tmp_path / "onnx" / CARD_FILE).read_text()))[-1] == "compression"
    assert float_weights_for(str(tmp_path / "onnx")) == tiny_checkpoint
