"""The model registry (dermaid.registry): immutable versions, promotion checks, stage pointers that one
promotion wins, rollback, resolve_model_url; on local disk and on memory:// (an object store: no rename)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from dermaid import files
from dermaid.models.card import load_card
from dermaid.registry import (CardCheckError, PromotionConflict, Registry, RegistryError, StagePointer,
                              resolve_model_url)


@pytest.fixture
def promotable(promotable_checkpoint) -> str:
    return promotable_checkpoint


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return f"memory://registry-{uuid.uuid4().hex[:8]}"


def test_register_promote_rollback_walks_the_history(promotable, root):
    reg = Registry(root)
    v1 = reg.register(promotable, "isic", "v1", metrics={"balanced_accuracy": 0.5})
    v2 = reg.register(promotable, "isic", "v2", metrics={"balanced_accuracy": 0.6})
    assert reg.models() == ["isic"]
    assert [v.version for v in reg.versions("isic")] == ["v1", "v2"]
    assert v1.problems == [] and load_card(v1.checkpoint).model_name == "test_efficientnet"
    assert reg.stage("isic") is None

    first = reg.promote("isic", "v1", by="alice")
    assert isinstance(first, StagePointer)
    assert (first.version, first.from_version, first.promoted_by, first.metrics) == (
        "v1", None, "alice", {"balanced_accuracy": 0.5})
    second = reg.promote("isic", "v2", by="bob")
    assert (second.version, second.from_version, second.checkpoint) == ("v2", "v1", v2.checkpoint)
    assert reg.stage("isic").version == "v2"

    back = reg.rollback("isic", by="carol")
    assert (back.version, back.from_version, back.action, back.promoted_by) == ("v1", "v2", "rollback", "carol")
    assert reg.stage("isic", "production").checkpoint == v1.checkpoint
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("isic")
    assert [(p.generation, p.version, p.action) for p in reg.history("isic")] == [
        (1, "v1", "promote"), (2, "v2", "promote"), (3, "v1", "rollback")]
    assert reg.stage("isic", "staging") is None  # stages are independent


def test_versions_are_immutable(promotable, root):
    reg = Registry(root)
    reg.register(promotable, "isic", "v1")
    before = files.read_bytes(files.join(root, "isic/versions/v1/version.json"))
    with pytest.raises(RegistryError, match="registered already"):
        reg.register(promotable, "isic", "v1")
    assert files.read_bytes(files.join(root, "isic/versions/v1/version.json")) == before
    default = reg.register(promotable, "isic")  # version from the card: the same checkpoint twice is refused
    assert default.version.startswith("test_efficientnet-float-")
    with pytest.raises(RegistryError, match="registered already"):
        reg.register(promotable, "isic")


def test_promotion_refuses_a_card_that_fails_checks(tiny_checkpoint, promotable, root):
    reg = Registry(root)
    reg.register(promotable, "isic", "good")
    reg.promote("isic", "good")
    bad = reg.register(tiny_checkpoint, "isic", "uncalibrated")
    assert any("OOD" in p for p in bad.problems)
    with pytest.raises(CardCheckError) as err:
        reg.promote("isic", "uncalibrated")
    message = str(err.value)
    assert "dermaid calibrate" in message and "triage" in message and "stage is unchanged" in message
    assert reg.stage("isic").version == "good" and len(reg.history("isic")) == 1


def test_unknown_or_foreign_versions_are_refused_with_the_stage_unchanged(promotable, root, tmp_path):
    reg = Registry(root)
    reg.register(promotable, "isic", "v1")
    reg.register(promotable, "other", "v9")
    reg.promote("isic", "v1")
    with pytest.raises(RegistryError, match=r"unknown version isic@v2; known versions of 'isic': \['v1'\]"):
        reg.promote("isic", "v2")
    with pytest.raises(RegistryError, match="'v9' is a version of 'other'"):
        reg.promote("isic", "v9")
    with pytest.raises(RegistryError, match="invalid version"):
        reg.promote("isic", "../v1")
    # a version directory copied in from another registry (another project) carries that registry's id
    foreign = Registry(str(tmp_path / "elsewhere"))
    foreign.register(promotable, "isic", "v5")
    fs, _ = files.get_fs(root)
    src = tmp_path / "elsewhere/isic/versions/v5"
    for path in sorted(src.rglob("*")):
        if path.is_file():
            files.write_bytes(files.join(root, "isic/versions/v5", str(path.relative_to(src))), path.read_bytes())
    with pytest.raises(RegistryError, match="belongs to another registry"):
        reg.promote("isic", "v5")
    assert reg.stage("isic").version == "v1" and len(reg.history("isic")) == 1


def test_a_registry_that_cannot_be_written_is_said_before_copying(promotable, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(RegistryError, match=r"registry .*a-file/registry is not writable.*nothing was copied"):
        Registry(str(blocked / "registry")).register(promotable, "isic", "v1")
    if os.geteuid() == 0:
        return  # root writes anywhere: the permission case needs an ordinary user
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(RegistryError, match="not writable"):
            Registry(str(locked / "registry")).register(promotable, "isic", "v1")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_two_promotions_at_once_one_wins_the_other_is_told(promotable, root):
    reg = Registry(root)
    for v in ("v1", "a", "b"):
        reg.register(promotable, "isic", v)
    reg.promote("isic", "v1")
    barrier = threading.Barrier(2)
    outcome: dict[str, object] = {}
    original = reg._head
    waited: set[str] = set()

    def head_then_wait(name, stage):  # both read the stage at generation 1, then race to commit
        record = original(name, stage)
        thread = threading.current_thread().name
        if thread in ("a", "b") and thread not in waited:
            waited.add(thread)
            barrier.wait(timeout=10)
        return record

    reg._head = head_then_wait

    def promote(version):
        try:
            outcome[version] = reg.promote("isic", version, by=version)
        except PromotionConflict as exc:
            outcome[version] = exc

    threads = [threading.Thread(target=promote, args=(v,), name=v) for v in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reg._head = original
    winners = [v for v, r in outcome.items() if isinstance(r, StagePointer)]
    losers = [r for r in outcome.values() if isinstance(r, PromotionConflict)]
    assert len(winners) == 1 and len(losers) == 1
    assert "changed nothing" in str(losers[0]) and winners[0] in str(losers[0])
    pointer = json.loads(files.read_text(files.join(root, "isic/stages/production.json")))
    assert pointer["version"] == winners[0] == reg.stage("isic").version and pointer["generation"] == 2
    assert [p.version for p in reg.history("isic")] == ["v1", winners[0]]


def test_a_stale_pointer_never_shows_an_older_stage(promotable, root):
    """A crash between the history record (the commit) and the pointer: readers follow the history."""
    reg = Registry(root)
    reg.register(promotable, "isic", "v1")
    reg.register(promotable, "isic", "v2")
    reg.promote("isic", "v1")
    stale = files.read_bytes(files.join(root, "isic/stages/production.json"))
    reg.promote("isic", "v2")
    files.write_bytes(files.join(root, "isic/stages/production.json"), stale)  # the pointer write "lost"
    assert reg.stage("isic").version == "v2"
    assert reg.rollback("isic").version == "v1"


def test_resolve_model_url(promotable, root):
    reg = Registry(root)
    v1 = reg.register(promotable, "isic", "v1")
    with pytest.raises(RegistryError, match="nothing promoted to isic/production"):
        resolve_model_url("registry://isic/production", root)
    reg.promote("isic", "v1")
    assert resolve_model_url("registry://isic/production", root) == (v1.checkpoint, "v1")
    assert resolve_model_url("registry://isic", root) == (v1.checkpoint, "v1")
    assert resolve_model_url("registry://isic@v1", root) == (v1.checkpoint, "v1")
    assert resolve_model_url(v1.checkpoint, root) == (v1.checkpoint, "v1")
    plain, version = resolve_model_url(promotable, root)
    assert plain == promotable and version.startswith("test_efficientnet-float-")
    with pytest.raises(RegistryError, match="unknown version"):
        resolve_model_url("registry://isic@nope", root)


def test_registry_cli_tables(promotable, tmp_path, dermaid_cli):
    root = str(tmp_path / "registry")
    Registry(root).register(promotable, "isic", "v1", metrics={"balanced_accuracy": 0.42})
    Registry(root).register(promotable, "isic", "v2")
    res = dermaid_cli("registry", "promote", "isic@v1", f"root={root}", "by=alice")
    assert res.returncode == 0, res.stderr
    assert "isic/production -> v1" in res.stdout
    res = dermaid_cli("registry", "promote", "isic@v2", f"root={root}", "stage=production")
    assert res.returncode == 0, res.stderr
    Path(root, "isic/versions/v3.tmp-20200101T000000Z-abcd1234").mkdir()  # what a crashed register leaves
    listing = dermaid_cli("registry", "list", f"root={root}")
    assert listing.returncode == 0 and "isic" in listing.stdout and "production=v2" in listing.stdout
    assert "1 leftover" in listing.stdout and "v3.tmp-20200101T000000Z-abcd1234" in listing.stdout
    again = dermaid_cli("registry", "promote", "isic@v2", f"root={root}")
    assert again.returncode == 0 and "already" in again.stdout
    show = dermaid_cli("registry", "show", "isic", f"root={root}")
    assert show.returncode == 0
    assert "v1" in show.stdout and "alice" in show.stdout and "0.42" in show.stdout
    res = dermaid_cli("registry", "rollback", "isic", f"root={root}")
    assert res.returncode == 0 and "-> v1" in res.stdout
    bad = dermaid_cli("registry", "promote", "isic@v7", f"root={root}")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "unknown version" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert Path(root, "isic/stages/production.json").exists()


@pytest.mark.integration(reason="a trained and calibrated run (calibrated_checkpoint)")
def test_a_calibrated_run_registers_promotes_and_serves_from_the_stage(calibrated_checkpoint, tmp_path):
    """The real thing: a trained and calibrated checkpoint passes the checks, and what the production stage
    points at is a checkpoint the Predictor loads and that abstains like the original."""
    import io

    from PIL import Image

    from dermaid.inference import Predictor

    root = str(tmp_path / "registry")
    reg = Registry(root)
    mv = reg.register(calibrated_checkpoint, "isic")
    assert mv.problems == []
    reg.promote("isic", mv.version, by="ci")
    checkpoint, version = resolve_model_url("registry://isic/production", root)
    assert version == mv.version and checkpoint == mv.checkpoint
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (180, 120, 100)).save(buf, "JPEG")
    item = [(buf.getvalue(), 50, "female", "back")]
    served, original = Predictor(checkpoint).predict_full(item), Predictor(calibrated_checkpoint).predict_full(item)
    assert np.allclose(served.probabilities, original.probabilities)
    assert served.ood_scores is not None and bool(served.abstain[0]) == bool(original.abstain[0])
