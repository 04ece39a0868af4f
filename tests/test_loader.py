"""The training loader (dermaid.data.torch_dataset): image bytes held once in a shared buffer, the CPU and raw
(GPU) item paths, and resident memory that does not grow across epochs of a multi-worker loader. Fast tier."""

from __future__ import annotations

import io

import numpy as np
import psutil
import pytest
import torch
import yaml

from dermaid.data.gpu_transforms import DeviceAugmentLoader
from dermaid.data.synth import lesion_image
from dermaid.data.torch_dataset import LesionDataset, PackedImages, create_train_loader
from dermaid.data.transforms import create_train_transform
from tests.test_transforms import AUGMENT_DIR, SPEC

PADDING = 400_000  # bytes after each JPEG's end marker (decoders stop there): a buffer big enough to see copies


def _records(n: int, padding: int = 0) -> list[dict]:
    jpegs = []
    for i in range(4):
        buf = io.BytesIO()
        lesion_image("NV", i, i, (160, 120)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    return [{"image": jpegs[i % 4] + bytes(padding), "width": 160, "height": 120, "label_idx": i % 8,
             "age": 50.0, "sex": "male", "site": "head/neck", "image_id": f"ISIC_{i:07d}"} for i in range(n)]


def _augment():
    return create_train_transform(SPEC, yaml.safe_load((AUGMENT_DIR / "default.yaml").read_text()))


def test_packed_images_hold_every_item_once_read_only():
    items = [b"abc", b"", bytes(range(256)), b"\xff\xd8"]
    packed = PackedImages(items)
    assert [packed[i].tobytes() for i in range(len(items))] == items
    assert packed.buffer.nbytes == sum(map(len, items)) and not packed.buffer.flags.writeable
    assert np.shares_memory(packed[2], packed.buffer)  # a view, not a copy


def test_cpu_items_are_augmented_tensors_and_raw_items_are_the_bytes():
    records = _records(6)
    dataset = LesionDataset(records, _augment())
    image, metadata, label = dataset[1]
    assert image.shape == (3, 96, 96) and metadata.shape == (14,) and int(label) == 1
    raw = LesionDataset(records, None, raw=True)
    data, _, _ = raw[2]
    assert data.dtype == torch.uint8 and data.numpy().tobytes() == records[2]["image"]
    loader = create_train_loader(raw, 4, "shuffle", [1] * 8, seed=0)
    batch = next(iter(DeviceAugmentLoader(loader, _augment(), torch.device("cpu"))))
    assert batch[0].shape == (4, 3, 96, 96) and batch[1].shape == (4, 14) and batch[2].shape == (4,)


def _memory(process: psutil.Process, others: set[int]) -> tuple[float, list[float]]:
    """(summed PSS of the process and its loader workers, each worker's USS) in bytes. `others`: children that
    were there before the loader (a Ray session the test run started, ...), left out."""
    pss, uss = process.memory_full_info().pss, []
    for child in process.children(recursive=True):
        if child.pid in others:
            continue
        info = child.memory_full_info()
        pss += info.pss
        uss.append(info.uss)
    return pss, uss


@pytest.mark.skipif(not hasattr(psutil.Process().memory_full_info(), "pss"), reason="PSS needs Linux /proc smaps")
def test_loader_memory_stays_flat_across_epochs_and_workers_share_the_buffer():
    """Two persistent workers, three epochs over a ~64 MB buffer: summed PSS grows < 10% from epoch 1 to 3,
    and no worker holds a private copy of the buffer (its USS stays well under the buffer's size)."""
    dataset = LesionDataset(_records(160, PADDING), create_train_transform(
        {**SPEC, "input_size": [3, 32, 32]}, yaml.safe_load((AUGMENT_DIR / "light.yaml").read_text())))
    buffer = dataset.images.buffer.nbytes
    me = psutil.Process()
    others = {child.pid for child in me.children(recursive=True)}
    loader = create_train_loader(dataset, 16, "shuffle", [1] * 8, seed=0, num_workers=2)
    after = []
    for epoch in (1, 2, 3):
        loader.sampler.set_epoch(epoch)
        for _ in loader:
            pass
        after.append(_memory(me, others))
    assert after[2][0] < 1.10 * after[0][0], [round(p / 2**20) for p, _ in after]
    assert len(after[2][1]) == 2 and max(after[2][1]) < buffer / 2, (buffer, after[2][1])
    del loader


def test_data_loader_key_chooses_the_input_path():
    from dermaid.errors import DermaidError
    from dermaid.training.worker import _input_path

    cpu = torch.device("cpu")
    assert _input_path("auto", cpu) == "cpu" and _input_path("cpu", cpu) == "cpu"
    assert _input_path("auto", torch.device("cuda")) == "gpu"
    with pytest.raises(DermaidError, match="data.loader=gpu decodes on a CUDA device"):
        _input_path("gpu", cpu)
    with pytest.raises(DermaidError, match="expected auto, cpu or gpu"):
        _input_path("ray_data", cpu)
