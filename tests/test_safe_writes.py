"""Safe publishing (dermaid.files.atomic_dir / publish / write_atomic / write_exclusive) and `dermaid gc`.

The object-store path runs on `copyfs://`, a local filesystem that behaves like gs:// for what matters here:
no directory rename (a move copies object by object) and a process that can die between two objects
(`crash_after`: the n-th copy raises, and a dead process cleans nothing up)."""

from __future__ import annotations

import json
import shutil
import threading
import uuid

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from dermaid import files
from dermaid.models.card import CARD_FILE, load_card, load_state_dict
from dermaid.registry import Registry
from dermaid.registry.gc import collect, find_garbage


class SimulatedCrash(BaseException):
    """The process died here (BaseException: nothing in the code under test may swallow it)."""


class CopyingFileSystem(LocalFileSystem):
    """Local files behind an object-store face: `mv` copies file by file then deletes, and a crash can be armed."""

    protocol = ("copyfs",)
    cachable = False
    crash_after: int | None = None   # copies allowed before the simulated crash
    dead = False                     # after the crash: every later call fails (nothing is cleaned up)
    copied: list[str] = []           # destinations in copy order

    def cp_file(self, path1, path2, **kwargs):
        self._step(path2)
        CopyingFileSystem.copied.append(self._strip_protocol(path2))
        super().cp_file(path1, path2, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" not in mode:
            self._step(path)
        return super()._open(path, mode=mode, **kwargs)

    def _step(self, path):
        """One write or copy; the armed crash happens before the (crash_after + 1)-th."""
        self._alive()
        if CopyingFileSystem.crash_after is not None:
            if CopyingFileSystem.crash_after <= 0:
                CopyingFileSystem.dead = True
                raise SimulatedCrash(f"crashed before writing {path}")
            CopyingFileSystem.crash_after -= 1

    def mv(self, path1, path2, recursive=True, **kwargs):  # what object stores do: copy everything, then delete
        self.copy(path1, path2, recursive=recursive)
        self.rm(path1, recursive=recursive)

    def rm(self, path, recursive=False, maxdepth=None):
        self._alive()
        super().rm(path, recursive=recursive, maxdepth=maxdepth)

    def rm_file(self, path):
        self._alive()
        super().rm_file(path)

    def _alive(self):
        if CopyingFileSystem.dead:
            raise SimulatedCrash("the process is gone")


fsspec.register_implementation("copyfs", CopyingFileSystem, clobber=True)


@pytest.fixture
def store(tmp_path):
    """A fresh copyfs:// root; the crash switch reset around each test."""
    CopyingFileSystem.crash_after, CopyingFileSystem.dead, CopyingFileSystem.copied = None, False, []
    yield f"copyfs://{tmp_path}/store"
    CopyingFileSystem.crash_after, CopyingFileSystem.dead, CopyingFileSystem.copied = None, False, []


def _fill(url: str, generation: int, n: int = 4) -> None:
    for i in range(n):
        files.write_text(files.join(url, f"part-{i}.txt"), f"{generation}")
    files.write_text(files.join(url, CARD_FILE), json.dumps({"generation": generation}))


def test_local_publish_is_one_rename_and_a_replacement_is_never_missing(tmp_path):
    url = str(tmp_path / "best")
    with files.atomic_dir(url) as tmp:
        _fill(tmp, 0)
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                seen.append(json.loads((tmp_path / "best" / CARD_FILE).read_text())["generation"])
            except FileNotFoundError:
                seen.append("missing")

    reader = threading.Thread(target=read)
    reader.start()
    for generation in range(1, 60):
        with files.atomic_dir(url) as tmp:
            _fill(tmp, generation)
    stop.set()
    reader.join()
    assert "missing" not in seen and seen == sorted(seen)  # renameat2(RENAME_EXCHANGE): never absent, never older
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary or old copies left
    with pytest.raises(FileExistsError):
        with files.atomic_dir(url, overwrite=False) as tmp:
            _fill(tmp, 99)
    assert json.loads((tmp_path / "best" / CARD_FILE).read_text())["generation"] == 59


def test_a_failure_inside_the_block_leaves_the_published_directory(tmp_path, store):
    for url in (str(tmp_path / "best"), f"{store}/best"):
        with files.atomic_dir(url) as tmp:
            _fill(tmp, 1)
        with pytest.raises(RuntimeError):
            with files.atomic_dir(url) as tmp:
                _fill(tmp, 2)
                raise RuntimeError("training died")
        assert json.loads(files.read_text(files.join(url, CARD_FILE)))["generation"] == 1
        assert find_garbage(url.rsplit("/", 1)[0]) == []


def test_object_store_publish_copies_the_marker_last_and_never_mixes(store):
    url = f"{store}/best"
    with files.atomic_dir(url) as tmp:
        _fill(tmp, 1)
    assert CopyingFileSystem.copied[-1].endswith("/best/card.json")
    fs, path = files.get_fs(url)
    original = CopyingFileSystem.cp_file
    states = []

    def watching(self, path1, path2, **kwargs):  # at every copy into best/: is an old card beside new parts?
        if "/best/" in path2 and fs.exists(f"{path}/{CARD_FILE}"):
            states.append(json.loads(fs.cat_file(f"{path}/{CARD_FILE}"))["generation"])
        original(self, path1, path2, **kwargs)

    CopyingFileSystem.cp_file = watching
    try:
        with files.atomic_dir(url) as tmp:
            _fill(tmp, 2)
    finally:
        CopyingFileSystem.cp_file = original
    assert states == []  # the old card went first: readers saw "no checkpoint", never gen-1 card with gen-2 parts
    assert json.loads(files.read_text(files.join(url, CARD_FILE)))["generation"] == 2
    assert {files.read_text(files.join(url, f"part-{i}.txt")) for i in range(4)} == {"2"}


@pytest.mark.parametrize("crash_after", [1, 3, 6])  # starting, filling the fresh copy, copying into place
def test_a_crash_mid_register_leaves_the_previous_version_served_and_gc_finds_the_rest(promotable_copy, store,
                                                                                      crash_after):
    """Registry on an object store: v1 promoted; registering v2 dies part-way (at its first write, while filling
    the fresh location, or while copying into place); v1 stays listed, promoted and loadable; gc names and removes
    the rest."""
    reg = Registry(f"{store}/registry")
    reg.register(promotable_copy, "isic", "v1")
    reg.promote("isic", "v1")
    CopyingFileSystem.crash_after = crash_after
    with pytest.raises(SimulatedCrash):
        # a local checkpoint copied into the store: writes land in the fresh location, then copies into place
        reg.register(f"copyfs://{promotable_copy}", "isic", "v2")
    CopyingFileSystem.dead, CopyingFileSystem.crash_after = False, None

    assert [v.version for v in reg.versions("isic")] == ["v1"]
    pointer = reg.stage("isic")
    assert pointer.version == "v1"
    card = load_card(pointer.checkpoint)
    assert load_state_dict(pointer.checkpoint, card) and card.model_name == "test_efficientnet"
    garbage = find_garbage(f"{store}/registry")
    assert garbage and all(g.kind in ("probe", "tmp", "incomplete-version") for g in garbage), garbage
    kept_young, _ = collect(f"{store}/registry", grace_s=3600, dry_run=True)
    assert kept_young == []  # younger than the grace period: a publish might still be running
    removed, _ = collect(f"{store}/registry", grace_s=0, dry_run=False)
    assert {g.url for g in removed} == {g.url for g in garbage}
    assert find_garbage(f"{store}/registry") == []
    assert reg.register(promotable_copy, "isic", "v2").version == "v2"  # the name is free again


def test_a_crash_mid_dataset_publish_keeps_the_tagged_version(store):
    from dermaid.data.loading import list_versions, resolve_version, write_tag
    from dermaid.data.prepare import _commit

    out = f"{store}/prepared"

    def publish(version: str) -> None:
        tmp = files.tmp_sibling(files.join(out, "prepare"))
        for i in range(3):
            files.write_bytes(files.join(tmp, "shards", f"part-{i:05d}.parquet"), b"x" * 10)
        _commit(tmp, files.join(out, version), {"version": version, "created": version})
        fs, tmp_path = files.get_fs(tmp)
        fs.rm(tmp_path, recursive=True)  # what prepare_dataset's `finally` does

    publish("a" * 16)
    write_tag(out, "toy", "a" * 16)
    CopyingFileSystem.crash_after = 6  # 3 shards and the manifest written, then 2 of 4 objects copied into place
    with pytest.raises(SimulatedCrash):
        publish("b" * 16)
    CopyingFileSystem.dead, CopyingFileSystem.crash_after = False, None
    assert [m["version"] for m in list_versions(out)] == ["a" * 16]
    assert resolve_version(out, "toy").endswith("a" * 16)
    kinds = sorted(g.kind for g in find_garbage(out))
    assert kinds == ["incomplete-dataset", "tmp"]
    collect(out, grace_s=0, dry_run=False)
    assert find_garbage(out) == [] and resolve_version(out, "latest").endswith("a" * 16)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_write_exclusive_lets_exactly_one_writer_win(tmp_path, where):
    url = str(tmp_path / "gen-1.json") if where == "local" else f"memory://excl-{uuid.uuid4().hex[:8]}/gen-1.json"
    barrier, wins, losses = threading.Barrier(8), [], []

    def write(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            files.write_exclusive(url, json.dumps({"writer": i}).encode())
            wins.append(i)
        except FileExistsError:
            losses.append(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    assert json.loads(files.read_text(url)) == {"writer": wins[0]}
    if where == "local":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-1.json"]  # no temporary files left


def test_write_atomic_replaces_whole(tmp_path):
    url = str(tmp_path / "tags" / "toy")
    files.write_atomic(url, b"a" * 16)
    files.write_atomic(url, b"b" * 16)
    assert files.read_bytes(url) == b"b" * 16 and sorted(p.name for p in (tmp_path / "tags").iterdir()) == ["toy"]


def test_gc_command_names_then_removes_old_leftovers(tmp_path, dermaid_cli):
    runs = tmp_path / "runs"
    old = runs / "toy" / "best.tmp-20200101T000000Z-deadbeef"
    young = runs / "toy" / f"last{files.tmp_sibling('').split('/')[-1]}"
    for leftover in (old, young):
        leftover.mkdir(parents=True)
        (leftover / "model.pt").write_bytes(b"0" * 1000)
    (runs / "toy" / "best").mkdir()
    (runs / "toy" / "best" / CARD_FILE).write_text("{}")
    dry = dermaid_cli("gc", f"root={runs}", "dry_run=true")
    assert dry.returncode == 0, dry.stderr
    assert "would remove tmp" in dry.stdout and str(old) in dry.stdout and "kept" in dry.stdout
    assert old.exists()
    done = dermaid_cli("gc", f"root={runs}")
    assert done.returncode == 0 and not old.exists() and young.exists() and (runs / "toy" / "best").exists()
    bad = dermaid_cli("gc", f"root={runs}", "grace_hours=-1")
    assert bad.returncode == 2 and "grace_hours" in bad.stderr


@pytest.fixture
def promotable_copy(promotable_checkpoint, tmp_path) -> str:
    """A private copy of test_registry's promotable checkpoint (a local directory)."""
    url = str(tmp_path / "ckpt")
    shutil.copytree(promotable_checkpoint, url)
    return url


# --------------------------------------------------------------------------- checkpoints replaced in place
# save_checkpoint on an object store gives a replacement's weights a fresh name (files.versioned_name), so
# files._publish_by_copy copies them beside the old ones, switches card.json, then removes the old weights.

def _save_generation(url: str, generation: int) -> None:
    """A tiny float checkpoint whose weights and card both carry `generation` (weights: 4 times the number)."""
    import torch

    from dermaid.models.card import build_card, save_checkpoint

    card = build_card({"name": "test_efficientnet", "use_metadata": False},
                      {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}, epoch=generation)
    save_checkpoint(url, card, {"w": torch.full((4,), float(generation))})


def _read_generation(url: str) -> int:
    """What a reader (training's resume, evaluate, Serve) does: the card, then the weights it names."""
    card = load_card(url)
    weights = load_state_dict(url, card)["w"]
    assert weights.tolist() == [float(card.epoch)] * 4  # the card and the weights of one save, never a mix
    return card.epoch


def _names(url: str) -> list[str]:
    fs, path = files.get_fs(url)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(path, detail=False))


def test_versioned_names_round_trip():
    name = files.versioned_name("model.pt")
    assert name != "model.pt" and name.startswith("model-v") and name.endswith(".pt")
    assert files.is_versioned_name(name) and not files.is_versioned_name("model.pt")
    assert files.unversioned_name(name) == "model.pt" and files.unversioned_name("model.pt") == "model.pt"
    again = files.versioned_name(name)  # a new version, not a version of a version
    assert again != name and files.unversioned_name(again) == "model.pt"
    assert files.unversioned_name(files.versioned_name("model.int8.onnx")) == "model.int8.onnx"
    assert 0 <= files.versioned_age_seconds(name) < 60 and files.versioned_age_seconds("model.pt") is None


def test_object_store_checkpoint_replacement_is_never_absent_nor_mixed(store, monkeypatch):
    """(a) best/ replaced twice (model.pt -> versioned -> versioned): after every object copied into place and
    every object removed, a reader loads a complete checkpoint, the old one until the card switch, then the new."""
    url = f"{store}/run/best"
    _save_generation(url, 0)
    assert _names(url) == ["card.json", "model.pt"]  # a new directory keeps the card's name
    fs, path = files.get_fs(url)
    seen: list[int] = []
    original_copy, original_rm = CopyingFileSystem.cp_file, CopyingFileSystem.rm_file

    def copying(self, path1, path2, **kwargs):
        original_copy(self, path1, path2, **kwargs)
        if f"{path}/" in self._strip_protocol(path2):
            seen.append(_read_generation(url))

    def removing(self, p):
        original_rm(self, p)
        if f"{path}/" in self._strip_protocol(p):
            seen.append(_read_generation(url))

    monkeypatch.setattr(CopyingFileSystem, "cp_file", copying)
    monkeypatch.setattr(CopyingFileSystem, "rm_file", removing)
    for generation in (1, 2):
        seen.clear()
        _save_generation(url, generation)
        # new weights copied beside the old ones (old card), the card switched, the old weights removed (new card)
        assert seen == [generation - 1, generation, generation], seen
        assert CopyingFileSystem.copied[-1] == f"{path}/{CARD_FILE}"  # the switch is the last copy
        artifact = load_card(url).artifact
        assert files.is_versioned_name(artifact) and _names(url) == sorted([CARD_FILE, artifact])
    assert find_garbage(f"{store}/run") == []


def test_memory_store_replacement_keeps_only_the_new_checkpoint():
    url = f"memory://ckpt-{uuid.uuid4().hex[:8]}/best"
    for generation in range(3):
        _save_generation(url, generation)
        assert _read_generation(url) == generation
    assert _names(url) == sorted([CARD_FILE, load_card(url).artifact])
    assert find_garbage(url.rsplit("/", 1)[0]) == []


def test_a_reader_holding_the_replaced_card_is_told_to_load_again():
    """The one window an in-place replacement leaves: a reader read the old card just before the switch and asks
    for its weights after their removal. It is told the checkpoint was replaced (not that it is broken)."""
    from dermaid.models.card import CheckpointError

    url = f"memory://ckpt-{uuid.uuid4().hex[:8]}/best"
    _save_generation(url, 0)
    _save_generation(url, 1)
    stale = load_card(url)
    _save_generation(url, 2)
    with pytest.raises(CheckpointError, match="replaced while it was being read.*load it again"):
        load_state_dict(url, stale)
    assert _read_generation(url) == 2


def _crash_when(monkeypatch, when) -> None:
    """Kill the process (CopyingFileSystem.dead) right after the copy for which when(destination) is true."""
    original = CopyingFileSystem.cp_file

    def copying(self, path1, path2, **kwargs):
        original(self, path1, path2, **kwargs)
        if when(self._strip_protocol(path2)):
            CopyingFileSystem.dead = True
            raise SimulatedCrash(f"crashed after copying {path2}")

    monkeypatch.setattr(CopyingFileSystem, "cp_file", copying)


@pytest.mark.parametrize("replaced", [0, 1])  # the old weights: model.pt (first write), or a versioned name
def test_a_crash_before_the_card_switch_keeps_the_previous_checkpoint(store, monkeypatch, replaced):
    """(b) the crash comes right after the first new object (the new weights) is copied into best/: the previous
    checkpoint still loads, and gc names the new weights (and the dead publish's temporary copy)."""
    url = f"{store}/run/best"
    for generation in range(replaced + 1):
        _save_generation(url, generation)
    old_artifact = load_card(url).artifact
    path = files.get_fs(url)[1]
    _crash_when(monkeypatch, lambda dst: dst.startswith(f"{path}/"))
    with pytest.raises(SimulatedCrash):
        _save_generation(url, 7)
    CopyingFileSystem.dead = False
    monkeypatch.undo()

    assert _read_generation(url) == replaced and load_card(url).artifact == old_artifact
    garbage = find_garbage(f"{store}/run")
    leftover = [g for g in garbage if g.kind == "unreferenced-weights"]
    assert len(leftover) == 1 and leftover[0].url.startswith(url + "/model-v"), garbage
    assert sorted(g.kind for g in garbage) == ["tmp", "unreferenced-weights"]
    assert collect(f"{store}/run", grace_s=3600, dry_run=False)[0] == []  # young: a publish might still be running
    removed, _ = collect(f"{store}/run", grace_s=0, dry_run=False)
    assert {g.url for g in removed} == {g.url for g in garbage}
    assert find_garbage(f"{store}/run") == [] and _read_generation(url) == replaced
    assert _names(url) == sorted([CARD_FILE, old_artifact])
    _save_generation(url, 8)  # and the next epoch replaces it as usual
    assert _read_generation(url) == 8


@pytest.mark.parametrize("replaced", [0, 1])
def test_a_crash_after_the_card_switch_keeps_the_new_checkpoint(store, monkeypatch, replaced):
    """(c) the crash comes right after card.json is switched, before the old weights are removed: the new checkpoint
    loads, and gc names the old weights (model.pt beside a card naming model-v...pt, or an older model-v...pt)."""
    url = f"{store}/run/best"
    for generation in range(replaced + 1):
        _save_generation(url, generation)
    old_artifact = load_card(url).artifact
    path = files.get_fs(url)[1]
    _crash_when(monkeypatch, lambda dst: dst == f"{path}/{CARD_FILE}")
    with pytest.raises(SimulatedCrash):
        _save_generation(url, 7)
    CopyingFileSystem.dead = False
    monkeypatch.undo()

    assert _read_generation(url) == 7
    garbage = find_garbage(f"{store}/run")
    assert sorted(g.kind for g in garbage) == ["tmp", "unreferenced-weights"], garbage
    assert [g.url for g in garbage if g.kind == "unreferenced-weights"] == [f"{url}/{old_artifact}"]
    collect(f"{store}/run", grace_s=0, dry_run=False)
    assert find_garbage(f"{store}/run") == [] and _read_generation(url) == 7
    assert _names(url) == sorted([CARD_FILE, load_card(url).artifact])


def test_a_shared_file_name_still_replaces_absent_first(store):
    """A checkpoint holding a file the new one has too (ood_statistics.npz written by calibrate) is not replaced
    in place: its card goes first, so readers see no checkpoint rather than the old card beside new statistics."""
    url = f"{store}/run/best"
    _save_generation(url, 0)
    files.write_bytes(files.join(url, "ood_statistics.npz"), b"old")
    with files.atomic_dir(url) as tmp:
        for name in (CARD_FILE, load_card(url).artifact):
            files.write_bytes(files.join(tmp, name), files.read_bytes(files.join(url, name)))
        files.write_bytes(files.join(tmp, "ood_statistics.npz"), b"new")
    assert files.read_bytes(files.join(url, "ood_statistics.npz")) == b"new"
    order = [p.rsplit("/", 1)[-1] for p in CopyingFileSystem.copied if "/run/best/" in p]
    assert order[-1] == CARD_FILE and find_garbage(f"{store}/run") == []


def test_local_checkpoints_keep_model_pt(tmp_path):
    """(d) local disk: one rename exchange, the weights keep their name, nothing left for gc."""
    url = str(tmp_path / "run" / "best")
    for generation in range(3):
        _save_generation(url, generation)
        assert load_card(url).artifact == "model.pt" and _read_generation(url) == generation
    assert _names(url) == ["card.json", "model.pt"]
    assert find_garbage(str(tmp_path / "run")) == []
