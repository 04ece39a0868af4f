"""The training report's "Knowing when not to answer": the card's OOD detector and triage cut-off on a split.

    section = check_abstention(run, preds, ood_per_kind=8, ood_seed=2)  # the split + a generated non-lesion set
    Markdown(summary_markdown(section))        # what the checkpoint does, or how to add it (`dermaid calibrate`)
    plot_ood_scores(section); plot_ood_methods(section)  # score histograms, the threshold as a line
    ood_table(section); ood_methods_table(section); triage_table(section)
    abstention_figures(section)                # the key figures (training.key_figures merges them)

The detector and the cut-off are the card's `ood` and `triage` blocks (`dermaid calibrate`); every number comes
from dermaid.evaluation (evaluate.ood_set_metrics -> ood.ood_metrics, evaluate.triage_report ->
operating_point.apply_cutoff), the generated images from calibrate.generated_ood_outputs. A refusal says "this
image does not look like the training images", not what it shows; the triage flag is decision support for a
clinician, never a diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermaid.errors import DermaidError
from dermaid.reporting.figures import create_figure

if TYPE_CHECKING:
    from dermaid.inference.ood_scorer import OodScorer
    from dermaid.reporting.training import Predictions, Run

HISTOGRAM_BINS = 30  # bins shared by the split and the generated set in every score histogram
METHOD_COLUMNS = 3  # small multiples per row in plot_ood_methods


@dataclass
class Abstention:
    """The card's detector and triage cut-off measured on a report's split (and a generated non-lesion set)."""

    checkpoint: str
    split: str
    num_images: int                                # N: the split's labelled images
    ood: OodScorer | None                          # the card's detector; None: the card has no `ood` block
    card_ood: dict[str, Any] | None                # the card's `ood` block (validation numbers, refuse_share)
    card_triage: dict[str, Any] | None             # the card's `triage` block (the validation operating point)
    triage: dict[str, Any] | None                  # evaluate.triage_report: the cut-off applied to the split
    ood_per_kind: int = 0                          # generated images per kind
    ood_seed: int = 0                              # their seed
    in_scores: dict[str, np.ndarray] = field(default_factory=dict)   # method -> (N,) the split's scores
    out_scores: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (M,) the generated set's scores
    kinds: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))  # (M,) OOD kind per image
    ood_report: dict[str, Any] = field(default_factory=dict)  # evaluate.ood_set_metrics: per method and kind

    @property
    def method(self) -> str | None:
        return self.ood.method if self.ood else None

    def metrics(self, method: str | None = None) -> dict[str, Any]:
        """ood_metrics of `method` (default: the card's), split vs the whole generated set, with `per_kind`."""
        return self.ood_report["methods"][method or self.method]


def check_abstention(run: Run, preds: Predictions, ood_per_kind: int = 8, ood_seed: int = 2, batch_size: int = 64,
                     device: str = "cpu") -> Abstention:
    """Score the split (preds' features and raw logits) and ood_per_kind generated images of every kind with the
    card's detectors; apply the card's triage cut-off to the split. Without the blocks: an Abstention saying so."""
    from dermaid.evaluation.evaluate import ood_set_metrics, triage_report

    card = run.card
    triage = triage_report(card.triage, preds.probs, preds.labels) if card.triage else None
    common = {"checkpoint": run.checkpoint, "split": preds.split, "num_images": int(len(preds.labels)),
              "card_ood": card.ood, "card_triage": card.triage, "triage": triage}
    if not card.ood:
        return Abstention(ood=None, **common)
    if int(ood_per_kind) < 1:
        raise DermaidError(f"ood_per_kind={ood_per_kind}: need at least 1 generated image per kind")
    scorer, generated = _score_generated(run, int(ood_per_kind), int(ood_seed), batch_size, device)
    inside = (preds.features, preds.logits)  # (N, D), (N, K) raw
    outside = (generated["features"], generated["logits"])  # (M, D), (M, K) raw
    kinds = generated["kinds"]  # (M,)
    return Abstention(
        ood=scorer, ood_per_kind=int(ood_per_kind), ood_seed=int(ood_seed), kinds=kinds,
        ood_report=ood_set_metrics(scorer, inside, outside, kinds.tolist()),
        in_scores={method: scorer.score(*inside, method=method) for method in scorer.thresholds},  # (N,) each
        out_scores={method: scorer.score(*outside, method=method) for method in scorer.thresholds},  # (M,) each
        **common)


def _score_generated(run: Run, ood_per_kind: int, ood_seed: int, batch_size: int,
                     device: str) -> tuple[OodScorer, dict[str, np.ndarray]]:
    """The card's detector and the generated set's features / raw logits / kinds (calibrate's path)."""
    import torch

    from dermaid.evaluation.calibrate import generated_ood_outputs
    from dermaid.inference.ood_scorer import OodScorer
    from dermaid.models.card import load_float_model

    model, card = load_float_model(run.checkpoint, device)
    scorer = OodScorer.load(run.checkpoint, card, model.feature_dim)
    generated = generated_ood_outputs(model, card, ood_per_kind, ood_seed, torch.device(device), batch_size)
    return scorer, generated


# --------------------------------------------------------------------------- prose

def summary_markdown(section: Abstention) -> str:
    """What the checkpoint refuses and flags, or (for an uncalibrated one) that it cannot and how to add it."""
    return "\n\n".join([_ood_markdown(section), _triage_markdown(section), _CAVEAT])


_CAVEAT = ("*Refusing an image means \"this does not look like the images the model was trained on; retake it or "
           "ask a clinician\", not a statement about what it shows. The generated non-lesion images are a smoke "
           "test, not a real-world OOD benchmark. Decision support for research, never a diagnosis.*")


def _missing(what: str, block: str, section: Abstention) -> str:
    return (f"**No {what}**: the card of `{section.checkpoint}` has no `{block}` "
            "block (a checkpoint trained before calibration, or never calibrated). Add it with "
            f"`dermaid calibrate checkpoint={section.checkpoint}` and rerun this report.")


def _ood_markdown(section: Abstention) -> str:
    if section.ood is None:
        return (_missing("OOD detector", "ood", section) + " Until then the model answers every image, including ones "
                "that are not skin lesions at all.")
    block, m = section.card_ood or {}, section.metrics()
    return (f"The checkpoint refuses an image when its **{section.method}** OOD score is above "
            f"{section.ood.threshold:.4g} (chosen by `dermaid calibrate` to refuse {block.get('refuse_share', 0):.0%} "
            f"of the validation fold of `{block.get('fitted_on', '?')}`). Here the {section.split} images "
            f"(in-distribution, n = {section.num_images}) face {len(section.kinds)} generated non-lesion images "
            f"({section.ood_per_kind} of each of {len(set(section.kinds.tolist()))} kinds, seed {section.ood_seed}; "
            f"calibrate measured its own set): refused {m['refused_in']:.1%} of the {section.split} images and "
            f"{m['refused_out']:.1%} of the generated ones; AUROC {m['auroc']:.3f}.")


def _triage_markdown(section: Abstention) -> str:
    if section.card_triage is None:
        return _missing("triage cut-off", "triage", section)
    block = section.card_triage
    codes = "+".join(block["malignant_codes"])
    return (f"**Triage**: an image is flagged \"see a doctor soon\" when its calibrated malignancy probability "
            f"({codes}) is at least {block['cutoff']:.4f}, the cut-off chosen on the validation fold for a target "
            f"sensitivity of {block['target_sensitivity']:.0%}.")


# --------------------------------------------------------------------------- figures

def _note_figure(text: str) -> Figure:
    fig, ax = create_figure(width=8, height=1)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def _no_detector(section: Abstention) -> Figure:
    return _note_figure(f"no OOD detector: `dermaid calibrate checkpoint={section.checkpoint}` adds one")


def _shares(scores: np.ndarray) -> np.ndarray:
    """Histogram weights that make each set sum to 1 (sets of different sizes on one axis)."""
    return np.full(len(scores), 1.0 / max(1, len(scores)))  # (n,)


def _bins(*scores: np.ndarray) -> np.ndarray:
    joined = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores])  # (N + M,)
    return np.histogram_bin_edges(joined[np.isfinite(joined)], bins=HISTOGRAM_BINS)  # (B + 1,)


