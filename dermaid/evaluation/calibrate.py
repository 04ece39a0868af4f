"""`dermaid calibrate`: fit a checkpoint's OOD detectors and choose its triage cut-off from its own data.

    dermaid calibrate checkpoint=runs/toy/best                         # the checkpoint's dataset version
    dermaid calibrate checkpoint=runs/toy/best experiment=toy ood.refuse_share=0.1 triage.target_sensitivity=0.9
    dermaid calibrate checkpoint=runs/x/best data.version=v3 "triage.malignant_codes=[MEL,BCC,SCC,AK]"

    dermaid calibrate checkpoint=runs/cv/toy/ensemble                   # an ensemble: msp / energy only
    dermaid calibrate checkpoint=runs/toy/best-int8                      # int8 / ONNX / TorchScript: msp / energy only

In this process (no Ray), through evaluate's prediction path (dermaid.evaluation.evaluate.
predict_records_with_features: the same eval transform and loader) with the checkpoint's own model callable
(dermaid.inference.loaders.create_model_fn, what the Predictor serves, for every artifact kind):
1. the training fold's features (the head's input and the backbone's per-level channel statistics:
   LesionClassifier.forward_with_features) and raw logits fit every detector in `ood.methods`
   (dermaid.evaluation.ood). An ensemble or a compressed artifact gives logits only: the feature methods
   (dermaid.evaluation.ood.FEATURE_METHODS) are dropped with a printed note, msp / energy are fitted on its own
   logits (an ensemble's: log of the members' mean calibrated probability); an ensemble is calibrated on the
   validation fold its members share (members held out on different folds, as `dermaid cv`'s, are refused:
   every fold trained some member, so no threshold would be chosen on unseen images);
2. on the validation fold each detector's threshold refuses `ood.refuse_share` of the images, and its
   AUROC / FPR@95TPR / refused shares are measured against a generated OOD set
   (dermaid.data.synth_ood.iter_ood_images); `ood.default: auto` picks the method with the best AUROC;
3. the triage cut-off on the calibrated malignancy score reaches `triage.target_sensitivity` on the
   validation fold's malignant images (dermaid.evaluation.operating_point).
Writes ood_statistics.npz beside the weights, then card.json with new `ood` and `triage` blocks (nothing else
in the card changes), then the monitoring reference profile of the validation fold (monitoring_reference.parquet:
dermaid.monitoring.reference, what `dermaid report monitoring` compares the served stream with).
Thresholds are decision support for research, never a diagnosis.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from dermaid.classes import CLASS_CODES, DISCLAIMER, MALIGNANT_CODES
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.evaluation.evaluate import predict_records_with_features
from dermaid.models.card import ModelCard, load_card, replace_card
from dermaid.training.loop import resolve_device

# What one split gives the detectors: features (N, D) | None, raw logits (N, K), calibrated probs (N, K), labels (N,).
Outputs = dict[str, np.ndarray]


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid calibrate checkpoint=PATH [data.version=ID | experiment=toy] [ood.* triage.*]`."""
    result = calibrate(cfg)
    print(f"OOD detectors fitted on {result['num_train']} training images, thresholds on {result['num_val']} "
          f"validation images, against {result['num_ood']} generated non-lesion images:")
    for method, row in result["ood"]["validation"].items():
        mark = "  <- default" if method == result["ood"]["method"] else ""
        print(f"  {method:<12} AUROC {row['auroc']:.3f}  FPR@95TPR {row['fpr_at_95_tpr']:.3f}  refused: "
              f"validation {row['refused_in']:.1%}, OOD {row['refused_out']:.1%}{mark}")
    triage = result["triage"]
    print(f"triage cut-off {triage['cutoff']:.4f} on {'+'.join(triage['malignant_codes'])}: sensitivity "
          f"{triage['sensitivity']:.3f} ({triage['tp']}/{triage['tp'] + triage['fn']}), specificity "
          f"{triage['specificity']:.3f} ({triage['tn']}/{triage['tn'] + triage['fp']}) on validation")
    print(f"-> {result['checkpoint']}/{result['ood']['statistics']} and card.json")
    reference = result["reference"]
    print(f"monitoring reference profile: {reference['rows']} validation images ({reference['source']} uploads) "
          f"-> {reference['url']}")
    print(DISCLAIMER)
    return result


