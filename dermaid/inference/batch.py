"""`dermaid predict`: one image -> a readable answer; a folder, glob or bucket -> Ray Data batch inference.

    dermaid predict checkpoint=runs/toy/best inputs=photo.jpg                       # one image, printed
    dermaid predict checkpoint=runs/toy/best inputs=photo.jpg age=55 sex=male site='posterior torso'
    dermaid predict checkpoint=runs/toy/best inputs=data/toy/ISIC_2019_Training_Input out=runs/predict/toy
    dermaid predict checkpoint=runs/toy/best-int8-static inputs='data/new/*.jpg' out=runs/predict/new
    dermaid predict checkpoint=gs://b/runs/x/best inputs=gs://b/incoming out=gs://b/predict/x ray.address=auto \
        actors=4 num_gpus=1 batch_size=128                                          # a 4-GPU node

One image (a file or URL) runs in this process through dermaid.inference.Predictor (every artifact kind it loads)
and prints the top classes, the malignancy score and triage message, or the abstention and retake message when the
card's OOD detector refuses the photo (dermaid.inference.triage.build_result: the answer Serve gives), with the
decision-support disclaimer. A folder, a glob or a bucket prefix runs on Ray Data: the file list (image file names
by the formats Serve accepts) -> read tasks (fsspec, the upload size limit checked before reading) -> map_batches on
an actor pool of Predictors (each decodes with Serve's limits: dermaid.inference.decoding, then one forward per
batch) -> on the driver, `out`:

    predictions.csv   the ISIC submission format (evaluate's writer, submission_csv; UNK: the OOD score, 0 without)
    details.csv       per image: image, path, top class and probability, malignancy score, triage, ood_score, abstain
    errors.csv        path, reason: every file that could not be read or decoded; the rest is still predicted
    summary.json      counts, seconds, images/s, the model version and the disclaimer

Folder images are predicted without metadata (age, sex and site missing: what a client that sends none gets).
Outputs are decision support for research, never a diagnosis.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from dermaid.classes import AGE_RANGE, DISCLAIMER, NUM_CLASSES, SEXES, SITES
from dermaid.config import to_plain
from dermaid.data.images import ALLOWED_FORMATS
from dermaid.errors import DermaidError
from dermaid.data.bounded_read import MIB, read_batch, read_limited
from dermaid.files import get_fs, join, write_text

PREDICTIONS_FILE = "predictions.csv"   # the same name `dermaid evaluate` writes
DETAILS_FILE = "details.csv"
ERRORS_FILE = "errors.csv"
SUMMARY_FILE = "summary.json"
GLOB_CHARS = "*?["


def image_suffixes() -> frozenset[str]:
    """File name endings of the formats Serve accepts (dermaid.data.images.ALLOWED_FORMATS, from PIL's table)."""
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in ALLOWED_FORMATS)


@dataclass(frozen=True)
class InputFile:
    """One file to predict: its URL and listed size in bytes (None when the listing gives none)."""

    url: str
    size: int | None


@dataclass(frozen=True)
class Inputs:
    """What `inputs=` named: one file (single), or the image files of a folder / glob / prefix, and how many files
    were left out for their name (not an image format)."""

    files: list[InputFile]
    single: bool
    skipped: int = 0


def list_inputs(inputs: str) -> Inputs:
    """`inputs=` -> the files to predict. DermaidError (exit 2) when nothing is there or nothing is an image."""
    if not inputs:
        raise DermaidError("inputs= is required: an image file, a folder, a glob or a URL (gs://bucket/prefix)")
    try:
        fs, path = get_fs(inputs)
        if any(char in path for char in GLOB_CHARS):
            listing = fs.glob(path, detail=True)
        elif fs.isdir(path):
            listing = fs.find(path, detail=True)
        elif fs.isfile(path):
            return Inputs([InputFile(inputs, fs.size(path))], single=True)
        else:
            raise DermaidError(f"inputs={inputs}: no such file or folder")
    except DermaidError:
        raise
    except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own types (permissions, network, bucket)
        raise DermaidError(f"inputs={inputs}: could not be listed ({type(exc).__name__}: {exc})") from None
    suffixes = image_suffixes()
    files = sorted((name, info) for name, info in listing.items() if info.get("type", "file") == "file")
    chosen = [InputFile(fs.unstrip_protocol(name) if "://" in inputs else name, info.get("size"))
              for name, info in files if posixpath.splitext(name)[1].lower() in suffixes]
    if not files:
        raise DermaidError(f"inputs={inputs}: no files (an empty folder, or a glob that matches nothing)")
    if not chosen:
        raise DermaidError(f"inputs={inputs}: {len(files)} file(s), none named as an image "
                           f"({', '.join(sorted(suffixes))})")
    return Inputs(chosen, single=False, skipped=len(files) - len(chosen))


