"""The consumer page, dermatologist review and the fine-tune loop, over real HTTP and in a real browser.

One Serve application (serve/app.py build_app, on the session's Ray, a free port) serves the session's trained run
(conftest `trained_run`, trained in-process on the prepared toy version) with two dermatologist tokens. It runs for
this module and is shut down at the end. The browser is Debian's Chromium driven headless by Playwright; screenshots
land in the browser tests' tmp_path.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from dermaid.auth import ReviewerTokens, create_token, hash_token, hashes_from_env, parse_bearer
from dermaid.classes import BY_CODE, CLASS_CODES, DISCLAIMER, NOT_A_LESION
from dermaid.errors import DermaidError
from dermaid.processes import free_port
from dermaid.uploads.store import clean_image

TOKENS = {"dr_ana": create_token(), "dr_ben": create_token()}
CHROMIUM = os.environ.get("DERMAID_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PHONE = {"width": 390, "height": 844}  # an iPhone 12-14 sized viewport


# --- tokens (no server) --------------------------------------------------------------------------------------

def test_tokens_are_stored_hashed_and_verified():
    token = create_token()
    stored = hash_token(token)
    assert re.fullmatch(r"sha256\$[0-9a-f]{64}", stored) and token not in stored
    other = create_token()
    tokens = ReviewerTokens({"dr_a": stored, "dr_b": hash_token(other)})
    assert tokens.verify(token) == "dr_a" and tokens.verify(other) == "dr_b"
    assert tokens.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert tokens.verify("") is None and tokens.verify("x" * 10_000) is None and tokens.verify(None) is None
    assert parse_bearer(f"Bearer {token}") == token and parse_bearer(f"bearer  {token} ") == token
    assert parse_bearer("Basic dXNlcjpwdw==") is None and parse_bearer("Bearer ") is None and parse_bearer(None) is None
    # PBKDF2 made every wrong token cost 200k iterations per entry: such hashes are refused with the fix named
    salt = "00" * 16
    pbkdf2 = f"pbkdf2_sha256$200000${salt}${hashlib.pbkdf2_hmac('sha256', token.encode(), salt.encode(), 1000).hex()}"
    with pytest.raises(DermaidError, match=r"pbkdf2_sha256 hashes are no longer accepted.*python -m dermaid.auth new"):
        ReviewerTokens({"dr_a": pbkdf2})
    with pytest.raises(DermaidError, match="'dr_a' and 'dr_b' have the same token"):
        ReviewerTokens({"dr_a": stored, "dr_b": stored})


def test_a_wrong_token_costs_one_digest_whatever_the_number_of_reviewers():
    """The old check hashed a wrong token against every entry (PBKDF2: ~0.2 s each here); now one digest + one
    lookup: 20,000 wrong tokens against 2,000 reviewers take well under a second (~40 ms on this 2-core VM)."""
    tokens = ReviewerTokens({f"dr_{i}": hash_token(create_token()) for i in range(2000)})
    wrong = [create_token() for _ in range(20_000)]
    start = time.perf_counter()
    assert not any(tokens.verify(token) for token in wrong)
    assert time.perf_counter() - start < 1.0


def test_tokens_from_the_environment_are_hashed_and_bad_config_is_refused():
    token = create_token()
    tokens = ReviewerTokens.from_settings({"tokens": {"dr_a": hash_token(create_token())}},
                                          environ={"DERMAID_REVIEWER_TOKENS": f"dr_env:{token}"})
    assert tokens.verify(token) == "dr_env" and token not in json.dumps(tokens.hashes())
    assert set(hashes_from_env(f" dr_x:{token} , dr_y:{create_token()} ")) == {"dr_x", "dr_y"}
    assert set(hashes_from_env(f"dr_hex:{'%064x' % int.from_bytes(os.urandom(32), 'big')}")) == {"dr_hex"}
    with pytest.raises(DermaidError, match="review.tokens.dr_a: not a token hash"):
        ReviewerTokens({"dr_a": token})  # a plain token in config is refused: config holds hashes only
    with pytest.raises(DermaidError, match="at least 32 random characters.*python -m dermaid.auth new NAME"):
        hashes_from_env("dr_a:short-but-not-32-chars")
    for guessable in ("ab" * 24, "passwordpasswordpasswordpassword", os.urandom(16).hex()):  # 128-bit hex: ~115
        with pytest.raises(DermaidError, match=r"dr_a.*looks guessable.*python -m dermaid.auth new NAME"):
            hashes_from_env(f"dr_a:{guessable}")
    # a bare token (no name) is refused: a name derived from the token would tell every reader of a label
    # something about that token; labels need a name people recognise anyway
    with pytest.raises(DermaidError, match="entry 2 is a token without a name; write it as 'name:token'"):
        hashes_from_env(f"dr_a:{token},{create_token()}")
    with pytest.raises(DermaidError, match="not 'name:token'"):
        hashes_from_env(f":{token}")
    with pytest.raises(DermaidError, match="reviewer name"):
        ReviewerTokens({"dr a/../": hash_token(token)})
    with pytest.raises(DermaidError, match="also has a token"):
        ReviewerTokens.from_settings({"tokens": {"dr_a": hash_token(token)}},
                                     environ={"DERMAID_REVIEWER_TOKENS": f"dr_a:{token}"})


def test_auth_command_makes_tokens_for_the_configuration_route(capsys, monkeypatch):
    from dermaid.auth import main

    assert main(["new", "dr_smith"]) == 0
    out = capsys.readouterr().out
    token = re.search(r"it is not stored\): (\S+)", out).group(1)
    stored = re.search(r'dr_smith: "(sha256\$[0-9a-f]{64})"', out).group(1)
    assert ReviewerTokens({"dr_smith": stored}).verify(token) == "dr_smith"
    assert f"DERMAID_REVIEWER_TOKENS=dr_smith:{token}" in out and len(token) >= 43
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{token}\n"))
    assert main(["hash"]) == 0 and capsys.readouterr().out.strip() == stored
    monkeypatch.setattr("sys.stdin", io.StringIO("hunter2hunter2hunter2hunter2hunter2\n"))
    assert main(["hash"]) == 2 and "looks guessable" in capsys.readouterr().err
    assert main(["new", "bad name"]) == 2 and "reviewer name" in capsys.readouterr().err


def test_pages_work_under_a_route_prefix():
    """Relative URLs + <base href> from the ASGI root_path: the pages also work behind /prefix (Serve, proxies)."""
    from starlette.requests import Request

    from serve.review import consumer_page, review_page

    for root in ("", "/dermaid"):
        request = Request({"type": "http", "method": "GET", "path": "/", "root_path": root, "headers": []})
        for page in (consumer_page(request), review_page(request)):
            html = page.body.decode()
            assert f'<base href="{root}/">' in html and "{{" not in html
            rest = html.replace(f'<base href="{root}/">', "")
            assert 'src="web/common.js"' in rest and 'src="/' not in rest and 'href="/' not in rest


def test_review_blinded_is_on_by_default_and_can_be_turned_off(tmp_path):
    """review.blinded reaches the replicas' LabelStore (serve/review.py review_settings -> create_review_context)."""
    from dermaid.uploads.store import UploadStore
    from serve.args import AppArgs, ReviewArgs
    from serve.review import create_review_context, review_settings

    uploads = UploadStore(str(tmp_path / "uploads"))
    assert AppArgs(checkpoint="/c").review.blinded is True
    assert create_review_context(uploads, review_settings(ReviewArgs())).labels.blinded is True
    assert create_review_context(uploads, review_settings(ReviewArgs(blinded=False))).labels.blinded is False
    uploads.engine.dispose()


# --- the running application ---------------------------------------------------------------------------------