def calibrate(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Fit, choose, write (see the module docstring); returns the card blocks and the counts."""
    from dermaid.data.prepare import ensure_prepared
    from dermaid.evaluation.ood import save_statistics
    from dermaid.inference.loaders import create_model_fn

    plain = to_plain(cfg)
    checkpoint = _checkpoint_url(plain["checkpoint"])
    card = load_card(checkpoint)  # CheckpointError: missing, unreadable, unknown format
    ood_cfg = {**plain["ood"], "methods": _methods_for(card, plain["ood"])}
    default = str(ood_cfg["default"])
    if default != "auto" and default not in ood_cfg["methods"]:
        raise DermaidError(f"ood.default={default!r} is not among ood.methods {list(ood_cfg['methods'])}; "
                           "name one of them, or auto (the best AUROC)")
    fold, batch_size = int(_training_fold(plain, card)), int(plain["batch_size"])
    device = resolve_device(str(plain["device"]))
    model = create_model_fn(checkpoint, card, device)  # any artifact kind: the callable the Predictor serves
    version_url = ensure_prepared(_data_config(plain["data"], card))
    version = version_url.rstrip("/").rsplit("/", 1)[-1]
    if card.trained_on and version not in card.trained_on:
        raise DermaidError(f"data version {version} is not one the checkpoint was trained on ({card.trained_on}): "
                           "calibrate on the checkpoint's own version (leave data.version unset)")
    train = record_outputs(model, card, labelled_records(version_url, "train", fold), device, batch_size)
    val = record_outputs(model, card, labelled_records(version_url, "val", fold), device, batch_size)
    set_cfg = ood_cfg["validation_set"]
    generated = generated_ood_outputs(model, card, int(set_cfg["n_per_kind"]), int(set_cfg["seed"]), device,
                                      batch_size)

    detectors = fit_detectors(ood_cfg, card, train, getattr(model, "feature_layout", {}))  # {}: no features
    ood_block = choose_detector(detectors, val, generated, ood_cfg, version)
    triage_block = choose_triage(val, plain["triage"])
    ood_block["statistics"] = save_statistics(checkpoint, detectors)
    replace_card(checkpoint, card.with_calibration(ood_block, triage_block))
    reference = _write_reference_profile(checkpoint, version_url, fold)
    return {"checkpoint": checkpoint, "ood": ood_block, "triage": triage_block, "num_train": len(train["labels"]),
            "num_val": len(val["labels"]), "num_ood": len(generated["kinds"]), "reference": reference}


def _write_reference_profile(checkpoint: str, version_url: str, fold: int) -> dict[str, Any]:
    """The monitoring reference profile of the validation fold, through the served path with the OOD detector
    just written (dermaid.monitoring.reference), beside the weights."""
    from dermaid.monitoring.reference import build_reference, write_reference

    profile, source = build_reference(checkpoint, version_url, fold)
    return {"url": write_reference(checkpoint, profile, source), "rows": len(profile), "source": source}


def fit_detectors(ood_cfg: dict[str, Any], card: ModelCard, train: Outputs,
                  layout: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Every method in ood.methods fitted on the training fold (msp/energy at the card's temperature;
    mahalanobis/knn on the head's features, multilayer on ood.multilayer_levels: LesionClassifier.feature_layout)."""
    from dermaid.evaluation.ood import METHODS, create_detector

    levels = [int(level) for level in ood_cfg["multilayer_levels"]]
    missing = [level for level in levels if f"level{level}" not in layout]
    if "multilayer" in ood_cfg["methods"] and (missing or not levels):
        raise DermaidError(f"ood.multilayer_levels={levels}: this backbone has feature levels "
                           f"0..{sum(key.startswith('level') for key in layout) - 1}; name at least one of them")
    options = {"msp": lambda: {"temperature": card.temperature}, "energy": lambda: {"temperature": card.temperature},
               "mahalanobis": lambda: {"columns": layout["head"]},
               "knn": lambda: {"k": int(ood_cfg["knn_k"]), "columns": layout["head"]},
               "multilayer": lambda: {"levels": [layout[f"level{level}"] for level in levels]}}
    methods = list(ood_cfg["methods"])
    if not methods:
        raise DermaidError(f"ood.methods is empty: name at least one of {', '.join(METHODS)}")
    unknown = [method for method in methods if method not in options]
    if unknown:
        raise DermaidError(f"ood.methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    return {method: create_detector(method, **options[method]()).fit(
        train["features"], train["logits"], train["labels"]) for method in methods}


