"""Encoding of the optional clinical metadata (age, sex, anatomical site) into a model input.

Each field has a missing indicator, so a request without metadata is a valid input:
    [age/100, age_missing, sex one-hot (2), sex_missing, site one-hot (8), site_missing]
"""

from __future__ import annotations

from typing import Any

import torch

from dermaid.classes import SEXES, SITES, is_missing

AGE_SCALE = 100.0
METADATA_DIM = 1 + 1 + len(SEXES) + 1 + len(SITES) + 1  # 14

_SEX_OFFSET = 2
_SITE_OFFSET = _SEX_OFFSET + len(SEXES) + 1


def encode_metadata(age: Any = None, sex: Any = None, site: Any = None) -> torch.Tensor:
    """One record -> a float vector of length METADATA_DIM. Unknown values count as missing."""
    vec = torch.zeros(METADATA_DIM)
    if is_missing(age):
        vec[1] = 1.0
    else:
        vec[0] = float(age) / AGE_SCALE
    if not is_missing(sex) and str(sex).lower() in SEXES:
        vec[_SEX_OFFSET + SEXES.index(str(sex).lower())] = 1.0
    else:
        vec[_SEX_OFFSET + len(SEXES)] = 1.0
    if not is_missing(site) and str(site).lower() in SITES:
        vec[_SITE_OFFSET + SITES.index(str(site).lower())] = 1.0
    else:
        vec[_SITE_OFFSET + len(SITES)] = 1.0
    return vec


def missing_metadata(batch_size: int) -> torch.Tensor:
    """A batch with every field missing: (B, METADATA_DIM)."""
    return torch.stack([encode_metadata() for _ in range(batch_size)])


def drop_metadata(meta: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time metadata dropout: each field of each row is set to missing with probability p.

    meta: (B, METADATA_DIM) -> (B, METADATA_DIM)
    """
    if p <= 0:
        return meta
    out = meta.clone()
    batch = meta.shape[0]
    fields = (
        (slice(0, 1), 1),                                    # age value, age_missing
        (slice(_SEX_OFFSET, _SEX_OFFSET + len(SEXES)), _SEX_OFFSET + len(SEXES)),
        (slice(_SITE_OFFSET, _SITE_OFFSET + len(SITES)), _SITE_OFFSET + len(SITES)),
    )
    for values, missing_col in fields:
        drop = torch.rand(batch, generator=generator, device=meta.device) < p  # (B,)
        out[drop, values] = 0.0
        out[drop, missing_col] = 1.0
    return out
