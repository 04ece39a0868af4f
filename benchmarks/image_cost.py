"""Peak memory of one worst-case image in each replica that handles it (issue #18 item 3), before and after.

    .venv/bin/python benchmarks/image_cost.py                        # this working tree
    .venv/bin/python benchmarks/image_cost.py --before HEAD          # and the code at a git ref, with the ratios
    .venv/bin/python benchmarks/image_cost.py --stages explainer --cases png1bit_50mp

The work of /v1/saliency happens in three places, each measured in a fresh process running the code the replica
runs (the Ingress only holds bytes): the Classifier (Predictor.prepare + forward_full, as serve/classifier.py),
the Explainer (serve/explainer.py's replica class: Grad-CAM overlay + PNG) and the Ingress (serve/ingress.py's
JSON answer around the Explainer's PNG). Each process loads its model, runs one warm-up image, resets the kernel's
RSS high-water mark (/proc/self/clear_refs), handles the image once and reports VmHWM minus the RSS before it:
the memory that one request adds. Limits and overlay size are serve/args.py AppArgs' defaults of the code measured.
`--before REF` runs the same images through the code at a git ref (`git archive`, first on PYTHONPATH).
Results also go to benchmarks/results/image_cost.json.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "image_cost.json"
STAGES = ("classifier", "explainer", "ingress")
PREPARATION = {"image_size": 512, "quality": 90}  # conf/data/isic2019.yaml's prepare settings
MODEL = {"name": "efficientnet_b0", "pretrained": False, "use_metadata": True}  # the default backbone, untrained


# --- images -----------------------------------------------------------------------------------------------------

def _png_1bit(width: int, height: int) -> bytes:
    """The issue's worst case: a 1-bit PNG, a few KB that decode to width x height pixels."""
    img = Image.new("1", (width, height), 1)
    ImageDraw.Draw(img).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=0)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _jpeg(width: int, height: int) -> bytes:
    """A smooth photo-like JPEG (q=90): a few MB, within the upload limit, at width x height."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(60, 220, (24, 36, 3), dtype=np.uint8))
    img = small.resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _cases(saliency_max_pixels: int) -> dict[str, bytes]:
    """name -> bytes: the 50 MP worst cases, and the largest square images the saliency limit lets through."""
    side = math.isqrt(saliency_max_pixels)
    return {
        "png1bit_50mp": _png_1bit(7071, 7071),
        "jpeg_50mp": _jpeg(8660, 5773),
        f"png1bit_{side}": _png_1bit(side, side),
        f"jpeg_{side}": _jpeg(side, side),
    }


def _checkpoint(folder: Path) -> str:
    """An untrained float checkpoint whose card has a `preparation` block (every card trained since it exists)."""
    from dermaid.data.shards import preparation_block
    from dermaid.models.card import build_card, save_checkpoint
    from dermaid.models.classifier import create_classifier, resolve_input_spec

    import torch

    torch.manual_seed(0)  # the same weights, so the same heat map and overlay PNG, in every run
    model = create_classifier(MODEL)
    url = str(folder / "checkpoint")
    card = build_card(MODEL, resolve_input_spec(model, 224), preparation=preparation_block(PREPARATION))
    save_checkpoint(url, card, model.state_dict())
    return url


# --- one stage in this process --------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _measure(request) -> dict:
    """Run request() once; the RSS it added at its peak (MB) and its seconds."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    answer = request()
    seconds = time.perf_counter() - start
    return {"added_mb": round((_status_kb("VmHWM") - before) / 1024, 1), "seconds": round(seconds, 2), **answer}


def _app_args(checkpoint: str, saliency_max_pixels: int | None) -> dict:
    """The measured code's AppArgs defaults: the classify limit, the saliency limit (the classify one where the code
    has none) and the overlay's long side (None where the code has none)."""
    from serve.args import AppArgs

    args = AppArgs(checkpoint=checkpoint)
    limit = saliency_max_pixels or getattr(args, "saliency_max_pixels", args.max_pixels)
    return {"max_pixels": args.max_pixels, "saliency_max_pixels": limit,
            "overlay_max_side": getattr(args, "overlay_max_side", None), "explainer": args.explainer,
            "classifier": args.classifier}


