"""The ISIC 2019 diagnosis table and the metadata vocabularies: the one source of truth.

Every other module (readers, models, metrics, Serve, notebooks) imports the class order and the
vocabularies from here; nothing else spells them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Diagnosis:
    code: str
    name: str
    description: str
    malignant: bool


# Output order of every model head and every predictions.csv column (UNK is appended only in
# the ISIC submission format; no model predicts it).
DIAGNOSES: tuple[Diagnosis, ...] = (
    Diagnosis("MEL", "Melanoma",
              "A cancer of pigment cells; the most dangerous common skin cancer.", True),
    Diagnosis("NV", "Melanocytic nevus",
              "A common mole: a benign cluster of pigment cells.", False),
    Diagnosis("BCC", "Basal cell carcinoma",
              "The most common skin cancer; grows slowly and rarely spreads.", True),
    Diagnosis("AK", "Actinic keratosis",
              "A rough, sun-damaged patch that can turn into squamous cell carcinoma.", False),
    Diagnosis("BKL", "Benign keratosis",
              "Seborrheic keratosis, solar lentigo or lichen-planus-like keratosis: benign.", False),
    Diagnosis("DF", "Dermatofibroma",
              "A firm, benign nodule of fibrous tissue.", False),
    Diagnosis("VASC", "Vascular lesion",
              "Angiomas, angiokeratomas, pyogenic granulomas and haemorrhage: usually benign.", False),
    Diagnosis("SCC", "Squamous cell carcinoma",
              "A skin cancer of keratinocytes that can spread if left untreated.", True),
)

CLASS_CODES: tuple[str, ...] = tuple(d.code for d in DIAGNOSES)
NUM_CLASSES: int = len(CLASS_CODES)
CLASS_INDEX: dict[str, int] = {code: i for i, code in enumerate(CLASS_CODES)}
BY_CODE: dict[str, Diagnosis] = {d.code: d for d in DIAGNOSES}
MALIGNANT_CODES: tuple[str, ...] = tuple(d.code for d in DIAGNOSES if d.malignant)

# The official test set adds an "unknown / none of the others" column.
UNKNOWN_CODE = "UNK"
SUBMISSION_CODES: tuple[str, ...] = CLASS_CODES + (UNKNOWN_CODE,)

# Reviewers may mark an upload as unusable instead of giving a diagnosis.
NOT_A_LESION = "NONE"
REVIEW_CODES: tuple[str, ...] = CLASS_CODES + (NOT_A_LESION,)

SEXES: tuple[str, ...] = ("male", "female")

# ISIC 2019 `anatom_site_general` values, in the order of the metadata one-hot encoding.
SITES: tuple[str, ...] = (
    "anterior torso",
    "upper extremity",
    "posterior torso",
    "lower extremity",
    "lateral torso",
    "head/neck",
    "palms/soles",
    "oral/genital",
)

AGE_RANGE: tuple[int, int] = (0, 120)


def is_missing(value: Any) -> bool:
    """True for a metadata value that counts as missing: None, NaN, or empty / blank text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


# HAM10000 `dx` codes -> ISIC 2019 classes.
HAM10000_DX_TO_CODE: dict[str, str] = {
    "akiec": "AK",  # HAM10000 groups actinic keratoses and intraepithelial carcinoma (Bowen's)
    "bcc": "BCC",
    "bkl": "BKL",
    "df": "DF",
    "mel": "MEL",
    "nv": "NV",
    "vasc": "VASC",
}

# HAM10000 `localization` values -> ISIC anatomical sites (None: no ISIC site fits; kept missing).
HAM10000_LOCALIZATION_TO_SITE: dict[str, str | None] = {
    "abdomen": "anterior torso",
    "chest": "anterior torso",
    "trunk": "anterior torso",
    "back": "posterior torso",
    "upper extremity": "upper extremity",
    "hand": "upper extremity",
    "lower extremity": "lower extremity",
    "foot": "lower extremity",
    "face": "head/neck",
    "scalp": "head/neck",
    "neck": "head/neck",
    "ear": "head/neck",
    "acral": "palms/soles",
    "genital": "oral/genital",
    "unknown": None,
}

DISCLAIMER = (
    "DermAID is a research tool that gives decision support only. It is not a diagnosis and "
    "does not replace a doctor. If a spot on your skin is new, changing, bleeding or worries "
    "you, have it seen by a dermatologist."
)


def class_table() -> list[dict]:
    """The class table as plain dicts (for model cards, JSON responses and notebooks)."""
    return [
        {"code": d.code, "name": d.name, "description": d.description, "malignant": d.malignant}
        for d in DIAGNOSES
    ]
