"""The published-result recipes (conf/experiment/recipe_*.yaml), layer-wise lr decay and EMA weights.

Fast: each recipe composes with its real backbone and size and names the result it follows; layer-wise
lr decay and EMA on a tiny backbone. Integration (the recipes' real backbones are slow on CPU): each
recipe's `dermaid train experiment=recipe_*` runs one short epoch (two steps) on toy data in this process
(scaling.num_workers=0, pretrained=false, images shrunk to 48 px), validates, and stores the EMA weights
where the recipe keeps an EMA.

    .venv/bin/python -m pytest -q tests/test_recipes.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dermaid.config import compose, conf_dir, to_plain
from dermaid.models.card import load_card, load_state_dict
from dermaid.models.classifier import create_classifier, resolve_input_spec
from dermaid.models.metadata import METADATA_DIM
from dermaid.training import loop
from dermaid.training.worker_config import TrainConfig

RECIPES = sorted(p.stem for p in (conf_dir() / "experiment").glob("recipe_*.yaml"))
# the size each recipe trains at: the point of a recipe, kept by the composed config (tests shrink it)
REAL_SIZES = {"recipe_effnet_siim": 448, "recipe_modern_small": 384, "recipe_daisylab": 300}


def _recipe(name: str, *extra: str) -> dict:
    return to_plain(compose("train", [f"experiment={name}", *extra]))


def test_the_recipes_are_there():
    assert {"recipe_effnet_siim", "recipe_modern_small"} <= set(RECIPES) <= set(REAL_SIZES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_with_its_real_backbone_size_and_published_figure(name):
    cfg = _recipe(name)
    TrainConfig.parse(cfg)  # every key the trainer needs, typed
    assert cfg["train"]["image_size"] == REAL_SIZES[name] and 224 <= REAL_SIZES[name] <= 512
    assert cfg["data"]["image_size"] >= cfg["train"]["image_size"]  # shards hold the crops the recipe takes
    assert cfg["model"]["use_metadata"] is True and cfg["train"]["imbalance"] == "weighted_loss"
    assert cfg["tta"] == 8 and cfg["scaling"]["use_gpu"] is True
    assert cfg["augment"]["cutout"]["p"] > 0 and cfg["augment"]["transpose"] is True  # the SIIM-ISIC set
    recipe = cfg["recipe"]
    assert recipe["name"] == name.removeprefix("recipe_")
    assert "arXiv" in recipe["follows"] or "ISIC 2024" in recipe["follows"]  # which published result
    figures = re.findall(r"\d\.\d+", recipe["figure"])  # and its figure(s), also in the file's comment
    text = (conf_dir() / "experiment" / f"{name}.yaml").read_text()
    comment = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert figures and "Follows" in comment and all(f in comment for f in figures), (figures, comment)
    # `dermaid evaluate experiment=<recipe>` takes the recipe's TTA; the command line still wins
    assert to_plain(compose("evaluate", [f"experiment={name}", "checkpoint=x"]))["tta"] == 8
    assert _recipe(name, "scaling=cpu")["scaling"]["use_gpu"] is False


def test_effnet_recipe_is_an_efficientnet_at_384_to_512_and_modern_small_a_convnextv2_or_eva02():
    siim, modern = _recipe("recipe_effnet_siim"), _recipe("recipe_modern_small")
    assert "efficientnet_b" in siim["model"]["name"] and 384 <= siim["train"]["image_size"] <= 512
    assert modern["model"]["name"].split("_")[0] in ("convnextv2", "eva02") and 224 <= modern["train"]["image_size"] <= 384
    assert modern["optim"]["layer_decay"] and modern["optim"]["ema_decay"]


# ---------------------------------------------------------------------------------------------
# Layer-wise lr decay and EMA (loop.py; timm's implementations)


def _lr_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_layer_decay_lowers_the_lr_of_earlier_backbone_blocks_only():
    model = create_classifier({"name": "resnet10t", "use_metadata": True})
    flat = _lr_by_name(model, loop.create_optimizer(model, 1e-3, 0.05))
    assert set(flat.values()) == {1e-3}
    lrs = _lr_by_name(model, loop.create_optimizer(model, 1e-3, 0.05, backbone_lr_scale=0.5, layer_decay=0.5))
    assert set(lrs) == set(flat)  # every trainable parameter in exactly one group
    assert lrs["head.weight"] == 1e-3 and lrs["metadata_branch.0.weight"] == 1e-3  # the new parts at full lr
    stem, last = lrs["backbone.conv1.0.weight"], lrs["backbone.layer4.0.conv1.weight"]
    assert last == pytest.approx(1e-3 * 0.5)  # the top block: backbone_lr_scale only
    assert stem < lrs["backbone.layer2.0.conv1.weight"] < last  # each earlier stage lower
    assert stem == pytest.approx(last * 0.5 ** 4)  # stem + 4 stages: 4 steps of 0.5 below the top


def test_ema_weights_trail_the_trained_weights():
    torch.manual_seed(0)
    model = create_classifier({"name": "resnet10t", "use_metadata": False})
    optimizer = loop.create_optimizer(model, 1e-2, 0.0)
    scheduler = loop.create_cosine_schedule(optimizer, 20, 0)
    ema = loop.create_ema(model, 0.9)
    assert loop.create_ema(model, None) is None
    start = model.head.weight.detach().clone()
    batch = (torch.randn(2, 3, 24, 24), torch.zeros(2, METADATA_DIM), torch.tensor([0, 3]))  # (B, 3, H, W), (B, M), (B,)
    loop.train_one_epoch(model, [batch] * 3, optimizer, scheduler, torch.nn.CrossEntropyLoss(), torch.device("cpu"), ema=ema)
    trained, averaged = model.head.weight.detach(), ema.module.head.weight.detach()
    assert not torch.equal(averaged, trained) and not torch.equal(averaged, start)
    # an average of the path: closer to where training went than the start is, but not there
    assert 0 < (averaged - trained).norm() < (start - trained).norm()


# ---------------------------------------------------------------------------------------------
# Integration: each recipe trains for one short epoch through `dermaid train`


@pytest.mark.integration(reason="a real training run of each recipe's backbone (in this process, no Ray cluster)")
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_one_short_epoch_and_stores_what_it_validated(name, toy_prepared, tmp_path, dermaid_cli):
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    out = tmp_path / "run"
    result = dermaid_cli(
        "train", f"experiment={name}", "scaling=cpu", "scaling.num_workers=0", "logger=none", "model.pretrained=false",
        f"data.prepared_dir={prepared_dir}", f"data.version={version}", f"out={out}", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.batch_size=4", "train.image_size=48", "train.loader_workers=0",
        "train.torch_threads=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    card = load_card(str(out / "best"))
    assert card.model_name == _recipe(name)["model"]["name"] and card.config["recipe"]["name"] in name
    assert card.input["input_size"] == [3, 48, 48] and card.metrics["val/balanced_accuracy"] is not None
    assert Path(out, "config.yaml").read_text().count("recipe:") == 1
    if card.config["optim"]["ema_decay"]:  # the stored weights are the EMA's: not the raw ones' BatchNorm-free twin
        assert card.config["optim"]["ema_decay"] == _recipe(name)["optim"]["ema_decay"]


def test_checkpoint_stores_the_ema_weights_and_resume_restores_both(tmp_path):
    """worker.py with an EMA: model.pt (what best/, last/ and Serve load) holds the EMA weights, Ray's train
    state the raw ones; resuming puts each back where it was."""
    import ray.train  # the Checkpoint class only: no Ray started

    from dermaid.models.card import build_card
    from dermaid.training import worker

    def trainee() -> worker._Trainee:
        torch.manual_seed(0)
        model = create_classifier({"name": "resnet10t", "use_metadata": True})
        optimizer = loop.create_optimizer(model, 1e-2, 0.0)
        return worker._Trainee(
            ddp_model=model, model=model, input_spec={}, train_loader=None, val_loader=None, optimizer=optimizer,
            scheduler=loop.create_cosine_schedule(optimizer, 10, 0), scaler=None, loss_fn=torch.nn.CrossEntropyLoss(),
            teacher=None, card_fields={}, device=torch.device("cpu"), amp_dtype=None, channels_last=False,
            ema=loop.create_ema(model, 0.5))

    first = trainee()
    batch = (torch.randn(2, 3, 24, 24), torch.zeros(2, METADATA_DIM), torch.tensor([0, 3]))  # (B, 3, H, W), (B, M), (B,)
    loop.train_one_epoch(first.model, [batch] * 3, first.optimizer, first.scheduler, first.loss_fn, first.device,
                         ema=first.ema)
    assert first.kept is first.ema.module
    raw, averaged = first.model.state_dict(), first.ema.module.state_dict()
    assert not torch.equal(raw["head.weight"], averaged["head.weight"])
    card = build_card({"name": "resnet10t", "use_metadata": True}, resolve_input_spec(first.model, 24))
    state = {"epoch": 1, "best_score": 0.5, "best_epoch": 1, "bad_epochs": 0, "history": [], "attempt": 1}
    ckpt_dir = worker._write_ray_checkpoint(str(tmp_path), card, first, state)
    stored = load_state_dict(ckpt_dir)
    assert all(torch.equal(stored[k], averaged[k]) for k in averaged)  # model.pt: the EMA weights
    worker._save_run_checkpoints(str(tmp_path / "run"), card, first.kept, improved=True)
    assert torch.equal(load_state_dict(str(tmp_path / "run" / "best"))["head.weight"], averaged["head.weight"])

    second = trainee()  # a restarted worker: fresh weights, then the checkpoint
    resumed = worker._resume(second, ray.train.Checkpoint.from_directory(ckpt_dir), rank=1)
    assert resumed["epoch"] == 1 and resumed["attempt"] == 2
    assert all(torch.equal(second.model.state_dict()[k], raw[k]) for k in raw)  # training goes on from the raw weights
    assert all(torch.equal(second.ema.module.state_dict()[k], averaged[k]) for k in averaged)  # the average goes on too


def test_layer_decay_and_ema_see_through_ddp(tmp_path):
    """Ray Train hands worker.py a DistributedDataParallel model: the groups and the EMA are the inner model's."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = create_classifier({"name": "resnet10t", "use_metadata": True})
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        plain = _lr_by_name(model, loop.create_optimizer(model, 1e-3, 0.05, layer_decay=0.5))
        through = _lr_by_name(model, loop.create_optimizer(wrapped, 1e-3, 0.05, layer_decay=0.5))
        assert through == plain and through["backbone.conv1.0.weight"] < through["head.weight"]
        ema = loop.create_ema(wrapped, 0.9)
        assert set(ema.module.state_dict()) == set(model.state_dict())  # no "module." prefix: loads as a checkpoint
    finally:
        dist.destroy_process_group()