def _classifier_stage(data: bytes, checkpoint: str, settings: dict, **_) -> dict:
    from dermaid.errors import DermaidError
    from dermaid.inference import Predictor, set_thread_torch_threads

    set_thread_torch_threads(settings["classifier"].torch_threads)
    predictor = Predictor(checkpoint, max_pixels=settings["max_pixels"])
    predictor.predict([(_jpeg(600, 450), None, None, None)])  # warm-up

    def request() -> dict:
        try:
            prepared = predictor.prepare(data)
        except DermaidError as exc:
            return {"answer": f"refused: {type(exc).__name__}"}
        metadata = predictor.encode_metadata()[None]  # (1, 14)
        predictor.forward_full(prepared.tensor[None], metadata)  # (1, 3, H, W) -> (1, 8)
        return {"answer": "probabilities"}

    return _measure(request)


def _explainer_stage(data: bytes, checkpoint: str, settings: dict, png_path: str, full_size: bool, **_) -> dict:
    from dermaid.errors import DermaidError
    from serve.errors import describe_image_error
    from serve.explainer import Explainer

    replica_class = Explainer.func_or_class  # the class Serve instantiates, without Serve
    spec = settings["explainer"]
    given = {"checkpoint": checkpoint, "device": "cpu", "max_pixels": settings["saliency_max_pixels"],
             "torch_threads": spec.torch_threads, "concurrency": spec.concurrency,
             "overlay_max_side": settings["overlay_max_side"]}
    params = inspect.signature(replica_class.__init__).parameters
    replica = replica_class(**{k: v for k, v in given.items() if k in params})
    options = {"full_size": True} if full_size else {}

    def request() -> dict:
        try:
            out = replica._pool.submit(replica._explain, data, None, None, None, None, "gradcam", **options).result()
        except DermaidError as exc:  # as Explainer.explain answers it
            return {"answer": f"{describe_image_error(exc, data)['status']} {type(exc).__name__}"}
        Path(png_path).write_bytes(out["png"])
        return {"answer": f"overlay {out['width']}x{out['height']}", "png_mb": round(len(out["png"]) / 2**20, 2)}

    return _measure(request)


def _ingress_stage(png_path: str, **_) -> dict:
    from serve.ingress import _saliency_json

    if not Path(png_path).exists():
        return {"answer": "no overlay (the explainer refused the image)", "added_mb": 0.0, "seconds": 0.0}
    ood = {"ood_score": None, "abstain": None, "probabilities_reliable": True, "message": None}

    def request() -> dict:
        png = Path(png_path).read_bytes()  # what arrives from the Explainer
        out = {"png": png, "target": "NV", "probability": 0.5, "method": "gradcam", "layer": "x", "width": 1,
               "height": 1, "model_version": "v"}
        response = _saliency_json(out, ood)  # what the consumer page asks for (format=json)
        return {"answer": f"json {len(response.body) / 2**20:.1f} MB"}

    return _measure(request)


def _worker(args: argparse.Namespace) -> None:
    settings = _app_args(args.checkpoint, args.saliency_max_pixels)
    stage = {"classifier": _classifier_stage, "explainer": _explainer_stage, "ingress": _ingress_stage}[args.worker]
    result = stage(data=Path(args.image).read_bytes(), checkpoint=args.checkpoint, settings=settings,
                   png_path=args.png, full_size=args.full_size)
    import dermaid

    result["code_path"] = str(Path(dermaid.__file__).parent.parent)
    print("RESULT " + json.dumps(result))


# --- the parent: cases x stages x code versions -----------------------------------------------------------------

