"""What a review request may carry: upload ids, review codes, comments, reviewer names, label sources.

    upload_id = parse_upload_id(request_value)     # the canonical uuid4 string, or InvalidUploadId
    code, comment = check_code("MEL"), check_comment("asymmetric, two colours")

Every check runs before anything touches the database or the blob store, and raises a DermaidError
whose message names the field (the ingress shows it as a 4xx JSON error).
"""

from __future__ import annotations

import re
from typing import Any

from dermaid.classes import NOT_A_LESION, REVIEW_CODES
from dermaid.errors import DermaidError

# matched with fullmatch: `$` with re.match would also accept an id followed by a newline
UPLOAD_ID_PATTERN = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?4[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}")
MAX_COMMENT_CHARS = 2000       # a paragraph; longer text belongs in the clinical record, not a label
MAX_REVIEWER_CHARS = 64        # the labels.reviewer column
LABEL_SOURCES = ("web", "api", "labelstudio")


class InvalidUploadId(DermaidError):
    """An id that is not a uuid4: refused before any storage is touched."""


class UnknownUpload(DermaidError):
    """A well-formed id with no stored (consented) upload."""


def parse_upload_id(value: Any) -> str:
    """A client-supplied upload id -> the canonical uuid4 string (lowercase, dashed); InvalidUploadId otherwise."""
    text = value if isinstance(value, str) else ""
    if len(text) > 36 or not UPLOAD_ID_PATTERN.fullmatch(text):
        shown = repr(value)[:60]
        raise InvalidUploadId(f"upload id {shown} is not an upload id (a uuid4: 32 lowercase hex digits, "
                              "optionally with dashes)")
    digits = text.replace("-", "")
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def check_code(code: Any) -> str:
    """A review code (a class code, or NOT_A_LESION)."""
    if not isinstance(code, str) or code not in REVIEW_CODES:
        raise DermaidError(f"code: {str(code)[:40]!r} is not a review code; allowed: {', '.join(REVIEW_CODES)} "
                           f"({NOT_A_LESION} = not a lesion / unusable)")
    return code


def check_comment(comment: Any) -> str | None:
    """A label's free text, stripped; None when absent or blank."""
    if comment is None:
        return None
    if not isinstance(comment, str):
        raise DermaidError("comment: must be text")
    comment = comment.strip()
    if len(comment) > MAX_COMMENT_CHARS:
        raise DermaidError(f"comment: {len(comment)} characters; at most {MAX_COMMENT_CHARS} are kept with a label")
    return comment or None


def check_reviewer(reviewer: Any) -> str:
    """A reviewer name of 1..MAX_REVIEWER_CHARS characters, stripped."""
    if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > MAX_REVIEWER_CHARS:
        raise DermaidError(f"reviewer: must be 1-{MAX_REVIEWER_CHARS} characters")
    return reviewer.strip()


def check_source(source: str) -> str:
    """Where a label came from: one of LABEL_SOURCES."""
    if source not in LABEL_SOURCES:
        raise DermaidError(f"source: {source!r} is not one of {LABEL_SOURCES}")
    return source
