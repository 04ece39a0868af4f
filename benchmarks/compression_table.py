"""The compression trade-off table: teacher, distilled student, int8 and exported variants, side by side (CPU).

    .venv/bin/python benchmarks/compression_table.py checkpoint=runs/tune/toy/best student=runs/distill/toy/best
    .venv/bin/python benchmarks/compression_table.py checkpoint=CKPT threads=2 rounds=5 out=reports/compression
    .venv/bin/python benchmarks/compression_table.py checkpoint=CKPT variants=float,int8_static rounds=1 val_limit=32

For the teacher (`checkpoint=`) and, when given, the student (`student=`) it builds what is missing under
OUT/artifacts/ (dermaid.compress: int8 static + dynamic with ONNX Runtime, ONNX and TorchScript exports),
loads every variant through the Predictor loaders (the Serve path) and measures:
    parameters    of the architecture (int8 keeps the count, stores 1 byte instead of 4)
    file MB       the artifact on disk
    b1 / b8 ms    median CPU latency of one forward at batch 1 and batch 8 on preprocessed tensors,
                  all variants interleaved round by round (a shared machine drifts), same thread count
    balanced acc  on the validation fold of the checkpoint's dataset version (the toy set for toy runs)
    agreement     top-1 agreement with the teacher's float model on those images
Writes OUT/compression_table.csv and OUT/compression_table.md and prints the Markdown table.
Arguments: checkpoint= (required), student=, out= (default reports/compression), threads= (default 2),
rounds= (5), iters= (10 per round and batch), variants= (comma list of float, onnx, torchscript,
int8_static, int8_dynamic), student_variants= (default float,int8_static), val_limit=, data.KEY=VALUE
(overrides of the `data` group, e.g. data.prepared_dir=..., data.version=...).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dermaid.config import compose, to_plain
from dermaid.errors import DermaidError
from dermaid.files import exists, join
from dermaid.models.card import ModelCard

VARIANTS = {  # name -> (what builds it, its kind); "float" is the checkpoint itself
    "float": None,
    "onnx": ("export", {"format": "onnx"}),
    "torchscript": ("export", {"format": "torchscript"}),
    "int8_static": ("quantize", {"method": "static"}),
    "int8_dynamic": ("quantize", {"method": "dynamic"}),
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {"out": "reports/compression", "threads": 2, "rounds": 5, "iters": 10,
                            "variants": "float,onnx,torchscript,int8_static,int8_dynamic",
                            "student_variants": "float,int8_static", "val_limit": None, "data": []}
    for item in argv:
        if "=" not in item:
            raise SystemExit(f"error: expected key=value, got {item!r}\n\n{__doc__}")
        key, value = item.split("=", 1)
        if key.startswith("data."):
            args["data"].append(item)
        else:
            args[key] = value
    if "checkpoint" not in args:
        raise SystemExit(f"error: checkpoint= is required\n\n{__doc__}")
    return args


def build_variant(source: str, name: str, work: Path, data_overrides: list[str]) -> str:
    """The checkpoint URL of one variant of `source`, built under `work` when missing."""
    if VARIANTS[name] is None:
        return source
    command, extra = VARIANTS[name]
    url = str(work / name)
    if exists(join(url, "card.json")):
        return url
    if command == "export":
        from dermaid.compress.export import run_export

        run_export(compose("export", [f"checkpoint={source}", f"out={url}", f"format={extra['format']}"]))
    else:
        from dermaid.compress.quantize import quantize_checkpoint

        quantize_checkpoint(to_plain(compose("quantize", [f"checkpoint={source}", f"out={url}",
                                                          f"method={extra['method']}", "evaluate=false",
                                                          *data_overrides])))
    return url


def _load(url: str):
    from dermaid.inference import create_model_fn
    from dermaid.models.card import load_card

    card = load_card(url)
    return create_model_fn(url, card, torch.device("cpu")), card


def _parameters(card: ModelCard) -> int:
    from dermaid.models.classifier import create_classifier

    return sum(p.numel() for p in create_classifier({**card.model, "pretrained": False}).parameters())


def _file_mb(url: str, card: ModelCard) -> float:
    from dermaid.files import get_fs

    fs, path = get_fs(join(url, card.artifact))
    return fs.size(path) / 1e6


def _time(fn, images: torch.Tensor, metadata: torch.Tensor, iters: int) -> list[float]:
    times = []
    with torch.inference_mode():
        fn(images, metadata)  # warm-up (ONNX Runtime allocates on the first run per shape)
        for _ in range(iters):
            start = time.perf_counter()
            fn(images, metadata)
            times.append((time.perf_counter() - start) * 1000)
    return times


def predict_logits(model, loader) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = [], []
    with torch.inference_mode():
        for images, metadata, y in loader:
            logits.append(torch.as_tensor(model(images, metadata)).float())  # (B, 8)
            labels.append(y)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from dermaid.compress.quantize import resolve_data_version
    from dermaid.data.loading import load_records
    from dermaid.data.torch_dataset import create_eval_loader
    from dermaid.evaluation.metrics import compute_metrics
    from dermaid.models.card import load_card
    from dermaid.models.metadata import missing_metadata

    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = int(args["threads"])
    torch.set_num_threads(threads)  # ONNX Runtime sessions take the same count (dermaid.compress.runtime)
    out = Path(args["out"])
    teacher_url = str(args["checkpoint"])
    teacher_card = load_card(teacher_url)
    plan = [("teacher", teacher_url, [v for v in str(args["variants"]).split(",") if v])]
    if args.get("student"):
        plan.append(("student", str(args["student"]), [v for v in str(args["student_variants"]).split(",") if v]))
    unknown = sorted({v for _, _, names in plan for v in names} - set(VARIANTS))
    if unknown:
        raise DermaidError(f"variants: unknown {unknown}; expected some of {sorted(VARIANTS)}")

    data_plain = to_plain(compose("quantize", [f"checkpoint={teacher_url}", *args["data"]]))
    version_url = resolve_data_version(data_plain, teacher_card)
    val = load_records(version_url, split="val", fold=int(data_plain["data"]["fold"]))
    if args.get("val_limit"):
        val = val.head(int(args["val_limit"]))
    if val.empty:
        raise DermaidError(f"{version_url}: no validation images")

    rows: list[dict[str, Any]] = []
    for role, source, names in plan:
        source_card = load_card(source)
        params = _parameters(source_card)
        for name in names:
            url = build_variant(source, name, out / "artifacts" / role, args["data"])
            model, card = _load(url)
            rows.append({"model": f"{role} {name}", "backbone": card.model_name, "kind": card.kind,
                         "parameters": params, "file MB": _file_mb(url, card), "_model": model, "_card": card,
                         "url": url})

    # accuracy: every model on the same validation images, through its own card's preprocessing
    teacher_logits = None
    for row in rows:
        loader = create_eval_loader(val, row["_card"].input, batch_size=32)
        logits, labels = predict_logits(row["_model"], loader)
        labelled = labels >= 0
        probs = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
        row["balanced acc"] = float(compute_metrics(labels[labelled], probs[labelled])["balanced_accuracy"])
        if teacher_logits is None:
            teacher_logits = logits
        row["agreement"] = float((logits.argmax(1) == teacher_logits.argmax(1)).mean())

    # latency at each model's own input size
    for row in rows:
        _, h, w = row["_card"].input_size
        generator = torch.Generator().manual_seed(0)
        row["_batches"] = {b: (torch.randn(b, 3, h, w, generator=generator), missing_metadata(b)) for b in (1, 8)}
    samples: dict[tuple[int, int], list[float]] = {}
    for _ in range(int(args["rounds"])):
        for i, row in enumerate(rows):
            for size, (images, metadata) in row["_batches"].items():
                samples.setdefault((i, size), []).extend(_time(row["_model"], images, metadata, int(args["iters"])))
    for i, row in enumerate(rows):
        for size in (1, 8):
            row[f"b{size} ms"] = statistics.median(samples[(i, size)])
    base = rows[0]
    for row in rows:
        row["speed-up b1"] = base["b1 ms"] / row["b1 ms"]
        row["speed-up b8"] = base["b8 ms"] / row["b8 ms"]
        row["acc kept"] = row["balanced acc"] / base["balanced acc"] if base["balanced acc"] else float("nan")

    columns = ["model", "backbone", "kind", "parameters", "file MB", "b1 ms", "b8 ms", "speed-up b1", "speed-up b8",
               "balanced acc", "acc kept", "agreement"]
    table = pd.DataFrame([{k: r[k] for k in columns} for r in rows])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compression_table.csv", index=False, float_format="%.4g")
    markdown = _markdown(table, threads, int(args["rounds"]) * int(args["iters"]), len(val), version_url)
    (out / "compression_table.md").write_text(markdown)
    (out / "compression_table.json").write_text(json.dumps(
        {"threads": threads, "rounds": int(args["rounds"]), "iters": int(args["iters"]), "val_images": int(len(val)),
         "dataset_version": version_url, "rows": table.to_dict("records")}, indent=2, default=float))
    print(markdown)
    return table


def _markdown(table: pd.DataFrame, threads: int, samples: int, n_val: int, version_url: str) -> str:
    formats = {"parameters": lambda v: f"{v / 1e6:.2f} M", "file MB": "{:.1f}".format, "b1 ms": "{:.2f}".format,
               "b8 ms": "{:.2f}".format, "speed-up b1": "{:.2f}x".format, "speed-up b8": "{:.2f}x".format,
               "balanced acc": "{:.3f}".format, "acc kept": "{:.1%}".format, "agreement": "{:.1%}".format}
    header = "| " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "|".join("---" for _ in table.columns) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(formats.get(c, str)(row[c]) if c in formats else str(row[c])
                                       for c in table.columns) + " |")
    note = (f"\nCPU, {threads} threads (torch and ONNX Runtime alike); latency = median of {samples} forwards per "
            f"cell on preprocessed tensors, variants interleaved; balanced accuracy on {n_val} validation images of "
            f"{version_url.rstrip('/').rsplit('/', 1)[-1]}; speed-up and accuracy kept relative to the first row.\n")
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    try:
        main()
    except DermaidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