def image_ids(urls: list[str]) -> list[str]:
    """The ISIC `image` column: the file name without its extension; where two files share a name, their paths
    (without extension) below the common folder."""
    stems = [posixpath.splitext(posixpath.basename(url))[0] for url in urls]
    repeated = {stem for stem, count in Counter(stems).items() if count > 1}
    if not repeated:
        return stems
    root = posixpath.commonpath([url.split("://", 1)[-1] for url in urls]) if len(urls) > 1 else ""
    return [posixpath.splitext(url.split("://", 1)[-1][len(root):].lstrip("/"))[0] if stem in repeated else stem
            for url, stem in zip(urls, stems)]


# ---------------------------------------------------------------------------------------------
# One image


def format_result(name: str, result: dict[str, Any], model_version: str, top_k: int = 3) -> str:
    """build_result's answer (the one Serve gives) as lines people read."""
    lines = [f"{name} (model {model_version})"]
    if result.get("abstain"):
        lines.append(f"  abstained: OOD score {result['ood_score']:.3g} is above the card's threshold")
        lines.append(f"  {result['message']}")
        lines.append("  probabilities (unreliable for this photo):")
    for row in result["probabilities"][:top_k]:
        lines.append(f"  {row['code']:<5} {row['name']:<28} {row['probability']:.3f}")
    if not result.get("abstain"):
        triage = result["triage"]
        lines.append(f"  malignancy score {result['malignancy_score']:.3f} -> {triage['level']}: {triage['message']}")
        if result.get("ood_score") is not None:
            lines.append(f"  OOD score {result['ood_score']:.3g}: within what the model was trained on")
        elif "ood_score" not in result:
            lines.append("  no OOD detector in this checkpoint (`dermaid calibrate` adds one): nothing is refused")
    lines.append(result["disclaimer"])
    return "\n".join(lines)


def predict_one(plain: dict[str, Any], file: InputFile) -> dict[str, Any]:
    """One image through the Predictor in this process: build_result's answer, printed."""
    from dermaid.inference.predictor import Predictor
    from dermaid.inference.triage import build_result

    metadata = _metadata(plain)
    predictor = Predictor(str(plain["checkpoint"]), device=_device(plain), max_pixels=int(plain["max_pixels"]))
    try:
        data = read_limited(file.url, file.size, int(float(plain["max_upload_mb"]) * MIB))
        batch = predictor.predict_full([(data, *metadata)])
    except DermaidError as exc:
        raise DermaidError(f"inputs={file.url}: {exc}") from None
    ood = {} if batch.ood_scores is None else {"ood_score": batch.ood_scores[0], "abstain": batch.abstain[0]}
    result = build_result(batch.probabilities[0], list(plain["malignant_codes"]), dict(plain["triage"]),
                          operating_point=predictor.card.triage, **ood)
    print(format_result(file.url, result, predictor.version, int(plain["top_k"])))
    if plain["out"]:
        row = {"index": 0, "url": file.url, "error": "", "probabilities": batch.probabilities[0],
               "ood_score": np.nan if batch.ood_scores is None else float(batch.ood_scores[0]),
               "abstain": -1 if batch.abstain is None else int(batch.abstain[0]),
               "unk": 0.0 if batch.ood_scores is None else float(predictor.ood.unk(batch.ood_scores)[0])}
        _write_outputs(str(plain["out"]), plain, predictor.version, [row], [], 0, 0.0)
    return {"single": True, "result": result, "model_version": predictor.version}


# ---------------------------------------------------------------------------------------------
# Ray Data: read tasks -> an actor pool of Predictors


