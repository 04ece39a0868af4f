"""Training-step throughput: dermaid.training.loop.train_one_epoch with torch and timm alone, and
(where Ray is installed) the same step inside a one-worker Ray Train TorchTrainer, as a ratio.

    python benchmarks/train_throughput.py                                  # GPU: efficientnet_b0, 224 px, batch 128, AMP, channels_last
    python benchmarks/train_throughput.py --batch 16 --size 96 --steps 10 --model resnet10t   # a CPU smoke run
    python benchmarks/train_throughput.py --no-ray                         # torch alone

Runs on a machine with torch + timm + torchvision only (no Ray, no pandas, no Hydra, the package not
installed): it puts the repository root on sys.path itself. Images are generated tensors already on
the device, so this measures the model step (forward, loss, backward, AdamW, cosine schedule), not
JPEG decoding. Prints a human-readable summary and one JSON line (the last line).
Target: Ray's wrapping costs under 5% (ray_over_plain >= 0.95).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dermaid.classes import NUM_CLASSES  # noqa: E402
from dermaid.models.classifier import LesionClassifier  # noqa: E402
from dermaid.models.metadata import METADATA_DIM  # noqa: E402
from dermaid.training import loop  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_b0", help="timm backbone name")
    p.add_argument("--size", type=int, default=224, help="input size (pixels)")
    p.add_argument("--batch", type=int, default=128, help="images per step")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cudnn autotune, allocator)")
    p.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | off (auto: bf16 on GPU, off on CPU)")
    p.add_argument("--channels-last", default="auto", help="auto | true | false (auto: on for GPU)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in both measurements, and the Ray worker's CPUs (0: all cores on CPU; "
                        "on GPU, cores - 1)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Train comparison")
    p.add_argument("--repeats", type=int, default=2, help="alternating plain/Ray measurements; best of each")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of loop.train_one_epoch over generated batches on `device`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp_dtype = loop.resolve_amp_dtype(args.amp, device)
    channels_last = loop.resolve_channels_last(
        args.channels_last if args.channels_last == "auto" else args.channels_last.lower() == "true", device)
    loop.set_seed(0)
    model = LesionClassifier(args.model, pretrained=False, use_metadata=True).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:  # inside Ray Train: the same model, prepared the way training/worker.py prepares it
        import ray.train.torch

        if ray.train.get_context() is not None:
            model = ray.train.torch.prepare_model(model, move_to_device=False)
    except Exception:  # no Ray, or not inside a Ray Train worker
        pass
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)  # (B, 3, H, W)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    metadata = torch.zeros(args.batch, METADATA_DIM, device=device)  # (B, 14)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)  # (B,)
    optimizer = loop.create_optimizer(model, 3e-4, 0.05)
    scheduler = loop.create_cosine_schedule(optimizer, args.warmup + args.steps, args.warmup)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    loss_fn = torch.nn.CrossEntropyLoss()
    common = dict(amp_dtype=amp_dtype, channels_last=channels_last, scaler=scaler, metadata_dropout=0.3)
    batch = (images, metadata, labels)
    loop.train_one_epoch(model, [batch] * args.warmup, optimizer, scheduler, loss_fn, device, **common)
    stats = loop.train_one_epoch(model, [batch] * args.steps, optimizer, scheduler, loss_fn, device, **common)
    return {
        "images_per_s": stats["images_per_s"],
        "step_ms": 1000.0 * stats["seconds"] / max(1, stats["steps"]),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "channels_last": channels_last,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def _ray_worker(config: dict) -> None:
    """Runs in the Ray Train worker: loads this script as a module (a function defined in __main__
    would be pickled by value, with torch's modules) and reports its measurement."""
    import ray.train
    import ray.train.torch

    spec = importlib.util.spec_from_file_location("train_throughput", config["_script"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(**{k: v for k, v in config.items() if k != "_script"})
    metrics = module.measure(args, ray.train.torch.get_device())
    with tempfile.TemporaryDirectory() as tmp:  # Train V2 keeps only metrics reported with a checkpoint
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def measure_in_ray(args: argparse.Namespace, use_gpu: bool) -> dict:
    """The same measurement inside a one-worker TorchTrainer (Ray Train V2)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dermaid.ray_runtime import ensure_ray

    ensure_ray(log_to_driver=False)  # $RAY_ADDRESS, else a private local Ray
    cpus = args.threads  # the same threads as the plain run: Ray sets OMP_NUM_THREADS to the worker's CPUs
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={**vars(args), "_script": os.path.abspath(__file__)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-ray-"), name="throughput"),
    )
    return trainer.fit().metrics


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = loop.resolve_device(args.device)
    if not args.threads:  # one thread count for both sides, or the comparison measures threads, not Ray
        cores = os.cpu_count() or 1
        args.threads = cores if device.type == "cpu" else max(1, min(cores, 8) - 1)
    have_ray = not args.no_ray and importlib.util.find_spec("ray") is not None
    plain_runs, ray_runs = [], []
    for _ in range(max(1, args.repeats if have_ray else 1)):
        plain_runs.append(measure(args, device))
        print(f"plain torch : {plain_runs[-1]['images_per_s']:.1f} images/s ({plain_runs[-1]['step_ms']:.1f} ms/step)",
              flush=True)
        if have_ray:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ray_runs.append(measure_in_ray(args, device.type == "cuda"))
            print(f"Ray Train   : {ray_runs[-1]['images_per_s']:.1f} images/s ({ray_runs[-1]['step_ms']:.1f} ms/step)",
                  flush=True)
    plain = max(plain_runs, key=lambda r: r["images_per_s"])
    result = {
        "benchmark": "train_throughput", "model": args.model, "size": args.size, "batch": args.batch,
        "steps": args.steps, "device": plain["device"], "gpu": plain["gpu"], "amp": plain["amp"],
        "channels_last": plain["channels_last"], "torch": torch.__version__,
        "plain_images_per_s": round(plain["images_per_s"], 2),
        "ray_images_per_s": None, "ray_over_plain": None,
    }
    if ray_runs:
        best = max(ray_runs, key=lambda r: r["images_per_s"])
        result["ray_images_per_s"] = round(best["images_per_s"], 2)
        result["ray_over_plain"] = round(best["images_per_s"] / plain["images_per_s"], 4)
        verdict = "OK" if result["ray_over_plain"] >= 0.95 else "over the 5% target"
        print(f"Ray / plain : {result['ray_over_plain']:.3f} ({verdict})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