def _serve_http_port() -> int:
    from ray.serve.context import _get_global_client

    return int(_get_global_client().http_config.port)


def _toy_rows(toy_raw: str) -> list[dict]:
    """The toy set's ground truth + metadata rows (for realistic uploads and for checking the loop)."""
    root = Path(toy_raw)
    with open(root / "ISIC_2019_Training_GroundTruth.csv") as f:
        truth = {row["image"]: next(c for c in CLASS_CODES if float(row[c]) == 1.0) for row in csv.DictReader(f)}
    with open(root / "ISIC_2019_Training_Metadata.csv") as f:
        meta = {row["image"]: row for row in csv.DictReader(f)}
    rows = []
    for image_id, label in sorted(truth.items()):
        path = next((root / "ISIC_2019_Training_Input").glob(f"{image_id}.*"))
        m = meta.get(image_id, {})
        rows.append({"image_id": image_id, "path": path, "label": label, "age": m.get("age_approx") or None,
                     "sex": m.get("sex") or None, "site": m.get("anatom_site_general") or None})
    return rows


@pytest.fixture(scope="module")
def app(ray_session, toy_prepared, toy_raw, trained_run, tmp_path_factory):
    """A running DermAID app serving the session's trained_run (trained on toy_prepared; its card names that version):
    {"base", "storage", "checkpoint", "version", "prepared_dir", "toy_raw", "toy_rows", "tmp"}."""
    from ray import serve

    from serve import app as serve_app

    tmp = tmp_path_factory.mktemp("web")
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    checkpoint = f"{trained_run}/best"  # read-only: served, and the fine-tune's starting point

    storage = str(tmp / "uploads")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = _serve_http_port()  # the port Serve really listens on (an already running Serve keeps its own)
    args = {
        "checkpoint": checkpoint,
        # every upload comes from 127.0.0.1: a high rate limit (the limit has its own test in tests/test_serve.py)
        "storage": {"url": storage, "uploads_per_client_per_hour": 10_000},
        "review": {"tokens": {name: hash_token(token) for name, token in TOKENS.items()}},
        "classifier": {"num_cpus": 0.25, "torch_threads": 1, "decode_threads": 1},
        "explainer": {"num_cpus": 0.25, "torch_threads": 1},
        "ingress": {"num_cpus": 0.1},
    }
    base = f"http://127.0.0.1:{port}"
    try:
        serve.run(serve_app.build_app(args), name="dermaid-web-test", route_prefix="/")
        deadline = time.time() + 180
        while requests.get(f"{base}/readyz", timeout=10).status_code != 200:
            assert time.time() < deadline, "the web test app never became ready"
            time.sleep(0.5)
    except BaseException:
        serve.shutdown()
        raise
    yield {"base": base, "storage": storage, "checkpoint": checkpoint, "version": version,
           "prepared_dir": prepared_dir, "toy_raw": toy_raw, "toy_rows": _toy_rows(toy_raw), "tmp": tmp}
    serve.shutdown()


def _auth(reviewer: str = "dr_ana") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[reviewer]}"}


def _jpeg(seed: int, size: tuple[int, int] = (120, 90)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, "JPEG")
    return buf.getvalue()


def _classify(base: str, data: bytes, consent: bool = True, **fields) -> dict:
    response = requests.post(f"{base}/v1/classify", files={"image": ("photo.jpg", data, "image/jpeg")},
                             data={"consent": str(consent).lower(), **{k: str(v) for k, v in fields.items() if v}},
                             timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: requests.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]["message"]


def _label(base: str, upload_id: str, code: str, reviewer: str = "dr_ana", **extra) -> requests.Response:
    return requests.post(f"{base}/v1/review/uploads/{upload_id}/labels", headers=_auth(reviewer),
                         json={"code": code, **extra}, timeout=30)