def choose_detector(detectors: dict[str, Any], val: Outputs, generated: Outputs, ood_cfg: dict[str, Any],
                    version: str) -> dict[str, Any]:
    """Thresholds at ood.refuse_share of validation, each method measured against the generated set; the
    card's `ood` block (without `statistics`) for ood.default (auto: the best AUROC)."""
    from dermaid.evaluation.ood import choose_scale, choose_threshold, ood_metrics

    refuse_share = float(ood_cfg["refuse_share"])
    validation, val_scores = {}, {}
    kinds = np.asarray(generated["kinds"])
    for method, detector in detectors.items():
        val_scores[method] = detector.score(val["features"], val["logits"])  # (N,)
        out_scores = detector.score(generated["features"], generated["logits"])  # (M,)
        threshold = choose_threshold(val_scores[method], refuse_share)
        metrics = ood_metrics(val_scores[method], out_scores, threshold)
        per_kind = {kind: round(ood_metrics(val_scores[method], out_scores[kinds == kind], threshold)["auroc"], 4)
                    for kind in sorted(set(kinds.tolist()))}
        validation[method] = {**{key: metrics[key] for key in ("auroc", "fpr_at_95_tpr", "refused_in",
                                                                "refused_out")},
                              "threshold": threshold, "auroc_per_kind": per_kind}
    method = str(ood_cfg["default"])
    if method == "auto":
        method = max(validation, key=lambda name: validation[name]["auroc"])
    elif method not in validation:
        raise DermaidError(f"ood.default={method!r} is not among the fitted ood.methods {sorted(validation)}")
    threshold = validation[method]["threshold"]
    return {"method": method, "statistics": None, "threshold": threshold, "refuse_share": refuse_share,
            "scale": choose_scale(val_scores[method], threshold), "validation": validation, "fitted_on": version}


def choose_triage(val: Outputs, triage_cfg: dict[str, Any]) -> dict[str, Any]:
    """The card's `triage` block: the validation cut-off on the calibrated malignancy score for the target."""
    from dermaid.evaluation.operating_point import choose_triage_cutoff

    codes = list(triage_cfg["malignant_codes"] or MALIGNANT_CODES)
    unknown = sorted(set(codes) - set(CLASS_CODES))
    if unknown:
        raise DermaidError(f"triage.malignant_codes: unknown class codes {unknown}; allowed: {list(CLASS_CODES)}")
    columns = [CLASS_CODES.index(code) for code in codes]
    malignancy = val["probs"][:, columns].sum(axis=1)  # (N,)
    point = choose_triage_cutoff(malignancy, np.isin(val["labels"], columns), float(triage_cfg["target_sensitivity"]))
    return {**point, "malignant_codes": codes}


def _checkpoint_url(checkpoint: Any) -> str:
    """The checkpoint URL; a clear error for none."""
    if not checkpoint:
        raise DermaidError("checkpoint= is required: a checkpoint directory written by `dermaid train` (DIR/best), "
                           "`dermaid ensemble` / `dermaid cv` or `dermaid quantize` / `dermaid export`")
    return str(checkpoint)


