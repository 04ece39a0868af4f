"""Backbone weights from a file or URL (`model.pretrained_file=`), strict about the architecture; unknown
backbone names answered with close names. Real timm models (pretrained=false: no hub here); the weights
files are state dicts saved locally (torch and safetensors) or in fsspec's memory://.

    .venv/bin/python -m pytest -q tests/test_pretrained.py
"""

from __future__ import annotations

import fsspec
import pytest
import safetensors.torch
import timm
import torch

from dermaid.errors import DermaidError
from dermaid.models.card import load_float_model, load_state_dict, save_checkpoint
from dermaid.models.classifier import PretrainedFileError, create_classifier, read_pretrained_file


def _timm_weights(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """What a timm hub file holds: the whole ImageNet model's state dict, its 1000-class classifier included."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).state_dict()


def _same_backbone(model, weights: dict[str, torch.Tensor]) -> bool:
    own = model.backbone.state_dict()
    return all(torch.equal(own[k], weights[k]) for k in own)


def test_backbone_weights_load_from_a_local_file_and_the_head_stays_new(tmp_path):
    weights = _timm_weights("resnet10t")
    path = tmp_path / "resnet10t.pth"
    torch.save(weights, path)
    torch.manual_seed(0)
    model = create_classifier({"name": "resnet10t", "pretrained": True, "pretrained_file": str(path)})  # file wins: no hub
    assert _same_backbone(model, weights)
    assert "fc.weight" in weights and model.head.out_features == 8  # the ImageNet classifier was dropped
    torch.manual_seed(0)
    plain = create_classifier({"name": "resnet10t"})
    assert not _same_backbone(plain, weights)  # ... so the loaded weights are the file's, not an equal init
    assert torch.equal(model.head.weight, plain.head.weight)  # the head and metadata branch keep their fresh init


def test_wrapped_safetensors_memory_url_and_dermaid_checkpoint_files(tmp_path):
    weights = _timm_weights("resnet10t", seed=2)
    # timm's train.py checkpoint: {"arch", "state_dict", ...} saved from a DDP model ("module." prefixes)
    wrapped = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "resnet10t", "epoch": 3, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, wrapped)
    assert _same_backbone(create_classifier({"name": "resnet10t", "pretrained_file": str(wrapped)}), weights)

    tensors = tmp_path / "model.safetensors"  # what the hub's timm/ repositories hold
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, str(tensors), metadata={"arch": "resnet10t"})
    with fsspec.open("memory://weights/resnet10t.safetensors", "wb") as f:  # any fsspec URL
        f.write(tensors.read_bytes())
    try:
        model = create_classifier({"name": "resnet10t", "pretrained_file": "memory://weights/resnet10t.safetensors"})
        assert _same_backbone(model, weights)
        assert read_pretrained_file("memory://weights/resnet10t.safetensors")[1] == "resnet10t"
    finally:
        fsspec.filesystem("memory").rm("/weights", recursive=True)

    # a DermAID checkpoint's model.pt: its backbone part, named by the card beside it
    source = create_classifier({"name": "resnet10t"})
    from dermaid.models.card import build_card
    from dermaid.models.classifier import resolve_input_spec

    ckpt = str(tmp_path / "best")
    save_checkpoint(ckpt, build_card({"name": "resnet10t", "use_metadata": True}, resolve_input_spec(source, 64)),
                    source.state_dict())
    reused = create_classifier({"name": "resnet10t", "pretrained_file": f"{ckpt}/model.pt"})
    assert all(torch.equal(reused.backbone.state_dict()[k], v) for k, v in source.backbone.state_dict().items())
    with pytest.raises(PretrainedFileError, match=r"architecture 'resnet10t'.*not of model.name='mobilenetv3_small_050'"):
        create_classifier({"name": "mobilenetv3_small_050", "pretrained_file": f"{ckpt}/model.pt"})


def test_a_file_of_another_architecture_is_refused_naming_both(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"arch": "resnet18", "state_dict": _timm_weights("resnet18")}, path)
    with pytest.raises(PretrainedFileError) as info:
        create_classifier({"name": "resnet10t", "pretrained_file": str(path)})
    message = str(info.value)
    assert "architecture 'resnet18'" in message and "model.name='resnet10t'" in message and str(path) in message
    assert "of another shape" in message or "missing" in message or "unexpected" in message  # what differs

    bare = tmp_path / "bare.pth"  # a bare state dict names no architecture: described by its contents
    torch.save(_timm_weights("mobilenetv3_small_050"), bare)
    with pytest.raises(PretrainedFileError, match=r"an architecture the file does not name \(\d+ tensors.*"
                                                  r"'resnet10t' \(\d+ tensors"):
        create_classifier({"name": "resnet10t", "pretrained_file": str(bare)})


def test_missing_or_foreign_pretrained_files_are_clear_errors(tmp_path):
    with pytest.raises(PretrainedFileError, match="no such file"):
        create_classifier({"name": "resnet10t", "pretrained_file": str(tmp_path / "nope.pth")})
    junk = tmp_path / "notes.txt"
    junk.write_text("not weights")
    with pytest.raises(PretrainedFileError, match="not a weights file"):
        create_classifier({"name": "resnet10t", "pretrained_file": str(junk)})


def test_loading_a_checkpoint_never_reads_its_pretrained_file_or_the_hub(tmp_path):
    """The card's model block keeps `pretrained: true` and the file's URL; the checkpoint's weights replace them."""
    from dermaid.models.card import build_card
    from dermaid.models.classifier import resolve_input_spec

    model_cfg = {"name": "resnet10t", "pretrained": True, "pretrained_file": str(tmp_path / "gone.pth"),
                 "use_metadata": True}
    net = create_classifier({**model_cfg, "pretrained": False, "pretrained_file": None})
    save_checkpoint(str(tmp_path / "best"), build_card(model_cfg, resolve_input_spec(net, 64)), net.state_dict())
    loaded, card = load_float_model(str(tmp_path / "best"))
    assert card.model["pretrained_file"].endswith("gone.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in load_state_dict(str(tmp_path / "best")).items())


def test_an_unknown_backbone_lists_close_names():
    with pytest.raises(DermaidError, match=r"model.name='efficientnet_b9'.*close names: .*efficientnet_b8"):
        create_classifier({"name": "efficientnet_b9"})
    with pytest.raises(DermaidError, match=r"close names: .*convnextv2_nano"):
        create_classifier({"name": "convnext2_nano"})
    with pytest.raises(DermaidError, match=r"close names: eva02_small_patch14_224"):
        create_classifier({"name": "eva02_small"})  # a prefix of real names


def test_train_refuses_an_unknown_backbone_or_missing_weights_file_before_any_work(tmp_path, dermaid_cli):
    bad = dermaid_cli("train", "experiment=toy", "model.name=efficentnet_b0", f"out={tmp_path / 'a'}",
                      f"data.root={tmp_path / 'no-data'}", cwd=tmp_path)
    assert bad.returncode == 2 and "close names: efficientnet_b0" in bad.stderr and "Traceback" not in bad.stderr
    missing = dermaid_cli("train", "experiment=toy", f"model.pretrained_file={tmp_path / 'w.pth'}",
                          f"out={tmp_path / 'b'}", f"data.root={tmp_path / 'no-data'}", cwd=tmp_path)
    assert missing.returncode == 2 and "model.pretrained_file=" in missing.stderr and "no such file" in missing.stderr
    torch.save(_timm_weights("resnet10t"), tmp_path / "resnet10t.pth")
    other = dermaid_cli("train", "experiment=toy", f"model.pretrained_file={tmp_path / 'resnet10t.pth'}",
                        f"out={tmp_path / 'c'}", f"data.root={tmp_path / 'no-data'}", cwd=tmp_path)
    assert other.returncode == 2 and "model.name='mobilenetv3_small_050'" in other.stderr, other.stderr
    assert "Traceback" not in other.stderr
    for run in ("a", "b", "c"):
        assert not (tmp_path / run).exists()  # refused before the run directory or any data work