def plot_ood_scores(section: Abstention) -> Figure:
    """The card's method: the split's scores against the generated set's, stacked and coloured by OOD kind;
    the dashed line is the threshold (refused: to its right)."""
    if section.ood is None:
        return _no_detector(section)
    method, m = section.method, section.metrics()
    inside, outside = section.in_scores[method], section.out_scores[method]  # (N,), (M,)
    bins = _bins(inside, outside)
    kinds = sorted(set(section.kinds.tolist()))
    groups = [outside[section.kinds == kind] for kind in kinds]  # per kind (M_k,)
    fig, ax = create_figure(width=12, height=4.5)
    ax.hist(groups, bins=bins, weights=[np.full(len(g), 1.0 / len(outside)) for g in groups], stacked=True,
            alpha=0.75, label=[f"{kind} (n={len(g)})" for kind, g in zip(kinds, groups)])
    ax.hist(inside, bins=bins, weights=_shares(inside), histtype="step", linewidth=2, color="black", zorder=3,
            label=f"{section.split} images (n={len(inside)})")
    ax.axvline(section.ood.threshold, color="tab:red", linestyle="--", linewidth=1.5,
               label=f"threshold {section.ood.threshold:.4g}: refuse above")
    ax.set_xlabel(f"{method} OOD score (higher = less like the training images)")
    ax.set_ylabel("share of its set per bin")
    ax.set_title(f"{method} (the card's detector): refused {m['refused_in']:.1%} of {section.split}, "
                 f"{m['refused_out']:.1%} of the generated set; AUROC {m['auroc']:.3f}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_ood_methods(section: Abstention) -> Figure:
    """Small multiples: every fitted method's split vs generated-set histogram at its own threshold."""
    if section.ood is None:
        return _no_detector(section)
    methods = list(section.in_scores)
    ncols = min(METHOD_COLUMNS, len(methods))
    nrows = -(-len(methods) // ncols)
    fig, axes = create_figure(nrows, ncols, width=4.2 * ncols, height=3.2 * nrows, squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods):
        inside, outside = section.in_scores[method], section.out_scores[method]  # (N,), (M,)
        bins = _bins(inside, outside)
        ax.hist(outside, bins=bins, weights=_shares(outside), alpha=0.6, color="tab:orange", label="generated")
        ax.hist(inside, bins=bins, weights=_shares(inside), alpha=0.6, color="tab:blue", label=section.split)
        ax.axvline(section.ood.thresholds[method], color="tab:red", linestyle="--", linewidth=1)
        chosen = " (card)" if method == section.method else ""
        ax.set_title(f"{method}{chosen}: AUROC {section.metrics(method)['auroc']:.3f}", fontsize=9)
        ax.set_xlabel("OOD score", fontsize=8)
        ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------- tables

def ood_table(section: Abstention) -> pd.DataFrame:
    """The card's method: refused shares of the split and of the generated set (overall, per kind), AUROC and
    FPR at 95% TPR of each against the split (empty without a detector)."""
    columns = ["images", "refused", "auroc", "fpr_at_95_tpr"]
    if section.ood is None:
        return pd.DataFrame(columns=columns)
    m = section.metrics()
    rows = {f"{section.split} (in-distribution)": [m["n_in"], m["refused_in"], np.nan, np.nan],
            "generated, all kinds": [m["n_out"], m["refused_out"], m["auroc"], m["fpr_at_95_tpr"]]}
    for kind, k in m["per_kind"].items():
        rows[f"generated: {kind}"] = [k["n_out"], k["refused_out"], k["auroc"], k["fpr_at_95_tpr"]]
    table = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    table["images"] = table["images"].astype(int)
    table.index.name = "set"
    return table.round(3)


def ood_methods_table(section: Abstention) -> pd.DataFrame:
    """Every fitted method at its validation threshold: AUROC, FPR at 95% TPR, refused shares (empty without)."""
    columns = ["card", "threshold", "auroc", "fpr_at_95_tpr", "refused_split", "refused_generated"]
    if section.ood is None:
        return pd.DataFrame(columns=columns)
    rows = {method: [method == section.method, row["threshold"], row["auroc"], row["fpr_at_95_tpr"],
                     row["refused_in"], row["refused_out"]]
            for method, row in section.ood_report["methods"].items()}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    table.index.name = "method"
    return table.round(4)


def triage_table(section: Abstention) -> pd.DataFrame:
    """The triage operating point on the validation fold (the card, at calibration) and on the report's split."""
    columns = ["cutoff", "target_sensitivity", "sensitivity", "malignant_flagged", "specificity",
               "benign_not_flagged"]
    if section.card_triage is None:
        return pd.DataFrame(columns=columns)
    target = section.card_triage["target_sensitivity"]
    rows = {"validation (card, at calibration)": _triage_row(section.card_triage, target)}
    if section.triage is not None:
        rows[f"{section.split} (this report)"] = _triage_row(section.triage, target)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    table.index.name = "images"
    return table.round(4)


def _triage_row(point: dict[str, Any], target: float) -> list[Any]:
    return [point["cutoff"], target, point["sensitivity"], f"{point['tp']} / {point['tp'] + point['fn']}",
            point["specificity"], f"{point['tn']} / {point['tn'] + point['fp']}"]


# --------------------------------------------------------------------------- key figures

def abstention_figures(section: Abstention) -> dict[str, Any]:
    """Key figures: `ood/method` and `triage/cutoff` (None without `dermaid calibrate`), the split's refused share
    and AUROC (overall, per kind) against the generated set, the triage operating point on validation and split."""
    split = section.split
    figures: dict[str, Any] = {"ood/method": section.method,
                               "triage/cutoff": section.card_triage["cutoff"] if section.card_triage else None}
    if section.ood is not None:
        m = section.metrics()
        figures.update({
            "ood/threshold": section.ood.threshold,
            f"{split}/ood/refused_share": m["refused_in"],
            f"{split}/ood/auroc": m["auroc"],
            f"{split}/ood/fpr_at_95_tpr": m["fpr_at_95_tpr"],
            "ood_set/num_images": m["n_out"],
            "ood_set/refused_share": m["refused_out"],
            **{f"{split}/ood/auroc/{kind}": k["auroc"] for kind, k in m["per_kind"].items()},
        })
    if section.card_triage is not None:
        block = section.card_triage
        figures.update({"triage/target_sensitivity": block["target_sensitivity"],
                        "triage/malignant_codes": list(block["malignant_codes"]),
                        "triage/validation_sensitivity": block["sensitivity"],
                        "triage/validation_specificity": block["specificity"]})
    if section.triage is not None:
        figures.update({f"{split}/triage/sensitivity": section.triage["sensitivity"],
                        f"{split}/triage/specificity": section.triage["specificity"]})
    return figures