def _code_at(ref: str, folder: Path) -> Path:
    """The dermaid and serve packages as they are at git ref `ref`, extracted under folder."""
    archive = subprocess.run(["git", "archive", ref, "dermaid", "serve"], cwd=REPO, check=True,
                             capture_output=True).stdout
    target = folder / f"code-{ref.replace('/', '_')}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def _run(stage: str, image: Path, checkpoint: str, png: Path, code: Path, full_size: bool = False,
         saliency_max_pixels: int | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", stage, "--image", str(image), "--checkpoint", checkpoint,
               "--png", str(png)]
    if full_size:
        command.append("--full-size")
    if saliency_max_pixels:
        command += ["--saliency-max-pixels", str(saliency_max_pixels)]
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{stage} on {image.name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    if Path(result["code_path"]).resolve() != code.resolve():
        raise RuntimeError(f"measured {result['code_path']}, not {code}: PYTHONPATH did not take precedence")
    return result


def _variants(before: str | None, work: Path) -> list[tuple[str, Path, dict, str]]:
    """(label, code folder, run options, the cases it runs on: "" all, "50mp" or "limit"): the ref's code; this tree;
    this tree with the saliency limit raised to max_pixels (the bounded overlay alone); full_size=true at the limit."""
    variants = [] if before is None else [(f"before ({before})", _code_at(before, work), {}, "")]
    variants.append(("after", REPO, {}, ""))
    variants.append(("after, limit 50 MP", REPO, {"saliency_max_pixels": 50_000_000}, "50mp"))
    variants.append(("after, full_size=true", REPO, {"full_size": True}, "limit"))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="git ref whose code is measured first (e.g. HEAD)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--cases", nargs="+", help="case names (default: all)")
    parser.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--png", help=argparse.SUPPRESS)
    parser.add_argument("--full-size", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--saliency-max-pixels", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    from serve.args import AppArgs

    saliency_limit = AppArgs.model_fields["saliency_max_pixels"].default
    with tempfile.TemporaryDirectory(prefix="image_cost-") as tmp:
        work = Path(tmp)
        checkpoint = _checkpoint(work)
        cases = {name: data for name, data in _cases(saliency_limit).items() if not args.cases or name in args.cases}
        rows = []
        for name, data in cases.items():
            image = work / name
            image.write_bytes(data)
            with Image.open(image) as img:
                size = f"{img.width}x{img.height} {img.format} {img.mode}, {len(data) / 1024:.0f} KB"
            for label, code, options, only in _variants(args.before, work):
                if only and (only == "50mp") != name.endswith("50mp"):
                    continue
                png = work / f"{name}-{label.replace(' ', '_')}.png"
                png.unlink(missing_ok=True)
                for stage in args.stages:
                    result = _run(stage, image, checkpoint, png, code, **options)
                    rows.append({"case": name, "image": size, "code": label, "stage": stage, **result})
                    print(f"{name:14s} {label:22s} {stage:10s} +{result['added_mb']:7.1f} MB "
                          f"{result['seconds']:6.2f} s  {result['answer']}", flush=True)
    _print_ratios(rows, args.before)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"saliency_max_pixels": saliency_limit, "rows": rows}, indent=1))


def _print_ratios(rows: list[dict], before: str | None) -> None:
    """Per case and stage: the memory one request adds before, and after in each variant, with the ratio."""
    if before is None:
        return
    print("\nmemory one request adds, before -> after (ratio):")
    for old in (row for row in rows if row["code"].startswith("before")):
        for new in (row for row in rows if not row["code"].startswith("before")
                    and (row["case"], row["stage"]) == (old["case"], old["stage"])):
            refused = new["answer"].startswith(("413", "no overlay", "refused"))
            ratio = "refused" if refused else f"{old['added_mb'] / max(new['added_mb'], 0.1):.1f}x"
            print(f"  {old['case']:14s} {old['stage']:10s} {old['added_mb']:7.1f} MB -> {new['added_mb']:7.1f} MB "
                  f"({ratio}; {new['code']})")


if __name__ == "__main__":
    main()
