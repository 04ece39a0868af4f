"""Training input pipeline: decode + augment images/s per core, old (PIL) against new (OpenCV) CPU path,
and the resident memory of a 4-worker DataLoader across epochs.

    .venv/bin/python benchmarks/loader_throughput.py                    # sizes 224 384 512, RSS with 2,000 images
    .venv/bin/python benchmarks/loader_throughput.py --images 48 --rss-images 400 --epochs 3    # a quick run

Inputs are what training reads: toy lesions at the synth size mix, made into prepared-shard JPEGs by
`dermaid prepare`'s own process_image (shorter side 512, quality 90). One thread, one process per path (a
DataLoader worker runs one of each), blocks of the two paths alternated, best block of each kept.
- old: open_image with its JPEG draft + the torchvision v1 PIL transform this repository trained with up
  to commit df16112 (copied below as the baseline: RandomResizedCrop, flips, RandomRotation, ColorJitter).
- new: dermaid.data.transforms.TrainAugment with the same `augment` group (conf/augment/default.yaml).
Prints images/s per core, new/old (target >= 2 at 384 px), the cores a 4,392 img/s GPU step
(efficientnet_b0, 224 px, H200; docs/benchmarks.md) would need, and the summed RSS and PSS of a
4-worker loader (training process + workers) after epochs 1..N for the packed buffer and for the old
list of bytes (target: epoch 3 within 10% of epoch 1). The last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from dermaid.data.images import open_image  # noqa: E402
from dermaid.data.shards import process_image  # noqa: E402
from dermaid.data.synth import IMAGE_SIZE_WEIGHTS, IMAGE_SIZES, lesion_image  # noqa: E402
from dermaid.data.torch_dataset import LesionDataset, create_train_loader  # noqa: E402
from dermaid.data.transforms import create_train_transform  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_STEP_IMAGES_PER_S = 4392  # docs/benchmarks.md: efficientnet_b0, 224 px, batch 128, bf16, H200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512], help="model input sizes")
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs in the throughput blocks")
    p.add_argument("--rounds", type=int, default=3, help="alternating old/new blocks per size; best of each kept")
    p.add_argument("--augment", default="default", help="conf/augment/<name>.yaml for both paths")
    p.add_argument("--rss-images", type=int, default=2000, help="images in the loader memory test (0: skip)")
    p.add_argument("--epochs", type=int, default=3, help="epochs in the loader memory test")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers in the memory test")
    p.add_argument("--memory-only", choices=["packed", "list"], help="internal: one memory test in this process")
    return p.parse_args(argv)


def spec_for(size: int) -> dict:
    """An input spec as timm's data config gives it for an ImageNet backbone at `size`."""
    return {"input_size": [3, size, size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "crop_pct": 0.875, "interpolation": "bicubic", "crop_mode": "center"}


def old_train_transform(spec: dict, augment: dict) -> T.Compose:
    """The baseline: dermaid.data.transforms.create_train_transform as of commit df16112 (PIL, torchvision v1)."""
    size = int(spec["input_size"][-1])
    steps: list = [T.RandomResizedCrop(size, scale=tuple(augment["scale"]), ratio=tuple(augment["ratio"]),
                                       interpolation=T.InterpolationMode.BICUBIC)]
    if augment["hflip"]:
        steps.append(T.RandomHorizontalFlip())
    if augment["vflip"]:
        steps.append(T.RandomVerticalFlip())
    if float(augment["rotation"]):
        steps.append(T.RandomRotation(float(augment["rotation"]), interpolation=T.InterpolationMode.BILINEAR))
    jitter = float(augment["color_jitter"])
    if jitter:
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=min(jitter / 4, 0.05)))
    steps += [T.ToTensor(), T.Normalize(spec["mean"], spec["std"])]
    return T.Compose(steps)