def test_pages_are_served_with_the_class_table_and_disclaimer(app):
    base = app["base"]
    page = requests.get(f"{base}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'accept="image/*" capture' in page.text and 'id="consent"' in page.text and DISCLAIMER in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    config = json.loads(re.search(r'id="dermaid-config" type="application/json">(.*?)</script>', page.text).group(1))
    assert [c["code"] for c in config["classes"]] == list(CLASS_CODES) and "posterior torso" in config["sites"]
    review = requests.get(f"{base}/review", timeout=10)
    assert review.status_code == 200 and 'id="token"' in review.text
    assert requests.get(f"{base}/web/consumer.js", timeout=10).headers["content-type"].startswith("text/javascript")
    assert requests.get(f"{base}/web/..%2Fserve.py", timeout=10).status_code == 404
    assert requests.get(f"{base}/web/review.py", timeout=10).status_code == 404
    paths = requests.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/review/queue", "/v1/review/uploads/{upload_id}/labels", "/v1/review/labelstudio/tasks"} <= set(paths)


def test_review_needs_a_dermatologist_token(app):
    base = app["base"]
    upload = _classify(base, _jpeg(1))["upload_id"]
    for path in ["/v1/review/queue", f"/v1/review/uploads/{upload}", f"/v1/review/uploads/{upload}/image",
                 "/v1/review/labelstudio/tasks", "/v1/review/me"]:
        response = requests.get(f"{base}{path}", timeout=10)
        assert "dermatologist token is required" in _error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "unauthorized"
        wrong = requests.get(f"{base}{path}", headers={"Authorization": f"Bearer {create_token()}"}, timeout=10)
        assert _error(wrong, 403) == "this token is not a dermatologist token"
        assert requests.get(f"{base}{path}", headers={"Authorization": f"Basic {TOKENS['dr_ana']}"},
                            timeout=10).status_code == 401
    assert _label(base, upload, "MEL", reviewer="dr_ana").status_code == 201
    wrong = requests.post(f"{base}/v1/review/uploads/{upload}/labels", json={"code": "MEL"}, timeout=10,
                          headers={"Authorization": "Bearer " + TOKENS["dr_ana"][:-2]})
    assert wrong.status_code == 403
    assert requests.get(f"{base}/v1/review/me", headers=_auth("dr_ben"), timeout=10).json()["reviewer"] == "dr_ben"


def test_database_tokens_work_and_are_refused_at_once(app):
    """`dermaid reviewers add|revoke` on the running app's database: no redeploy, no delay either way."""
    from dermaid.uploads.reviewers import ReviewerTokenStore

    base = app["base"]
    store = ReviewerTokenStore.open(app["storage"])  # the app's SQLite database (storage.url, no db_url)
    try:
        token = store.add("dr_live")
        me = requests.get(f"{base}/v1/review/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert me.status_code == 200 and me.json()["reviewer"] == "dr_live", me.text
        store.revoke("dr_live")
        refused = requests.get(f"{base}/v1/review/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert _error(refused, 403) == "this token is not a dermatologist token"
        again = store.add("dr_live")
        assert requests.get(f"{base}/v1/review/me", headers={"Authorization": f"Bearer {again}"},
                            timeout=10).json()["reviewer"] == "dr_live"
        assert requests.get(f"{base}/v1/review/me", headers={"Authorization": f"Bearer {token}"},
                            timeout=10).status_code == 403
    finally:
        with contextlib.suppress(DermaidError):  # already revoked when an assertion above failed after revoke
            store.revoke("dr_live")
        store.close()


def test_queue_is_consented_unlabeled_most_uncertain_first(app):
    """Blinded (review.blinded's default): the queue keeps its order (entropy, read here from the database) but shows
    no prediction, and a filter by the model's class is refused."""
    from dermaid.uploads.labels import LabelStore

    base = app["base"]
    mine = [_classify(base, _jpeg(100 + i))["upload_id"] for i in range(4)]
    not_consented = _classify(base, _jpeg(200), consent=False)
    assert not_consented["upload_id"] is None
    page = requests.get(f"{base}/v1/review/queue", params={"limit": 200}, headers=_auth(), timeout=30).json()
    assert page["blinded"] is True and page["total"] == len(page["items"])
    assert all(item["prediction"] is None and "model_refused" in item for item in page["items"])
    store = LabelStore.open(app["storage"])
    plain = [item["id"] for item in page["items"] if not item["needs_tiebreak"] and not item["model_refused"]]
    entropies = [store.uploads.get(upload)["entropy"] for upload in plain]
    assert entropies == sorted(entropies, reverse=True)
    ids = [item["id"] for item in page["items"]]
    assert set(mine) <= set(ids) and all("blobs" not in item for item in page["items"])

    top = store.uploads.get(ids[0])["top_class"]
    filtered = requests.get(f"{base}/v1/review/queue", params={"top_class": top, "limit": 200}, headers=_auth(),
                            timeout=30)
    assert "review is blinded" in _error(filtered, 422)
    bad = requests.get(f"{base}/v1/review/queue", params={"top_class": "XYZ"}, headers=_auth(), timeout=10)
    assert "top_class" in _error(bad, 422)

    assert _label(base, mine[0], "NV").status_code == 201
    after = requests.get(f"{base}/v1/review/queue", params={"limit": 200}, headers=_auth(), timeout=30).json()
    assert mine[0] not in [item["id"] for item in after["items"]] and after["total"] == page["total"] - 1
    second = requests.get(f"{base}/v1/review/queue", params={"limit": 200, "labels_below": 2},
                          headers=_auth("dr_ben"), timeout=30).json()
    assert mine[0] in [item["id"] for item in second["items"]]  # dr_ben may give a second opinion


def test_label_history_agreement_and_bad_input(app):
    base = app["base"]
    upload = _classify(base, _jpeg(300), age=61, sex="female", site="head/neck")["upload_id"]
    item = requests.get(f"{base}/v1/review/uploads/{upload}", headers=_auth(), timeout=10).json()
    assert item["upload"]["metadata"] == {"age": 61.0, "sex": "female", "site": "head/neck"}
    assert item["upload"]["prediction"] is None and item["labels"] is None and item["revealed"] is False  # blinded
    image = requests.get(f"{base}/v1/review/uploads/{upload}/image", headers=_auth(), timeout=10)
    assert image.content == clean_image(_jpeg(300)).data and image.headers["content-type"] == "image/jpeg"  # no metadata
    model_input = requests.get(f"{base}/v1/review/uploads/{upload}/image", params={"kind": "input"},
                               headers=_auth(), timeout=10)
    assert Image.open(io.BytesIO(model_input.content)).size == (64, 64)

    first = _label(base, upload, "MEL", comment="irregular network", source="web")
    assert first.status_code == 201 and first.json()["label"]["reviewer"] == "dr_ana"
    item = requests.get(f"{base}/v1/review/uploads/{upload}", headers=_auth(), timeout=10).json()
    assert len(item["upload"]["prediction"]["probabilities"]) == 8 and len(item["labels"]) == 1  # revealed
    assert _label(base, upload, "BKL", reviewer="dr_ben").json()["agreement"]["consensus"] is None  # a tie
    assert _label(base, upload, "BKL", comment="on reflection: seborrhoeic").status_code == 201
    history = requests.get(f"{base}/v1/review/uploads/{upload}/labels", headers=_auth("dr_ben"), timeout=10).json()
    assert [(h["reviewer"], h["code"]) for h in history["labels"]] == [("dr_ana", "MEL"), ("dr_ben", "BKL"),
                                                                      ("dr_ana", "BKL")]
    assert history["labels"][0]["comment"] == "irregular network" and history["labels"][0]["source"] == "web"
    assert history["agreement"] == {"labels": 3, "reviewers": 2, "votes": {"BKL": 2}, "consensus": "BKL",
                                    "agreement": 1.0}

    assert "no such upload" in _error(_label(base, str(uuid.uuid4()), "MEL"), 404)
    assert "not an upload id" in _error(_label(base, "not-a-uuid", "MEL"), 400)
    assert "not an upload id" in _error(requests.get(f"{base}/v1/review/uploads/{upload}..",
                                                     headers=_auth(), timeout=10), 400)
    assert requests.get(f"{base}/v1/review/uploads/..%2F..%2Fuploads.db/image", headers=_auth(),
                        timeout=10).status_code in (400, 404)
    assert "allowed: MEL, NV, BCC, AK, BKL, DF, VASC, SCC, NONE" in _error(_label(base, upload, "melanoma"), 422)
    assert "at most 2000" in _error(_label(base, upload, "MEL", comment="x" * 5000), 422)
    assert _error(requests.post(f"{base}/v1/review/uploads/{upload}/labels", headers=_auth(), json={},
                                timeout=10), 422).startswith("code: required")
    assert len(requests.get(f"{base}/v1/review/uploads/{upload}/labels", headers=_auth(),
                            timeout=10).json()["labels"]) == 3  # the refused requests stored nothing


def test_blinded_review_reveals_the_model_and_the_labels_after_the_reviewers_own(app):
    """dr_ana labels; dr_ben sees neither the prediction nor her label (item, labels, labeled) until he has labelled;
    then everything. Confidence and advice are validated and stored; the tie they make is offered to a third
    reviewer, flagged."""
    from dermaid.uploads.labels import LabelStore
    from dermaid.uploads.reviewers import ReviewerTokenStore

    base = app["base"]
    upload = _classify(base, _jpeg(320), age=48, site="lower extremity")["upload_id"]
    first = _label(base, upload, "BCC", comment="pearly rim 7f3a", confidence="high", advice="biopsy")
    assert first.status_code == 201, first.text
    assert (first.json()["label"]["confidence"], first.json()["label"]["advice"]) == ("high", "biopsy")
    assert first.json()["label"]["blinded"] is True

    item = requests.get(f"{base}/v1/review/uploads/{upload}", headers=_auth("dr_ben"), timeout=10)
    body = item.json()
    assert item.status_code == 200 and body["revealed"] is False and body["blinded"] is True
    assert body["upload"]["prediction"] is None and body["labels"] is None and body["agreement"] is None
    assert body["upload"]["metadata"]["site"] == "lower extremity" and body["reviewers"] == 1
    assert "pearly rim 7f3a" not in item.text and "probabilit" not in item.text and "BCC" not in item.text
    labels = requests.get(f"{base}/v1/review/uploads/{upload}/labels", headers=_auth("dr_ben"), timeout=10).json()
    assert labels["labels"] is None and labels["agreement"] is None and labels["revealed"] is False
    labeled = requests.get(f"{base}/v1/review/labeled", headers=_auth("dr_ben"), timeout=30).json()
    assert upload not in [row["upload"]["id"] for row in labeled["items"]] and labeled["withheld"] >= 1
    assert upload in [row["upload"]["id"] for row in requests.get(f"{base}/v1/review/labeled", headers=_auth(),
                                                                  timeout=30).json()["items"]]

    assert "confidence: Input should be 'low', 'medium' or 'high'" in _error(
        _label(base, upload, "NV", reviewer="dr_ben", confidence="sure"), 422)
    assert "advice: Input should be 'none', 'visit' or 'biopsy'" in _error(
        _label(base, upload, "NV", reviewer="dr_ben", advice="excise"), 422)
    second = _label(base, upload, "NV", reviewer="dr_ben", confidence="low", advice="visit")
    assert second.status_code == 201 and second.json()["label"]["blinded"] is True
    body = requests.get(f"{base}/v1/review/uploads/{upload}", headers=_auth("dr_ben"), timeout=10).json()
    assert body["revealed"] is True and len(body["upload"]["prediction"]["probabilities"]) == 8
    assert [(h["reviewer"], h["code"], h["comment"]) for h in body["labels"]] == [
        ("dr_ana", "BCC", "pearly rim 7f3a"), ("dr_ben", "NV", None)]
    assert body["needs_tiebreak"] is True and body["agreement"]["consensus"] is None
    stored = LabelStore.open(app["storage"]).history(upload)
    assert [(h["confidence"], h["advice"], h["blinded"]) for h in stored] == [("high", "biopsy", True),
                                                                          ("low", "visit", True)]

    tokens = ReviewerTokenStore.open(app["storage"])
    try:  # a third reviewer gets the tie in their queue, flagged, whatever labels_below says
        third = {"Authorization": f"Bearer {tokens.add('dr_cara')}"}
        queue = requests.get(f"{base}/v1/review/queue", params={"limit": 200}, headers=third, timeout=30).json()
        entry = next(item for item in queue["items"] if item["id"] == upload)
        assert entry["needs_tiebreak"] is True and entry["reviewers"] == 2 and entry["prediction"] is None
        assert all(item["needs_tiebreak"] or not item["reviewers"] for item in queue["items"])
        assert upload not in [item["id"] for item in requests.get(f"{base}/v1/review/queue", params={"limit": 200},
                                                                  headers=_auth("dr_ben"), timeout=30).json()["items"]]
    finally:
        tokens.revoke("dr_cara")
        tokens.close()


def test_reviewer_statistics_route(app):
    """GET /v1/review/stats: the store's statistics over the app's database (kappa per pair, alpha, ties)."""
    from dermaid.uploads.labels import LabelStore

    base = app["base"]
    upload = _classify(base, _jpeg(330))["upload_id"]
    for reviewer in TOKENS:
        assert _label(base, upload, "DF", reviewer=reviewer, confidence="medium", advice="none").status_code == 201
    assert "dermatologist token is required" in _error(requests.get(f"{base}/v1/review/stats", timeout=10), 401)
    response = requests.get(f"{base}/v1/review/stats", headers=_auth(), timeout=30)
    body = response.json()
    assert response.status_code == 200 and body.pop("blinded") is True and body.pop("disclaimer") == DISCLAIMER
    assert body == LabelStore.open(app["storage"]).statistics()  # nothing else writes labels meanwhile
    pair = next(p for p in body["pairs"] if p["reviewers"] == ["dr_ana", "dr_ben"])
    assert pair["shared"] >= 1 and (pair["cohen_kappa"] is None or -1 <= pair["cohen_kappa"] <= 1)
    assert body["reviewers"]["dr_ana"]["confidence"]["medium"] >= 1 and "Krippendorff" in body["overall"]["method"]


def test_two_reviewers_labeling_at_the_same_moment_both_count(app):
    base = app["base"]
    upload = _classify(base, _jpeg(400))["upload_id"]
    barrier = threading.Barrier(2)
    statuses: dict[str, int] = {}

    def label(reviewer: str, code: str) -> None:
        barrier.wait()
        statuses[reviewer] = _label(base, upload, code, reviewer=reviewer).status_code

    threads = [threading.Thread(target=label, args=args) for args in [("dr_ana", "SCC"), ("dr_ben", "AK")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == {"dr_ana": 201, "dr_ben": 201}
    labels = requests.get(f"{base}/v1/review/uploads/{upload}/labels", headers=_auth(), timeout=10).json()
    assert sorted((h["reviewer"], h["code"]) for h in labels["labels"]) == [("dr_ana", "SCC"), ("dr_ben", "AK")]


def test_labelstudio_export_and_import_over_http(app):
    base = app["base"]
    upload = _classify(base, _jpeg(500))["upload_id"]
    config = requests.get(f"{base}/v1/review/labelstudio/config", headers=_auth(), timeout=10)
    assert config.headers["content-type"].startswith("application/xml") and 'name="diagnosis"' in config.text
    tasks = requests.get(f"{base}/v1/review/labelstudio/tasks", headers=_auth(), timeout=30).json()
    task = next(t for t in tasks if t["data"]["upload_id"] == upload)
    assert task["data"]["image"] == f"{base}/v1/review/uploads/{upload}/image"
    # blinded review: no pre-annotation, and neither the class nor the uncertainty in the task's data
    assert "predictions" not in task and "top_class" not in task["data"] and "entropy" not in task["data"]
    assert "blinded review" in task["data"]["summary"]

    # the file claims dr_ben voted, in the year 2999: the label is the token holder's (dr_ana), dated now
    annotated = [{**task, "id": 41, "annotations": [
        {"id": 77, "completed_by": {"id": 3, "email": "dr_ben"}, "created_at": "2999-02-03T04:05:06Z",
         "result": [{"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": ["DF"]}},
                    {"from_name": "comment", "to_name": "image", "type": "textarea", "value": {"text": ["firm"]}}]}]}]
    imported = requests.post(f"{base}/v1/review/labelstudio/import", headers=_auth(), json=annotated, timeout=30)
    assert imported.status_code == 200 and imported.json()["imported"] == 1 and imported.json()["reviewer"] == "dr_ana"
    again = requests.post(f"{base}/v1/review/labelstudio/import", headers=_auth(), json=annotated, timeout=30)
    assert again.json() | {"tasks": None} == {"tasks": None, "imported": 0, "already_imported": 1,
                                              "skipped_cancelled": 0, "skipped_without_diagnosis": 0,
                                              "reviewer": "dr_ana", "labelstudio_users": 1}
    labels = requests.get(f"{base}/v1/review/uploads/{upload}/labels", headers=_auth(), timeout=10).json()["labels"]
    assert [(h["reviewer"], h["imported_by"], h["code"], h["comment"], h["source"]) for h in labels] == [
        ("dr_ana", "dr_ana", "DF", "firm", "labelstudio")]
    assert labels[0]["created"] < "2999" and labels[0]["external_id"].startswith("labelstudio:dr_ana:")
    by_ben = requests.post(f"{base}/v1/review/labelstudio/import", headers=_auth("dr_ben"), json=annotated, timeout=30)
    assert by_ben.json()["imported"] == 1  # dr_ana's import claims no ids in dr_ben's name
    annotated[0]["annotations"][0]["result"][0]["value"]["choices"] = ["Dermatofibroma"]
    annotated[0]["annotations"][0]["id"] = 78
    assert "is not a review code" in _error(requests.post(f"{base}/v1/review/labelstudio/import", headers=_auth(),
                                                          json=annotated, timeout=30), 422)
    unauthorised = requests.post(f"{base}/v1/review/labelstudio/import", json=annotated, timeout=30)
    assert unauthorised.status_code == 401


# --- the browser ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (set DERMAID_CHROMIUM)")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_browser_consumer_page_then_review_page(app, browser, tmp_path):
    from playwright.sync_api import expect

    from dermaid.uploads.labels import LabelStore

    base = app["base"]
    toy = next(row for row in app["toy_rows"] if row["age"] and row["sex"] and row["site"])
    errors: list[str] = []
    page = browser.new_page(viewport=PHONE)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{base}/")
    expect(page.locator("#disclaimer-top")).to_have_text(DISCLAIMER)

    # an API error shown as words a person can act on
    (tmp_path / "notes.jpg").write_text("<html>not a photo</html>")
    page.set_input_files("#choose", str(tmp_path / "notes.jpg"))
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("not a photo DermAID can read", timeout=60_000)
    page.screenshot(path=str(tmp_path / "consumer-error.png"), full_page=True)

    page.set_input_files("#choose", str(toy["path"]))
    page.fill("#age", str(int(float(toy["age"]))))
    page.select_option("#sex", toy["sex"])
    page.select_option("#site", toy["site"])
    page.check("#consent")
    page.click("#submit")
    expect(page.locator("#bars li")).to_have_count(8, timeout=60_000)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#triage")).to_contain_text("Most likely:")
    expect(page.locator("#overlay")).to_have_attribute("src", re.compile(r"^blob:"), timeout=60_000)
    overlay = page.locator("#overlay").evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
    photo = Image.open(toy["path"]).size
    from serve.args import AppArgs
    # the overlay is the photo scaled to at most overlay_max_side on its long side (aspect kept, to a pixel) ...
    assert max(overlay) == min(max(photo), AppArgs.model_fields["overlay_max_side"].default)
    assert abs(overlay[0] * photo[1] - overlay[1] * photo[0]) <= max(photo)
    # ... and the page shows it over the same area as the photo, whatever its pixel size
    box = "img => { const r = img.getBoundingClientRect(); return [r.width, r.height]; }"
    assert page.locator("#overlay").evaluate(box) == page.locator("#photo").evaluate(box)
    top_name = page.locator("#triage strong").text_content().removeprefix("Most likely: ").rsplit(" (", 1)[0]
    expect(page.locator("#overlay-caption")).to_have_text(f"Where the model looked for “{top_name}”")
    widths = page.locator("#bars .fill").evaluate_all("fills => fills.map(f => f.getBoundingClientRect().width)")
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    upload_id = page.locator("#reference-id").text_content()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", upload_id)
    expect(page.locator("#reference")).to_contain_text("A dermatologist may review")
    expect(page.locator("#disclaimer")).to_have_text(DISCLAIMER)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
    page.screenshot(path=str(tmp_path / "consumer.png"), full_page=True)

    store = LabelStore.open(app["storage"])
    row = store.uploads.get(upload_id)
    assert (row["age"], row["sex"], row["site"]) == (float(int(float(toy["age"]))), toy["sex"], toy["site"])

    # blinded review: the photo and its metadata, a choice (class, confidence, advice), and only then the model
    review = browser.new_page(viewport=PHONE)
    review_saliency: list[str] = []
    review.on("pageerror", lambda exc: errors.append(str(exc)))
    review.on("request", lambda request: review_saliency.append(request.url) if "v1/saliency" in request.url else None)
    review.goto(f"{base}/review")
    review.fill("#token", create_token())
    review.click("#signin-form button")
    expect(review.locator("#error")).to_have_text("this token is not a dermatologist token", timeout=30_000)
    review.fill("#token", TOKENS["dr_ben"])
    review.click("#signin-form button")
    expect(review.locator("#who")).to_have_text("Signed in as dr_ben", timeout=30_000)
    entry = review.locator(f'#queue-list button[data-id="{upload_id}"]')
    expect(entry).to_be_visible(timeout=30_000)
    expect(review.locator("#filter")).to_be_hidden()  # no filter by the model's class
    queue_text = review.locator("#queue-list").inner_text()
    assert "Model" not in queue_text and "%" not in queue_text and "uncertainty" not in queue_text
    assert top_name not in queue_text
    review.locator("#stats summary").click()
    expect(review.locator("#stats-overall")).to_contain_text("Krippendorff")
    review.screenshot(path=str(tmp_path / "review-queue.png"), full_page=True)
    entry.click()
    expect(review.locator("#item-id")).to_have_text(upload_id)
    expect(review.locator("#item-meta")).to_contain_text(toy["site"])
    expect(review.locator("#item-photo")).to_have_attribute("src", re.compile(r"^blob:"), timeout=30_000)
    expect(review.locator("#blind-note")).to_be_visible()
    for hidden in ("#reveal", "#item-overlay", "#item-bars", "#history"):
        expect(review.locator(hidden)).to_be_hidden()
    expect(review.locator("#item-bars li")).to_have_count(0)
    expect(review.locator("#history li")).to_have_count(0)
    item_text = review.locator("#item").inner_text()
    assert "%" not in item_text and "Model prediction" not in item_text and "Labels so far" not in item_text
    assert review_saliency == []  # the saliency map was not even asked for
    review.screenshot(path=str(tmp_path / "review-blinded.png"), full_page=True)
    review.check(f'#codes input[value="{toy["label"]}"]')
    review.check('#confidence input[value="medium"]')
    review.check('#advice input[value="visit"]')
    review.fill("#comment", "reviewed in the browser test")
    review.click("#label-form button[type=submit]")
    expect(review.locator("#history li")).to_have_count(1, timeout=30_000)   # revealed after saving
    expect(review.locator("#agreement")).to_contain_text(f"consensus {toy['label']}")
    expect(review.locator("#item-bars li")).to_have_count(8)
    expect(review.locator("#item-bars li").first).to_contain_text(top_name)
    expect(review.locator("#item-overlay")).to_have_attribute("src", re.compile(r"^blob:"), timeout=60_000)
    expect(review.locator("#blind-note")).to_be_hidden()
    expect(review.locator("#history li")).to_contain_text("medium confidence")
    assert len(review_saliency) == 1
    review.screenshot(path=str(tmp_path / "review-item.png"), full_page=True)

    labels = store.history(upload_id)
    assert [(h["reviewer"], h["code"], h["source"], h["comment"], h["confidence"], h["advice"], h["blinded"])
            for h in labels] == [("dr_ben", toy["label"], "web", "reviewed in the browser test", "medium", "visit",
                                  True)]
    assert not errors, errors
    for name in ("consumer.png", "consumer-error.png", "review-queue.png", "review-blinded.png", "review-item.png"):
        assert (tmp_path / name).stat().st_size > 5_000


@pytest.fixture()
def calibrated_page(app, calibrated_checkpoint):
    """The base URL of a second app on the module's Serve (route prefix /ood) serving conftest's
    calibrated_checkpoint: its answers carry the OOD detector's abstain. Deleted after its test: on 2 CPUs its
    replicas' reservations would leave a later Ray Train run (the fine-tune loop test) no CPU to start on."""
    from ray import serve

    from serve import app as serve_app

    args = {
        "checkpoint": calibrated_checkpoint, "storage": {"url": str(app["tmp"] / "ood-uploads")},
        "classifier": {"num_cpus": 0.25, "torch_threads": 1, "forward_lanes": 1},
        "explainer": {"num_cpus": 0.25, "torch_threads": 1}, "ingress": {"num_cpus": 0.1},
        "review": {"tokens": {name: hash_token(token) for name, token in TOKENS.items()}},
    }
    serve.run(serve_app.build_app(args), name="dermaid-web-ood", route_prefix="/ood")
    yield f"{app['base']}/ood"
    serve.delete("dermaid-web-ood")


def test_browser_an_abstained_photo_shows_only_the_retake_message(app, calibrated_page, calibrated_checkpoint,
                                                                  browser, tmp_path):
    from playwright.sync_api import expect

    from dermaid.data.synth_ood import iter_ood_images
    from dermaid.inference import RETAKE_MESSAGE, Predictor

    document = tmp_path / "document.jpg"
    document.write_bytes(next(data for _, data in iter_ood_images(1, seed=3, size=(320, 240), kinds=("document",))))
    paths = [row["path"] for row in app["toy_rows"][:12]]
    batch = Predictor(calibrated_checkpoint).predict_full([(Path(p).read_bytes(), None, None, None) for p in paths])
    assert batch.abstain.mean() <= 0.5
    lesion = paths[int(np.argmin(batch.ood_scores))]  # the toy lesion the model finds most familiar

    errors: list[str] = []
    saliency_requests: list[str] = []
    page = browser.new_page(viewport=PHONE)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: saliency_requests.append(request.url) if "v1/saliency" in request.url else None)
    page.goto(f"{calibrated_page}/")
    page.set_input_files("#choose", str(document))
    page.check("#consent")  # stored: a refused photo is what a dermatologist should see first
    page.click("#submit")
    expect(page.locator("#retake")).to_have_text(RETAKE_MESSAGE, timeout=60_000)
    for hidden in ("#triage", "#ranking", "#overlay-figure"):
        expect(page.locator(hidden)).to_be_hidden()
    expect(page.locator("#bars li")).to_have_count(0)
    expect(page.locator("#disclaimer")).to_have_text(DISCLAIMER)
    assert "Most likely" not in page.locator("#result").inner_text()
    page.screenshot(path=str(tmp_path / "consumer-abstained.png"), full_page=True)

    page.set_input_files("#choose", str(lesion))  # the next photo is answered as before
    page.click("#submit")
    expect(page.locator("#triage")).to_contain_text("Most likely:", timeout=60_000)
    expect(page.locator("#retake")).to_be_hidden()
    expect(page.locator("#bars li")).to_have_count(8)
    expect(page.locator("#overlay")).to_have_attribute("src", re.compile(r"^blob:"), timeout=60_000)
    assert len(saliency_requests) == 1  # only the answered photo asked for an overlay

    # both photos were stored with consent: the refused one comes first. Blinded, the queue names no class for either
    # (not even the refused photo's best guess): "a photo the model could not assess" is about the photo, not a
    # diagnosis, and is why it comes first.
    review = browser.new_page(viewport=PHONE)
    review.on("pageerror", lambda exc: errors.append(str(exc)))
    review.goto(f"{calibrated_page}/review")
    review.fill("#token", TOKENS["dr_ana"])
    review.click("#signin-form button")
    expect(review.locator("#queue-list button")).to_have_count(2, timeout=30_000)
    first = review.locator("#queue-list button").first
    expect(first).to_contain_text("Photo the model could not assess (unlike its training photos)")
    expect(first).to_have_class("refused")
    queue_text = review.locator("#queue-list").inner_text()
    assert "Model" not in queue_text and "%" not in queue_text and "best guess" not in queue_text
    assert not [d.name for d in BY_CODE.values() if d.name in queue_text]
    first.click()
    expect(review.locator("#item-meta")).to_contain_text("refused: unlike the model's training photos")
    expect(review.locator("#item-bars li")).to_have_count(0)
    expect(review.locator("#reveal")).to_be_hidden()
    review.screenshot(path=str(tmp_path / "review-refused.png"), full_page=True)
    assert not errors, errors


# --- closing the loop ----------------------------------------------------------------------------------------

def test_loop_classify_label_export_prepare_finetune(app, tmp_path):
    """classify with consent -> labels through the API -> labels-export -> prepare -> 1-epoch fine-tune."""
    from dermaid.config import compose
    from dermaid.data.loading import load_records, read_manifest
    from dermaid.data.prepare import prepare_dataset
    from dermaid.models.card import load_card
    from dermaid.uploads.export import run as run_export
    from dermaid.training.driver import train

    base = app["base"]
    by_class: dict[str, dict] = {}
    for row in reversed(app["toy_rows"]):  # the last photo per class: earlier tests upload the first ones, and a
        by_class.setdefault(row["label"], row)  # photo stored before is not stored again (no reference: a duplicate)
    chosen = [by_class[code] for code in ("MEL", "NV", "BCC", "BKL")]
    uploads = []
    for row in chosen:
        body = _classify(base, row["path"].read_bytes(), age=row["age"], sex=row["sex"], site=row["site"])
        assert body["stored"] and not body["duplicate"] and body["upload_id"], body
        uploads.append(body["upload_id"])
    for upload, row in zip(uploads, chosen):  # two dermatologists agree on each
        for reviewer in TOKENS:
            assert _label(base, upload, row["label"], reviewer=reviewer).status_code == 201
    unusable = _classify(base, _jpeg(600))["upload_id"]
    for reviewer in TOKENS:
        _label(base, unusable, NOT_A_LESION, reviewer=reviewer)

    # what the export will take: consensus of both reviewers (earlier tests' uploads may qualify too), no NONE
    labeled = requests.get(f"{base}/v1/review/labeled", params={"min_agreement": 1.0, "min_reviewers": 2},
                           headers=_auth(), timeout=30).json()["items"]
    expected = {item["upload"]["id"]: item["agreement"]["consensus"] for item in labeled
                if item["agreement"]["consensus"] != NOT_A_LESION}
    assert set(uploads) <= set(expected) and unusable not in expected
    assert [expected[u] for u in uploads] == [row["label"] for row in chosen]

    out = tmp_path / "labels"
    summary = run_export(compose("labels-export", [f"out={out}", f"storage.url={app['storage']}",
                                                   "min_agreement=1.0", "min_reviewers=2"]))
    exported = json.loads((out / "labels.json").read_text())
    assert {image["upload_id"]: image["label"] for image in exported["images"]} == expected
    assert summary["count"] == len(expected) and summary["excluded_not_a_lesion"] >= 1

    prepared = str(tmp_path / "prepared")
    labels_version = prepare_dataset(compose("prepare", [f"data.root={out}", "data.image_size=96"]).data,
                                     out=prepared, tag="labels")
    assert labels_version["num_records"] == len(expected) and labels_version["counts"]["class"] == summary["counts"]

    result = train(compose("train", [
        "experiment=[toy,finetune]", f"train.init_from={app['checkpoint']}", f"out={tmp_path / 'finetune'}",
        f"data.root={app['toy_raw']}", f"data.extra={out}", f"data.prepared_dir={prepared}", "data.image_size=96",
        "data.tag=null", "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=16",
        "train.image_size=64",
    ]))
    card = load_card(result["last_checkpoint"])
    merged = result["dataset_version"]
    assert card.dataset_versions == [app["version"], merged] and card.dataset_version == merged
    assert merged != app["version"] and merged != labels_version["version"]
    manifest = read_manifest(f"{prepared}/{merged}")
    original = read_manifest(f"{app['prepared_dir']}/{app['version']}")["num_records"]
    assert manifest["num_records"] == original + len(expected)
    records = load_records(f"{prepared}/{merged}", "all", with_images=False)
    new = records[records["source"] == "labels"]
    assert sorted(new["label"]) == sorted(expected.values())
    assert Path(result["last_checkpoint"], "model.pt").exists()


# --- issue #18: the token before the body, less in public, small holes ------------------------------------------

def _raw_post(base: str, path: str, headers: dict[str, str], chunks: list[bytes] = ()) -> tuple[int, dict]:
    """POST over a raw socket: the headers, then only `chunks` (possibly far less than Content-Length says);
    (status, JSON body). A server that waited for the declared body would make this time out."""
    port = int(base.rsplit(":", 1)[1])
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{head}\r\n".encode())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for chunk in chunks:
                sock.sendall(chunk)
        response = b""
        while not (b"\r\n\r\n" in response and response.rstrip().endswith(b"}")):
            part = sock.recv(65536)
            if not part:
                break
            response += part
    status_line, _, body = response.partition(b"\r\n\r\n")
    return int(status_line.split(b" ", 2)[1]), json.loads(body)


def test_review_checks_the_token_before_reading_a_body(app):
    """The POST routes used to parse up to 20 MiB of JSON before the token check (~0.55 GB of Ingress memory per
    request: benchmarks/review_body_cost.py). A 16 MiB body declared but never sent now gets 401 / 403 at once:
    nothing of it was read. A reviewer's body is capped per route (label 32 KiB, import 4 MiB)."""
    base = app["base"]
    upload = _classify(base, _jpeg(700))["upload_id"]
    declared = {"Content-Type": "application/json", "Content-Length": str(16 * 1024 * 1024)}
    for path in ("/v1/review/labelstudio/import", f"/v1/review/uploads/{upload}/labels"):
        assert _raw_post(base, path, declared)[1]["error"]["code"] == "unauthorized"
        status, body = _raw_post(base, path, {**declared, "Authorization": f"Bearer {create_token()}"})
        assert (status, body["error"]["code"]) == (403, "forbidden")
        status, body = _raw_post(base, path, {**declared, **_auth()})  # a reviewer, over the route's own limit
        assert (status, body["error"]["code"]) == (413, "body_too_large")
    block = b" " * 16384
    status, body = _raw_post(base, f"/v1/review/uploads/{upload}/labels",  # streamed: no Content-Length to refuse
                             {"Content-Type": "application/json", "Transfer-Encoding": "chunked", **_auth()},
                             [b"%x\r\n%s\r\n" % (len(block), block)] * 8 + [b"0\r\n\r\n"])
    assert status == 413 and "32 KiB" in body["error"]["message"]

    json_type = {"Content-Type": "application/json"}
    no_token = requests.post(f"{base}/v1/review/labelstudio/import", data=b"{not json", headers=json_type, timeout=10)
    assert no_token.status_code == 401  # the token first (FastAPI's body parsing used to answer 422 here)
    deep = requests.post(f"{base}/v1/review/labelstudio/import", data=b"[" * 200_000 + b"]" * 200_000,
                         headers={**json_type, **_auth()}, timeout=30)
    assert "nested too deeply" in _error(deep, 422)
    assert "not JSON" in _error(requests.post(f"{base}/v1/review/uploads/{upload}/labels", data=b"{code: MEL",
                                              headers={**json_type, **_auth()}, timeout=10), 422)
    form = requests.post(f"{base}/v1/review/uploads/{upload}/labels", data={"code": "MEL"}, headers=_auth(), timeout=10)
    assert "application/json" in _error(form, 415)
    assert _label(base, upload, "MEL").status_code == 201  # an ordinary label still goes through


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_public_model_card_is_a_subset_and_the_whole_card_needs_a_token(app):
    base = app["base"]
    public = requests.get(f"{base}/v1/model", timeout=30)
    assert "dermatologist token is required" in _error(requests.get(f"{base}/v1/review/model", timeout=10), 401)
    full = requests.get(f"{base}/v1/review/model", headers=_auth(), timeout=30)
    assert full.status_code == 200 and full.headers["cache-control"] == "no-store"
    card, whole = public.json()["card"], full.json()["card"]
    assert set(card) == {"format_version", "kind", "classes", "input", "metadata", "calibration", "architecture",
                         "metrics", "intended_use"}
    assert (card["classes"], card["input"], card["architecture"]) == (whole["classes"], whole["input"],
                                                                     whole["model"]["name"])
    assert card["metrics"]["val"] == whole["metrics"]["val"]
    assert all(key == "val" or key.startswith("val/") for key in card["metrics"])
    assert public.json()["model_version"] == full.json()["model_version"] and "not a diagnosis" in public.text
    assert whole["config"] and whole["code_version"]
    paths = {text for text in _strings(whole["config"]) if text.startswith("/")}  # the training run's own paths
    assert paths and not [path for path in paths if path in public.text]


def test_swagger_ui_is_off_unless_configured(app):
    """FastAPI's /docs loads a CDN script on the review page's origin: off by default (ingress.docs)."""
    base = app["base"]
    assert "ingress.docs" in _error(requests.get(f"{base}/docs", timeout=10), 404)
    assert requests.get(f"{base}/redoc", timeout=10).status_code == 404
    assert "/v1/classify" in requests.get(f"{base}/openapi.json", timeout=10).json()["paths"]


def test_review_small_holes_are_4xx_not_500(app):
    base = app["base"]
    upload = _classify(base, _jpeg(701))["upload_id"]
    for path in ("/v1/review/queue", "/v1/review/labelstudio/tasks"):  # a 20-digit offset overflowed the database
        huge = requests.get(f"{base}{path}", params={"offset": "9" * 20}, headers=_auth(), timeout=10)
        assert "offset" in _error(huge, 422)
    assert requests.get(f"{base}/v1/review/me", headers=_auth(), timeout=10).headers["cache-control"] == "no-store"
    hex_id = upload.replace("-", "")
    assert requests.get(f"{base}/v1/review/uploads/{hex_id}", headers=_auth(), timeout=10).status_code == 200
    trailing = requests.get(f"{base}/v1/review/uploads/{hex_id}%0A", headers=_auth(), timeout=10)
    assert "not an upload id" in _error(trailing, 400)  # `$` used to accept a trailing newline

    task = {"id": 90, "data": {"upload_id": upload}, "annotations": [{
        "id": 91, "created_at": "9999-12-31T23:00:00-05:00",  # past the last UTC datetime: overflowed (500)
        "result": [{"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": ["NV"]}}]}]}
    imported = requests.post(f"{base}/v1/review/labelstudio/import", headers=_auth(), json=[task], timeout=30)
    assert "out of range" in _error(imported, 422)
    storage = requests.get(f"{base}/v1/review/labelstudio/tasks", params={"images": "storage"}, headers=_auth(),
                           timeout=30)
    assert "use images=api" in _error(storage, 422) and app["storage"] not in storage.text  # local paths stay here


def test_upload_ids_are_matched_whole_and_offsets_and_dates_are_bounded(tmp_path):
    """In process: parse_upload_id, LabelStore.queue's offset, a Label Studio created_at out of range."""
    from dermaid.uploads.labels import MAX_OFFSET, LabelStore
    from dermaid.uploads.labelstudio import parse_labelstudio_export
    from dermaid.uploads.validation import InvalidUploadId, parse_upload_id

    good = uuid.uuid4()
    assert parse_upload_id(good.hex) == parse_upload_id(str(good)) == str(good)
    for bad in (good.hex + "\n", str(good) + "\n", "\n" + good.hex, good.hex + "\r"):
        with pytest.raises(InvalidUploadId):
            parse_upload_id(bad)
    labels = LabelStore.open(str(tmp_path / "uploads"))
    assert labels.queue(offset=MAX_OFFSET)["items"] == []
    with pytest.raises(DermaidError, match="offset: at most"):
        labels.queue(offset=10 ** 20)
    for when in ("9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+01:00"):
        task = {"data": {"upload_id": str(good)}, "annotations": [{"created_at": when, "result": [
            {"from_name": "diagnosis", "type": "choices", "value": {"choices": ["NV"]}}]}]}
        with pytest.raises(DermaidError, match="out of range"):
            parse_labelstudio_export([task])


# --- issue #13: the consumer's photo: no metadata, lookup and deletion with the token, privacy note ------------

def _gps_jpeg(seed: int) -> bytes:
    """A phone photo as sent: EXIF with a GPS position and the device."""
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = "PhoneCo", "Pocket 7"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef], gps[ExifTags.GPS.GPSLatitude] = "N", (52.0, 31.0, 12.5)
    buf = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(seed))).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _upload_call(base: str, ref: str, token: str | None, method: str = "GET",
                 scheme: str = "Bearer") -> requests.Response:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return requests.request(method, f"{base}/v1/uploads/{ref}", headers=headers, timeout=30)


def test_privacy_note_states_the_retention():
    from serve.uploads_api import privacy_body

    assert "deleted after 30 days" in privacy_body(30.0)["how_long"]
    assert privacy_body(None)["how_long"].startswith("until you delete it")
    assert privacy_body(None)["disclaimer"] == DISCLAIMER


def test_consumer_lookup_and_delete_need_the_uploads_own_token(app):
    """GET / DELETE /v1/uploads/{ref}: the reference and token the consent answer gave once; anything else is the
    same 404; a deletion removes the blobs, the row and the labels."""
    from dermaid.uploads.labels import LabelStore
    from dermaid.uploads.store import UploadStore

    base, storage = app["base"], app["storage"]
    sent = _gps_jpeg(1300)
    answer = requests.post(f"{base}/v1/classify", files={"image": ("photo.jpg", sent, "image/jpeg")},
                           data={"consent": "true"}, timeout=60)
    body = answer.json()
    ref, token = body["upload_id"], body["lookup_token"]
    assert body["stored"] is True and body["duplicate"] is False and len(token) >= 43
    assert answer.headers["cache-control"] == "no-store"
    store = UploadStore(storage)
    row = store.get(ref)
    stored = Image.open(io.BytesIO(store.read_blob(row["blobs"]["image"])))
    assert not stored.getexif() and b"PhoneCo" not in store.read_blob(row["blobs"]["image"])  # no EXIF, no GPS
    assert token not in json.dumps(row)
    assert not any(token.encode() in f.read_bytes() for f in Path(storage).rglob("*") if f.is_file())  # digest only

    again = _classify(base, sent)  # the same photo again: stored once, and no one else's reference or token
    assert (again["stored"], again["duplicate"], again["upload_id"], again["lookup_token"]) == (True, True, None, None)
    assert _classify(base, sent, consent=False)["lookup_token"] is None

    state = _upload_call(base, ref, token)
    assert state.status_code == 200 and state.headers["cache-control"] == "no-store", state.text
    assert state.json() | {"uploaded": None} == {
        "reference": ref, "uploaded": None, "state": "waiting_for_review", "delete_after": None,
        "message": "No dermatologist has reviewed this photo yet.", "disclaimer": DISCLAIMER}

    other = _classify(base, _jpeg(1301))
    not_found = []
    for method in ("GET", "DELETE"):
        for args in [(ref, other["lookup_token"]), (ref, create_token()), (ref, None), (ref, token[:-1]),
                     (ref, token, method, "Basic"), (ref, TOKENS["dr_ana"]), (str(uuid.uuid4()), token),
                     (other["upload_id"], token), ("not-a-reference", token), (ref + "x", token)]:
            response = _upload_call(base, *args[:2], method, *args[3:])
            assert response.status_code == 404, (method, args, response.text)
            not_found.append(response.json())
    assert all(item == {"error": {"code": "not_found", "message": not_found[0]["error"]["message"]}}
               for item in not_found)
    assert store.get(ref) is not None  # no wrong call deleted anything

    assert _label(base, ref, "NV", reviewer="dr_ana").status_code == 201
    reviewed = _upload_call(base, ref, token).json()
    assert reviewed["state"] == "reviewed" and reviewed["class"]["name"] == BY_CODE["NV"].name
    assert BY_CODE["NV"].name in reviewed["message"] and reviewed["disclaimer"] == DISCLAIMER
    assert _label(base, ref, "MEL", reviewer="dr_ben").status_code == 201  # 1:1 - back in the queue
    tie = _upload_call(base, ref, token).json()
    assert (tie["state"], tie["reason"], tie["reviewers"]) == ("waiting_for_review", "tie", 2)
    assert _label(base, other["upload_id"], NOT_A_LESION).status_code == 201
    unusable = _upload_call(base, other["upload_id"], other["lookup_token"]).json()
    assert (unusable["state"], unusable["reason"]) == ("not_reviewable", "not_a_lesion")

    store.mark_exported([ref])  # as `dermaid labels-export` does for the uploads it writes
    deleted = _upload_call(base, ref, token, "DELETE")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted"] is True and deleted.json()["labels_removed"] == 2
    assert deleted.json()["exported"] and "training dataset" in deleted.json()["message"]
    assert store.get(ref) is None and not (Path(storage) / "blobs" / ref).exists()
    with pytest.raises(DermaidError, match="no such upload"):
        LabelStore(store).history(ref)
    assert _upload_call(base, ref, token).status_code == 404
    assert _upload_call(base, ref, token, "DELETE").status_code == 404
    assert requests.get(f"{base}/v1/review/uploads/{ref}", headers=_auth(), timeout=10).status_code == 404
    gone = _upload_call(base, other["upload_id"], other["lookup_token"], "DELETE").json()
    assert gone["exported"] is None and "training dataset" not in gone["message"]

    privacy = requests.get(f"{base}/v1/privacy", timeout=10).json()
    assert privacy["retention_days"] is None and "until you delete it" in privacy["how_long"]
    paths = requests.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    assert {"get", "delete"} <= set(paths["/v1/uploads/{ref}"]) and "/v1/privacy" in paths


def test_browser_consumer_page_shows_the_key_once_then_checks_and_deletes(app, browser, tmp_path):
    from playwright.sync_api import expect

    from dermaid.uploads.store import UploadStore

    base = app["base"]
    errors: list[str] = []
    urls: list[str] = []
    page = browser.new_page(viewport=PHONE)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: urls.append(request.url))
    page.goto(f"{base}/")
    expect(page.locator("#retention")).to_have_text("until you delete it (this server deletes nothing automatically)")
    expect(page.locator("#privacy")).to_contain_text("hidden file information")
    before = "(a, b) => !!(document.getElementById(a).compareDocumentPosition(document.getElementById(b)) & 4)"
    assert page.evaluate(f"() => ({before})('privacy', 'consent')")  # the note comes before the consent box

    photo = tmp_path / "spot.jpg"
    photo.write_bytes(_gps_jpeg(1400))
    page.set_input_files("#choose", str(photo))
    page.check("#consent")
    page.click("#submit")
    expect(page.locator("#reference-key")).to_be_visible(timeout=60_000)
    expect(page.locator("#reference")).to_contain_text("shown only this once")
    ref, key = page.locator("#reference-id").text_content(), page.locator("#reference-key").text_content()
    store = UploadStore(app["storage"])
    assert store.holds_token(ref, key)

    page.fill("#lookup-ref", ref)
    page.fill("#lookup-key", create_token())
    page.click("#lookup-check")
    expect(page.locator("#lookup-error")).to_contain_text("No photo matches this reference and secret key")
    page.fill("#lookup-key", key)
    page.click("#lookup-check")
    expect(page.locator("#lookup-state")).to_have_text("Waiting for review")
    expect(page.locator("#lookup-error")).to_be_hidden()
    assert _label(base, ref, "NV", reviewer="dr_ana").status_code == 201
    page.click("#lookup-check")
    expect(page.locator("#lookup-state")).to_have_text(f"Reviewed: {BY_CODE['NV'].name}")
    expect(page.locator("#lookup-disclaimer")).to_have_text(DISCLAIMER)

    page.once("dialog", lambda dialog: dialog.dismiss())  # "cancel": nothing is deleted
    page.click("#lookup-delete")
    page.wait_for_timeout(500)
    assert store.get(ref) is not None
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#lookup-delete")
    expect(page.locator("#lookup-state")).to_have_text("Deleted")
    expect(page.locator("#lookup-message")).to_contain_text("have been deleted")
    assert store.get(ref) is None and not (Path(app["storage"]) / "blobs" / ref).exists()
    page.fill("#lookup-key", key)
    page.click("#lookup-check")
    expect(page.locator("#lookup-error")).to_contain_text("No photo matches")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=str(tmp_path / "consumer-lookup.png"), full_page=True)
    assert not any(key in url for url in urls)  # the key travels in a header only
    assert not errors, errors