class PredictorActor:
    """A Ray Data actor: one Predictor, loaded once; a batch of bytes -> probabilities, OOD score, abstain, UNK.

    Each image is decoded on its own (Predictor.prepare: Serve's limits and errors), so one hostile file costs
    only its own row; the decodable ones go through one forward (Predictor.forward_full)."""

    def __init__(self, checkpoint: str, device: str, max_pixels: int, torch_threads: int) -> None:
        from dermaid.inference.predictor import Predictor, set_thread_torch_threads

        self.threads = int(torch_threads)
        set_thread_torch_threads(self.threads)
        self.predictor = Predictor(checkpoint, device=device, max_pixels=max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from dermaid.inference.predictor import set_thread_torch_threads

        set_thread_torch_threads(self.threads)  # Ray Data may call from another thread than __init__ ran in
        size = len(batch["url"])
        errors = [str(error) for error in batch["error"]]
        tensors, keep = [], []
        for i, data in enumerate(batch["data"]):
            if errors[i]:
                continue
            try:
                tensors.append(self.predictor.prepare(bytes(data)).tensor)  # (3, H, W)
                keep.append(i)
            except Exception as exc:  # noqa: BLE001 - one file's failure is its row's error, never the run's
                errors[i] = str(exc) if isinstance(exc, DermaidError) else f"could not be prepared: {type(exc).__name__}"
        probs = np.full((size, NUM_CLASSES), np.nan)
        ood, unk = np.full(size, np.nan), np.zeros(size)
        abstain = np.full(size, -1, dtype=np.int8)  # -1: no detector (or not predicted)
        if keep:
            images = torch.stack(tensors)  # (B, 3, H, W)
            metadata = torch.stack([self.predictor.encode_metadata()] * len(keep))  # (B, 14): all missing
            out = self.predictor.forward_full(images, metadata)
            probs[keep] = out.probabilities
            if out.ood_scores is not None:
                ood[keep], abstain[keep] = out.ood_scores, out.abstain
                unk[keep] = self.predictor.ood.unk(out.ood_scores)
        return {"index": batch["index"], "url": batch["url"], "error": np.array(errors, dtype=object),
                "probabilities": probs, "ood_score": ood, "abstain": abstain, "unk": unk}


def predict_files(plain: dict[str, Any], files: list[InputFile]) -> list[dict[str, Any]]:
    """The files through Ray Data (read tasks, then map_batches on an actor pool of Predictors): one dict per file,
    in the files' order (error "" when predicted)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from dermaid.files import absolute_url
    from dermaid.ray_runtime import ensure_ray_for

    ensure_ray_for(plain)
    context = DataContext.get_current()
    context.enable_progress_bars = bool(plain["progress"])
    batch_size = int(plain["batch_size"])
    items = [{"index": i, "url": f.url, "size": -1 if f.size is None else int(f.size)} for i, f in enumerate(files)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    # One read task per block of about batch_size files (batch_size=None: a task reads its whole block).
    dataset = dataset.map_batches(read_batch, batch_size=None, batch_format="numpy",
                                  num_cpus=float(plain["read_num_cpus"]),
                                  fn_kwargs={"max_bytes": int(float(plain["max_upload_mb"]) * MIB)})
    dataset = dataset.map_batches(
        PredictorActor, batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=int(plain["actors"])),
        num_cpus=float(plain["actor_num_cpus"]), num_gpus=float(plain["num_gpus"]),
        fn_constructor_kwargs={"checkpoint": absolute_url(str(plain["checkpoint"])), "device": _device(plain),
                               "max_pixels": int(plain["max_pixels"]), "torch_threads": int(plain["torch_threads"])})
    rows: list[dict[str, Any]] = []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["index"])):
            rows.append({key: batch[key][i] for key in ("index", "url", "error", "probabilities", "ood_score",
                                                          "abstain", "unk")})
    rows.sort(key=lambda row: int(row["index"]))
    return rows


def _metadata(plain: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(age, sex, site) of one image, checked against Serve's ranges and the vocabularies (dermaid.classes): a typo
    is an error here, where encode_metadata would take it for a missing value."""
    age, sex, site = plain["age"], plain["sex"], plain["site"]
    if age is not None and (not isinstance(age, (int, float)) or not AGE_RANGE[0] <= age <= AGE_RANGE[1]):
        raise DermaidError(f"age={age!r}: expected a number from {AGE_RANGE[0]} to {AGE_RANGE[1]}")
    if sex is not None and str(sex).lower() not in SEXES:
        raise DermaidError(f"sex={sex!r}: expected one of {list(SEXES)}")
    if site is not None and str(site).lower() not in SITES:
        raise DermaidError(f"site={site!r}: expected one of {list(SITES)}")
    return age, sex, site


def _device(plain: dict[str, Any]) -> str:
    """cuda for actors that hold a GPU, else cpu."""
    return "cuda" if float(plain.get("num_gpus") or 0) > 0 else "cpu"


# ---------------------------------------------------------------------------------------------
# Outputs


def _write_outputs(out: str, plain: dict[str, Any], version: str, rows: list[dict[str, Any]],
                   errors: list[tuple[str, str]], skipped: int, seconds: float) -> dict[str, Any]:
    """predictions.csv (ISIC), details.csv, errors.csv and summary.json in `out`; the summary."""
    import pandas as pd

    from dermaid.evaluation.evaluate import submission_csv
    from dermaid.inference.triage import build_result
    from dermaid.models.card import load_card

    card = load_card(str(plain["checkpoint"]))
    urls = [str(row["url"]) for row in rows]
    ids = image_ids(urls)
    probs = np.array([row["probabilities"] for row in rows], dtype=np.float64).reshape(-1, NUM_CLASSES)  # (N, 8)
    has_ood = bool(rows) and int(rows[0]["abstain"]) >= 0
    write_text(join(out, PREDICTIONS_FILE),
               submission_csv(ids, probs, np.array([float(row["unk"]) for row in rows]) if has_ood else None))
    details = []
    for image_id, url, row, p in zip(ids, urls, rows, probs):
        ood = {"ood_score": float(row["ood_score"]), "abstain": bool(row["abstain"])} if has_ood else {}
        result = build_result(p, list(plain["malignant_codes"]), dict(plain["triage"]),
                              operating_point=card.triage, **ood)
        details.append({"image": image_id, "path": url, "top": result["probabilities"][0]["code"],
                        "top_probability": result["probabilities"][0]["probability"],
                        "malignancy_score": result["malignancy_score"],
                        "triage": (result["triage"] or {}).get("level"),
                        "ood_score": ood.get("ood_score"), "abstain": ood.get("abstain")})
    columns = ["image", "path", "top", "top_probability", "malignancy_score", "triage", "ood_score", "abstain"]
    write_text(join(out, DETAILS_FILE), pd.DataFrame(details, columns=columns).to_csv(index=False, lineterminator="\n"))
    write_text(join(out, ERRORS_FILE), pd.DataFrame(errors, columns=["path", "reason"]).to_csv(
        index=False, lineterminator="\n"))
    predicted = len(rows)
    summary = {"checkpoint": str(plain["checkpoint"]), "model_version": version, "kind": card.kind,
               "inputs": str(plain["inputs"]), "images": predicted + len(errors), "predicted": predicted,
               "errors": len(errors), "skipped_not_images": skipped,
               "abstained": sum(1 for d in details if d["abstain"]), "seconds": round(seconds, 3),
               "images_per_s": round((predicted + len(errors)) / seconds, 2) if seconds > 0 else None,
               "out": out, "disclaimer": DISCLAIMER}
    write_text(join(out, SUMMARY_FILE), json.dumps(summary, indent=2))
    return summary


def predict_batch(plain: dict[str, Any], inputs: Inputs) -> dict[str, Any]:
    """The folder's files on Ray Data, then the four output files; the summary."""
    from dermaid.models.card import load_card, model_version

    card = load_card(str(plain["checkpoint"]))  # CheckpointError before Ray starts
    out = str(plain["out"] or join(str(plain["paths"]["runs_dir"]), "predict", time.strftime("%Y-%m-%d_%H-%M-%S")))
    started = time.perf_counter()
    rows = predict_files(plain, inputs.files)
    seconds = time.perf_counter() - started
    predicted = [row for row in rows if not row["error"]]
    errors = [(str(row["url"]), str(row["error"])) for row in rows if row["error"]]
    return _write_outputs(out, plain, model_version(card), predicted, errors, inputs.skipped, seconds)


def predict(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """`dermaid predict`'s work: one image printed, or a folder's four files in `out`; the summary."""
    plain = to_plain(cfg)
    if not plain.get("checkpoint"):
        raise DermaidError("checkpoint= is required: a checkpoint directory (any artifact kind: float, int8, ONNX, "
                           "TorchScript)")
    for key in ("batch_size", "actors", "top_k"):
        if int(plain[key]) < 1:
            raise DermaidError(f"{key}={plain[key]}: must be at least 1")
    inputs = list_inputs(str(plain["inputs"] or ""))
    if inputs.single:
        return predict_one(plain, inputs.files[0])
    return predict_batch(plain, inputs)


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid predict checkpoint=PATH inputs=FILE|DIR|GLOB|URL [out=DIR]`."""
    result = predict(cfg)
    if result.get("single"):
        return result
    print(f"{result['images']} images from {result['inputs']} -> {result['out']}/{PREDICTIONS_FILE}: "
          f"{result['predicted']} predicted, {result['abstained']} abstained, {result['errors']} unreadable "
          f"(listed in {result['out']}/{ERRORS_FILE}); {result['seconds']:.1f} s, {result['images_per_s']} images/s")
    if result["skipped_not_images"]:
        print(f"{result['skipped_not_images']} file(s) skipped: not named as an image")
    print(DISCLAIMER)
    return result