def _methods_for(card: ModelCard, ood_cfg: dict[str, Any]) -> list[str]:
    """ood.methods this checkpoint can fit: all for float weights; an ensemble or a compressed artifact gives no
    penultimate features, so its feature methods are dropped (said on stdout), an error when none is left."""
    from dermaid.evaluation.ood import FEATURE_METHODS

    methods = list(ood_cfg["methods"])
    if card.is_float:
        return methods
    dropped = [method for method in methods if method in FEATURE_METHODS]
    kept = [method for method in methods if method not in FEATURE_METHODS]
    if not kept:
        raise DermaidError(f"ood.methods={methods}: a {card.kind} checkpoint gives no penultimate features, so only "
                           "the logit methods fit it: name msp and/or energy (e.g. \"ood.methods=[msp,energy]\")")
    if dropped:
        print(f"note: {card.kind} checkpoint: no penultimate features, so ood.methods {dropped} are not fitted "
              f"(logit methods only: {kept})")
    if str(ood_cfg["default"]) in dropped:
        raise DermaidError(f"ood.default={ood_cfg['default']!r} needs penultimate features, which a {card.kind} "
                           f"checkpoint does not give: name one of {kept}, or auto")
    return kept


def _data_config(data: dict[str, Any], card: ModelCard) -> dict[str, Any]:
    """The `data` group with data.version defaulting to the checkpoint's own dataset version."""
    if data["version"] or not card.dataset_version:
        return data
    return {**data, "version": card.dataset_version}


def _training_fold(plain: dict[str, Any], card: ModelCard) -> int:
    """The validation fold the checkpoint was trained with (its card's config; an ensemble: the one its members
    share), else data.fold. An ensemble whose members held out different folds has none: every fold trained one
    of them, so thresholds chosen there would be optimistic (a triage cut-off missing more malignant lesions)."""
    if card.ensemble:
        folds = {member.get("fold") for member in card.ensemble.get("members", [])}
        if len(folds) > 1:
            shown = sorted(str(fold) for fold in folds)
            raise DermaidError(f"{plain['checkpoint']}: the ensemble's members held out different validation folds "
                               f"({', '.join(shown)}): each fold trained another member, so none is unseen by the "
                               "ensemble; calibrate an ensemble of members sharing one validation fold")
        trained = folds.pop() if folds else None
    else:
        trained = (card.config.get("data") or {}).get("fold")  # cards without a recorded config: data.fold
    return int(plain["data"]["fold"] if trained is None else trained)


def labelled_records(version_url: str, split: str, fold: int) -> pd.DataFrame:
    """A split's labelled images (label_idx >= 0) of fold `fold`, image bytes included; an error when none."""
    from dermaid.data.loading import load_records

    records = load_records(version_url, split=split, fold=fold)
    records = records[records["label_idx"] >= 0].reset_index(drop=True)
    if records.empty:
        raise DermaidError(f"{version_url}: the {split} part of fold {fold} has no labelled images")
    return records


def record_outputs(model: Any, card: ModelCard, records: pd.DataFrame, device: Any, batch_size: int) -> Outputs:
    """Labelled records through evaluate's path: features (None for a model callable that gives none: an ensemble,
    a compressed artifact), raw logits, calibrated probs, labels (the training report's predictions take this path
    too: dermaid.reporting.training.predict_split)."""
    features, logits, probs = predict_records_with_features(model, records, card.input, card.temperature, 0, device,
                                                            batch_size=batch_size)
    return {"features": features, "logits": logits, "probs": probs, "labels": records["label_idx"].to_numpy()}


def generated_ood_outputs(model: Any, card: ModelCard, n_per_kind: int, seed: int, device: Any,
                          batch_size: int) -> Outputs:
    """n_per_kind generated non-lesion images of every kind (dermaid.data.synth_ood) through the same path,
    with their kinds (features (M, D) | None, raw logits (M, K), kinds (M,))."""
    from dermaid.data.synth_ood import iter_ood_images

    rows = [{"image": data, "kind": kind} for kind, data in iter_ood_images(n_per_kind, seed)]
    features, logits, _ = predict_records_with_features(model, rows, card.input, card.temperature, 0, device,
                                                        batch_size=batch_size)
    return {"features": features, "logits": logits, "kinds": np.asarray([row["kind"] for row in rows])}
