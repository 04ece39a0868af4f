"""`dermaid predict` over a folder (Ray Data, an actor pool of Predictors) next to a bare Predictor loop, as a ratio.

    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/predict_throughput.py                # 1000 toy images
    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/predict_throughput.py --n 400 --model resnet18
    flock /tmp/dermaid-ray.lock .venv/bin/python benchmarks/predict_throughput.py \
        --images /tmp/rehearsal/raw/ISIC_2019_Training_Input --checkpoint runs/toy/best --no-bare   # a 25k folder

The folder is `dermaid synth`'s toy set (ISIC-sized JPEGs, 600x450 to 1280x960) unless --images names one; the
checkpoint an untrained timm model (pretrained=false) at --image-size whose card carries a `preparation` block
(prepared at --prepared-size, as every trained card: the Predictor repeats prepare's resize on each file) unless
--checkpoint names one. The bare loop is what one would write without Ray, in this process: read each file,
Predictor.predict_full on batches of --batch-size, torch using every core. `dermaid predict` is its command function
(dermaid.inference.batch.predict) on a Ray already started (the Ray start-up is timed apart and also shown added),
from its file listing to the four files written, actor start-up included. The bare loop runs before and after and
the two are averaged (other work on a shared machine drifts). Target: ratio >= 0.8.
Results are also written to benchmarks/results/predict_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from dermaid.config import compose
from dermaid.data.synth import generate
from dermaid.inference import Predictor
from dermaid.inference.batch import list_inputs, predict
from dermaid.inference.predictor import set_thread_torch_threads
from dermaid.models.card import build_card, save_checkpoint
from dermaid.models.classifier import create_classifier, resolve_input_spec
from dermaid.ray_runtime import ensure_ray

RESULTS = Path(__file__).resolve().parent / "results" / "predict_throughput.json"


def _checkpoint(out: str, model: str, image_size: int, prepared_size: int) -> str:
    """An untrained model's checkpoint with a preparation block (what a trained card carries)."""
    from dermaid.data.shards import preparation_block

    torch.manual_seed(0)
    model_cfg = {"name": model, "pretrained": False, "use_metadata": True}
    network = create_classifier(model_cfg)
    card = build_card(model_cfg, resolve_input_spec(network, image_size),
                      preparation=preparation_block({"image_size": prepared_size, "quality": 90}))
    save_checkpoint(out, card, network.state_dict())
    return out


def _bare_rate(checkpoint: str, urls: list[str], batch_size: int, threads: int) -> float:
    """Images per second of the plain loop: read, Predictor.predict_full per batch (model load not timed)."""
    set_thread_torch_threads(threads)
    predictor = Predictor(checkpoint)
    predictor.warmup(batch_size)
    start = time.perf_counter()
    for i in range(0, len(urls), batch_size):
        items = []
        for url in urls[i:i + batch_size]:
            with open(url, "rb") as f:
                items.append((f.read(), None, None, None))
        predictor.predict_full(items)
    return len(urls) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="toy images generated (without --images)")
    parser.add_argument("--images", default=None, help="an existing folder of images instead of the toy set")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint instead of the untrained --model")
    parser.add_argument("--model", default="resnet18", help="timm model of the untrained checkpoint")
    parser.add_argument("--image-size", type=int, default=224, help="model input size")
    parser.add_argument("--prepared-size", type=int, default=256, help="the card's preparation image_size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="cores of the local Ray")
    parser.add_argument("--no-bare", action="store_true", help="time `dermaid predict` only (a large folder)")
    parser.add_argument("overrides", nargs="*", help="conf/predict.yaml overrides (actors=2 actor_num_cpus=0.8 ...)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        if args.images:
            folder = args.images
        else:
            started = time.perf_counter()
            generate(f"{tmp}/toy", n=args.n, seed=0)
            folder = f"{tmp}/toy/ISIC_2019_Training_Input"
            print(f"synth: {args.n} toy images in {time.perf_counter() - started:.0f} s")
        checkpoint = args.checkpoint or _checkpoint(f"{tmp}/ckpt", args.model, args.image_size, args.prepared_size)
        urls = [f.url for f in list_inputs(folder).files]
        print(f"{len(urls)} images in {folder}; checkpoint {checkpoint}; {args.num_cpus} cores; "
              f"load average {os.getloadavg()[0]:.1f}")

        bare = [] if args.no_bare else [_bare_rate(checkpoint, urls, args.batch_size, args.num_cpus)]
        if bare:
            print(f"bare Predictor loop (before): {bare[0]:.1f} images/s")
        started = time.perf_counter()
        ensure_ray("local", args.num_cpus)
        ray_start = time.perf_counter() - started
        cfg = compose("predict", [f"checkpoint={checkpoint}", f"inputs={folder}", f"out={tmp}/out",
                                  f"batch_size={args.batch_size}", "progress=false", *args.overrides])
        summary = predict(cfg)
        system = summary["images"] / summary["seconds"]
        print(f"dermaid predict: {summary['images']} images in {summary['seconds']:.1f} s = {system:.1f} images/s "
              f"({summary['errors']} errors); Ray start-up {ray_start:.1f} s")
        if not args.no_bare:
            bare.append(_bare_rate(checkpoint, urls, args.batch_size, args.num_cpus))
            print(f"bare Predictor loop (after): {bare[1]:.1f} images/s")
        result = {"images": summary["images"], "folder": folder, "model": args.checkpoint or args.model,
                  "image_size": args.image_size, "batch_size": args.batch_size, "num_cpus": args.num_cpus,
                  "overrides": args.overrides, "predict_images_per_s": round(system, 2),
                  "predict_seconds": summary["seconds"], "ray_start_seconds": round(ray_start, 2),
                  "load_average": os.getloadavg()[0]}
        if bare:
            mean = sum(bare) / len(bare)
            with_start = summary["images"] / (summary["seconds"] + ray_start)
            result.update(bare_images_per_s=[round(b, 2) for b in bare], ratio=round(system / mean, 3),
                          ratio_with_ray_start=round(with_start / mean, 3))
            print(f"ratio dermaid predict / bare loop: {system / mean:.2f} (target >= 0.8); "
                  f"with Ray's start-up counted: {with_start / mean:.2f}")
        if not args.no_bare:
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
