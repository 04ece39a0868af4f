"""Probabilities -> the result people read: sorted classes, top class, malignancy score, triage message.

    result = build_result(probs[0])                          # default thresholds, DEFAULT_TRIAGE
    result = build_result(probs[0], triage={"high": 0.4})    # conf/serve.yaml `triage` overrides
    result = build_result(probs[0], operating_point=card.triage, ood_score=0.3, abstain=False)
    # card.triage: the validation-chosen "see a doctor soon" cut-off (`dermaid calibrate`) replaces "high";
    # abstain=True: no diagnosis and no triage, only RETAKE_MESSAGE and the probabilities marked unreliable

Outputs are decision support for research, never a diagnosis (see dermaid.classes.DISCLAIMER).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dermaid.classes import BY_CODE, CLASS_CODES, CLASS_INDEX, DISCLAIMER, MALIGNANT_CODES, NUM_CLASSES
from dermaid.errors import DermaidError

# Default triage thresholds on the malignancy score (overridable in conf/serve.yaml `triage`).
DEFAULT_TRIAGE = {"high": 0.5, "moderate": 0.2}
TRIAGE_MESSAGES = {
    "high": "The model gives this image a high malignancy score. Please have the spot examined by a "
            "dermatologist soon.",
    "moderate": "The model finds some features it associates with skin cancer. Consider having the spot "
                "checked by a dermatologist.",
    "low": "The model finds few features it associates with skin cancer. Keep an eye on the spot; if it is "
           "new, changing, bleeding or worries you, have it checked.",
}

# What a refused photo gets instead of a diagnosis (the OOD detector abstained).
RETAKE_MESSAGE = ("This photo does not look like the close-up skin-lesion photos DermAID was trained on. Retake it "
                  "close up, sharp, with the spot centred and in good light — or see a doctor if you are worried.")


def build_result(probabilities: Sequence[float], malignant_codes: Sequence[str] = MALIGNANT_CODES,
                 triage: dict[str, float] | None = None, *, operating_point: dict[str, Any] | None = None,
                 ood_score: float | None = None, abstain: bool | None = None) -> dict[str, Any]:
    """(8,) probabilities in CLASS_CODES order -> the JSON-ready result people read.

    The malignancy score is the summed probability of `malignant_codes`; triage levels come from
    thresholds on it ({"high": 0.5, "moderate": 0.2} by default). `operating_point` (a card's `triage`
    block) sets the "high" level to its validation-chosen cut-off, on the malignant codes it was chosen
    for. With ood_score / abstain given, the result carries them; abstain=True gives no top class, score
    or triage, only RETAKE_MESSAGE and the probabilities with `probabilities_reliable` false.
    """
    probs = [float(p) for p in probabilities]
    if len(probs) != NUM_CLASSES:
        raise ValueError(f"expected {NUM_CLASSES} probabilities, got {len(probs)}")
    if operating_point is not None:
        malignant_codes = operating_point.get("malignant_codes") or malignant_codes
    unknown = [code for code in malignant_codes if code not in CLASS_INDEX]
    if unknown:
        raise DermaidError(f"malignant_codes: unknown class codes {unknown}; allowed: {list(CLASS_CODES)}")
    classes = sorted(
        ({"code": code, "name": BY_CODE[code].name, "probability": probs[i]} for i, code in enumerate(CLASS_CODES)),
        key=lambda row: row["probability"], reverse=True,
    )
    ood = {} if ood_score is None and abstain is None else {
        "ood_score": None if ood_score is None else float(ood_score),
        "abstain": None if abstain is None else bool(abstain)}
    if abstain:
        return {"probabilities": classes, "probabilities_reliable": False, "top": None, "malignancy_score": None,
                "triage": None, "message": RETAKE_MESSAGE, **ood, "disclaimer": DISCLAIMER}
    thresholds = {**DEFAULT_TRIAGE, **(triage or {})}
    if operating_point is not None:
        thresholds["high"] = float(operating_point["cutoff"])
    score = float(sum(probs[CLASS_INDEX[code]] for code in malignant_codes))
    level = "high" if score >= thresholds["high"] else "moderate" if score >= thresholds["moderate"] else "low"
    return {
        "probabilities": classes,
        "top": classes[0],
        "malignancy_score": score,
        "triage": {"level": level, "message": TRIAGE_MESSAGES[level]},
        **ood,
        "disclaimer": DISCLAIMER,
    }