def prepared_jpegs(n: int, seed: int = 0) -> list[tuple[bytes, int, int]]:
    """n toy lesions at the synth size mix, as prepared shards hold them: (JPEG bytes, width, height)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = IMAGE_SIZES[int(rng.choice(len(IMAGE_SIZES), p=IMAGE_SIZE_WEIGHTS))]
        buf = io.BytesIO()
        lesion_image(("MEL", "NV", "BCC", "BKL")[i % 4], i, i, size).save(buf, format="JPEG", quality=90)
        out.append(process_image(buf.getvalue(), 512, 90))
    return out


def old_path(jpegs, spec, augment):
    transform, draft = old_train_transform(spec, augment), math.ceil(spec["input_size"][-1] / spec["crop_pct"])
    return lambda item: transform(open_image(item[0], draft_size=draft))


def new_path(jpegs, spec, augment):
    transform = create_train_transform(spec, augment)
    return lambda item: transform(item[0], item[2], item[1])


def images_per_s(run, jpegs) -> float:
    start = time.perf_counter()
    for item in jpegs:
        run(item)
    return len(jpegs) / (time.perf_counter() - start)


def throughput(args, jpegs, augment: dict) -> list[dict]:
    rows = []
    for size in args.sizes:
        spec = spec_for(size)
        paths = {"old": old_path(jpegs, spec, augment), "new": new_path(jpegs, spec, augment)}
        for run in paths.values():
            run(jpegs[0])  # warm-up
        best = {name: 0.0 for name in paths}
        for _ in range(args.rounds):
            for name, run in paths.items():
                best[name] = max(best[name], images_per_s(run, jpegs))
        row = {"size": size, "old_per_core": round(best["old"], 1), "new_per_core": round(best["new"], 1),
               "new_over_old": round(best["new"] / best["old"], 2),
               "cores_per_gpu_old": round(GPU_STEP_IMAGES_PER_S / best["old"], 1),
               "cores_per_gpu_new": round(GPU_STEP_IMAGES_PER_S / best["new"], 1)}
        rows.append(row)
        print(f"{size:>4} px  old {row['old_per_core']:7.1f} img/s/core ({1000 / best['old']:5.2f} ms)  "
              f"new {row['new_per_core']:7.1f} img/s/core ({1000 / best['new']:5.2f} ms)  new/old {row['new_over_old']:.2f}  "
              f"cores for {GPU_STEP_IMAGES_PER_S} img/s: old {row['cores_per_gpu_old']}, new {row['cores_per_gpu_new']}",
              flush=True)
    return rows


class ListBytesDataset(LesionDataset):
    """The storage before this change: one Python bytes object per image (touched by every read)."""

    def __init__(self, records, transform) -> None:
        super().__init__([{**r, "image": b""} for r in records], transform)  # no packed copy
        self.blobs = [r["image"] for r in records]

    def __getitem__(self, index: int):
        height, width = (int(v) for v in self.sizes[index])
        return self.transform(self.blobs[index], height, width), self.metadata[index], self.labels[index]


def _memory(process: psutil.Process) -> tuple[float, float]:
    """(RSS, PSS) in MB of the process and its children."""
    rss = pss = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss / 2**20, pss / 2**20


def loader_memory(args, kind: str, jpegs) -> dict:
    """Summed RSS/PSS of the training process + its loader workers after each epoch (persistent workers)."""
    def image(i: int) -> bytes:
        return jpegs[i % len(jpegs)][0] + bytes(i % 7)  # distinct bytes per row

    n = args.rss_images
    light = pd.DataFrame({"width": [jpegs[i % len(jpegs)][1] for i in range(n)],
                          "height": [jpegs[i % len(jpegs)][2] for i in range(n)],
                          "label_idx": [i % 8 for i in range(n)], "image_id": [f"ISIC_{i:07d}" for i in range(n)]})
    transform = create_train_transform(spec_for(224), load_augment(args.augment))
    if kind == "packed":  # as read_worker_records gives them: an Arrow-backed column, no bytes object per image
        images = pa.array((image(i) for i in range(n)), type=pa.binary(), size=n)
        dataset = LesionDataset(light.assign(image=pd.arrays.ArrowExtensionArray(images)), transform)
        del images
    else:  # the storage before: a Python bytes object per image
        dataset = ListBytesDataset(light.assign(image=[image(i) for i in range(n)]).to_dict("records"), transform)
    gc.collect()
    loader = create_train_loader(dataset, 64, "shuffle", [0] * 8, seed=0, num_workers=args.workers)
    me = psutil.Process()
    before = _memory(me)
    epochs = []
    for epoch in range(1, args.epochs + 1):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for _ in loader:
            pass
        rss, pss = _memory(me)
        epochs.append({"epoch": epoch, "rss_mb": round(rss), "pss_mb": round(pss),
                       "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {kind:6} epoch {epoch}: RSS {rss:7.0f} MB  PSS {pss:7.0f} MB  ({epochs[-1]['seconds']} s)", flush=True)
    data_mb = dataset.images.nbytes / 2**20
    del loader
    gc.collect()
    return {"kind": kind, "images": args.rss_images, "image_bytes_mb": round(data_mb, 1),
            "before_rss_mb": round(before[0]), "epochs": epochs,
            "rss_epoch_last_over_1": round(epochs[-1]["rss_mb"] / epochs[0]["rss_mb"], 3),
            "pss_epoch_last_over_1": round(epochs[-1]["pss_mb"] / epochs[0]["pss_mb"], 3)}


def load_augment(name: str) -> dict:
    with open(os.path.join(ROOT, "conf", "augment", f"{name}.yaml")) as f:
        return yaml.safe_load(f)


def memory_in_fresh_process(args, kind: str) -> dict:
    """loader_memory in a new interpreter: each storage starts from the same clean process (no order effects)."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-only", kind, "--images", str(args.images),
               "--rss-images", str(args.rss_images), "--epochs", str(args.epochs), "--workers", str(args.workers),
               "--augment", args.augment]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    print("\n".join(line for line in done.stdout.splitlines()[:-1] if line.startswith("  ")), flush=True)
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    augment = load_augment(args.augment)
    jpegs = prepared_jpegs(args.images)
    if args.memory_only:
        result = loader_memory(args, args.memory_only, jpegs)
        print(json.dumps(result))
        return result
    print(f"{len(jpegs)} prepared-shard JPEGs (shorter side 512, q90), augment={args.augment}, one thread", flush=True)
    result: dict = {"augment": args.augment, "throughput": throughput(args, jpegs, augment)}
    if args.augment != "siim_isic":
        siim = create_train_transform(spec_for(384), load_augment("siim_isic"))
        rate = max(images_per_s(lambda item: siim(item[0], item[2], item[1]), jpegs) for _ in range(args.rounds))
        result["siim_isic_new_per_core_384"] = round(rate, 1)
        print(f"new path, augment=siim_isic, 384 px: {rate:.1f} img/s/core", flush=True)
    if args.rss_images:
        print(f"loader memory: {args.rss_images} images, {args.workers} workers, {args.epochs} epochs", flush=True)
        result["memory"] = [memory_in_fresh_process(args, kind) for kind in ("packed", "list")]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
