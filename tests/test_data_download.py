"""`dermaid download` against a real HTTP server on loopback: resume after a dropped connection,
size and checksum checks, unpacking into the ISIC 2019 layout (local and memory:// targets)."""

from __future__ import annotations

import email.utils
import hashlib
import io
import logging
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest

from dermaid.config import compose
from dermaid.data import download as download_mod
from dermaid.data.isic import read_isic2019
from dermaid.data.synth import generate
from dermaid.errors import DermaidError


class _Server:
    """A real HTTP/1.1 server on loopback serving bytes by path, with Range and If-Range as RFC 9110 says.

    validators: which validators responses carry ("etag", "last_modified", both, or none); a file's ETag is
    its content hash and its Last-Modified moves on with every replacement. honour_if_range=False: a server
    that ignores If-Range (answers 206 to any Range). script: per file, what its next requests meet, in order:
    ("status", code, headers) an error answer; ("drop", n) n body bytes, then the connection is cut;
    ("stall", s) headers, then s seconds of silence; ("replace", data[, step]) the file changes first, then is
    served (meeting `step`, if given).
    """

    def __init__(self, files: dict[str, bytes], drop_first_after: dict[str, int] | None = None,
                 script: dict[str, list[tuple]] | None = None, validators: tuple[str, ...] = ("etag", "last_modified"),
                 honour_if_range: bool = True):
        self.files = dict(files)
        self.versions = {name: 0 for name in files}
        self.script = {name: list(steps) for name, steps in (script or {}).items()}
        for name, cut in (drop_first_after or {}).items():
            self.script.setdefault(name, []).insert(0, ("drop", cut))
        self.requests: list[tuple[str, str | None]] = []
        self.if_ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _headers(self, status: int, length: int, extra: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def do_GET(self):  # noqa: N802
                name = self.path.lstrip("/")
                rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                server.requests.append((name, rng))
                server.if_ranges.append(if_range)
                step = server.script[name].pop(0) if server.script.get(name) else None
                if step and step[0] == "replace":
                    server.files[name], server.versions[name] = step[1], server.versions[name] + 1
                    step = step[2] if len(step) > 2 else None
                if step and step[0] == "status":
                    self._headers(step[1], 0, dict(step[2]) if len(step) > 2 else {})
                    return
                if name not in server.files:
                    self._headers(404, 0, {})
                    return
                data = server.files[name]
                tags = server.validators_of(name)
                headers = {"Accept-Ranges": "bytes", **{k: v for k, v in tags.items() if k in validators_sent}}
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if rng and if_range is not None and honour_if_range and if_range not in (
                        headers.get("ETag"), headers.get("Last-Modified")):
                    start, rng = 0, None  # the validator no longer matches: the whole (new) file
                if start >= len(data):
                    self._headers(416, 0, {"Content-Range": f"bytes */{len(data)}"})
                    return
                body = data[start:]
                if rng:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self._headers(206 if rng else 200, len(body), headers)
                if step and step[0] == "drop":  # send part of the body, then drop the connection
                    self.wfile.write(body[:step[1]])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if step and step[0] == "stall":
                    self.wfile.flush()
                    time.sleep(step[1])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        validators_sent = {"etag": "ETag", "last_modified": "Last-Modified"}
        validators_sent = {validators_sent[v] for v in validators}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # a short poll: shutdown() returns in 20 ms rather than serve_forever's default 0.5 s
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def validators_of(self, name: str) -> dict[str, str]:
        return {"ETag": f'"{hashlib.sha256(self.files[name]).hexdigest()[:16]}"',
                "Last-Modified": email.utils.formatdate(1_700_000_000 + 60 * self.versions[name], usegmt=True)}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def official_like(tmp_path_factory) -> dict[str, bytes]:
    """A toy set packed like the official files: the image folder zipped, the two CSVs as is."""
    root = tmp_path_factory.mktemp("dl") / "toy"
    generate(str(root), n=12, seed=4)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted((root / "ISIC_2019_Training_Input").iterdir()):
            zf.write(path, f"ISIC_2019_Training_Input/{path.name}")
    return {
        "ISIC_2019_Training_Input.zip": buf.getvalue(),
        "ISIC_2019_Training_GroundTruth.csv": (root / "ISIC_2019_Training_GroundTruth.csv").read_bytes(),
        "ISIC_2019_Training_Metadata.csv": (root / "ISIC_2019_Training_Metadata.csv").read_bytes(),
    }


def test_download_resumes_and_unpacks(official_like, tmp_path):
    archive = official_like["ISIC_2019_Training_Input.zip"]
    with _Server(official_like, drop_first_after={"ISIC_2019_Training_Input.zip": len(archive) // 3}) as server:
        cfg = compose("download", [f"datasets.isic2019.base_url={server.url}", f"out={tmp_path / 'isic'}",
                                   f"staging_dir={tmp_path / 'staging'}", f"paths.root={tmp_path}"])
        marker = download_mod.run(cfg)
    zip_requests = [r for name, r in server.requests if name == "ISIC_2019_Training_Input.zip"]
    assert zip_requests[0] is None and zip_requests[1].startswith("bytes=")  # resumed, not restarted
    assert 0 < int(zip_requests[1][6:-1]) <= len(archive) // 3
    assert marker["files"]["ISIC_2019_Training_Input.zip"]["sha256"] == hashlib.sha256(archive).hexdigest()
    records = read_isic2019(str(tmp_path / "isic"))
    assert len(records) == 12
    assert (tmp_path / "isic" / "ISIC_2019_Training_Input" / "ATTRIBUTION.txt").exists()
    assert not list((tmp_path / "staging").iterdir())  # archives and partial files cleaned up
    assert not [p for p in (tmp_path / "isic").iterdir() if p.name.startswith(".")]  # no temporary leftovers

    # a second run finds everything done and fetches nothing
    with _Server(official_like) as again:
        cfg = compose("download", [f"datasets.isic2019.base_url={again.url}", f"out={tmp_path / 'isic'}",
                                   f"staging_dir={tmp_path / 'staging'}"])
        download_mod.run(cfg)
    assert again.requests == []


def test_download_checks_size_and_checksum(official_like, tmp_path):
    name = "ISIC_2019_Training_GroundTruth.csv"
    with _Server(official_like) as server:
        spec = {"name": name, "url": f"{server.url}/{name}", "sha256": "0" * 64, "extract": False}
        out = "memory://dl-test/isic"
        with pytest.raises(DermaidError, match="sha256 mismatch"):
            download_mod.download_files([spec], out=out, staging_dir=str(tmp_path / "s"))
        with pytest.raises(DermaidError, match="the config expects 5"):
            download_mod.download_files([{**spec, "sha256": None, "size": 5}], out=out, staging_dir=str(tmp_path / "s"))
        with pytest.raises(DermaidError, match="HTTP 404"):
            download_mod.download_files([{**spec, "url": f"{server.url}/nope.csv"}], out=out,
                                        staging_dir=str(tmp_path / "s"))
        assert not fsspec.filesystem("memory").exists("/dl-test/isic/" + name)  # nothing half-written

        good = hashlib.sha256(official_like[name]).hexdigest()
        download_mod.download_files([{**spec, "sha256": good, "size": len(official_like[name])}], out=out,
                                    staging_dir=str(tmp_path / "s"))
        with fsspec.open(f"{out}/{name}", "rb") as f:
            assert f.read() == official_like[name]
    fsspec.filesystem("memory").rm("/dl-test", recursive=True)


def test_unreachable_server_is_a_clear_error(tmp_path, waits):
    with _Server({}) as server:
        url = server.url
    spec = {"name": "x.csv", "url": f"{url}/x.csv", "extract": False}  # the server is gone now
    with pytest.raises(DermaidError, match="x.csv: failed after 1 retries"):
        download_mod.download_files([spec], out=str(tmp_path / "o"), staging_dir=str(tmp_path / "s"), retries=1)


def test_unsafe_zip_member_is_refused(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.txt", b"x")
    with pytest.raises(DermaidError, match="unsafe"):
        download_mod.extract_zip(str(bad), str(tmp_path / "out"))
    assert not Path(tmp_path / "evil.txt").exists()


# ---------------------------------------------------------------------------------------------
# Retries, backoff and validators: a server that fails, throttles, stalls and changes the file mid-way


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The waits between attempts, recorded instead of slept (the server and the client are real)."""
    recorded: list[float] = []
    monkeypatch.setattr(download_mod, "_sleep", recorded.append)
    return recorded


def _fetch_one(server: _Server, name: str, tmp_path: Path, **kwargs) -> dict:
    spec = {"name": name, "url": f"{server.url}/{name}", "extract": False}
    marker = download_mod.download_files([spec], out=str(tmp_path / "out"), staging_dir=str(tmp_path / "staging"),
                                         **kwargs)
    return marker["files"][name]


CHUNK = download_mod.CHUNK_BYTES  # a drop loses the chunk being read: resumes start at a multiple of it


def test_retries_with_doubling_backoff_after_5xx_a_stall_and_a_drop(tmp_path, waits, caplog):
    data = bytes(range(256)) * 1024  # 256 KiB
    script = {"f.bin": [("status", 503), ("status", 500), ("stall", 2.0), ("drop", 100_000)]}
    with _Server({"f.bin": data}, script=script) as server:
        with caplog.at_level(logging.WARNING, logger="dermaid.data.download"):
            entry = _fetch_one(server, "f.bin", tmp_path, retries=3, timeout_s=0.5, backoff_s=0.5, backoff_max_s=1.5)
    assert (tmp_path / "out" / "f.bin").read_bytes() == data
    # 503, 500, the stall (no bytes: 3 in a row -> 0.5, 1, then capped at 1.5); the drop brought bytes: the count restarts
    assert waits == [0.5, 1.0, 1.5, 0.5]
    ranges = [r for _, r in server.requests]
    assert ranges[:4] == [None] * 4 and ranges[4] == f"bytes={CHUNK}-"  # resumed after the drop
    assert "HTTP 503" in caplog.text and "timed out" in caplog.text and "connection dropped" in caplog.text
    assert server.if_ranges[4] == server.validators_of("f.bin")["ETag"]  # ... only for the version it began with
    assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["etag"] == server.validators_of("f.bin")["ETag"]


def test_429_waits_what_retry_after_says(tmp_path, waits):
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    script = {"f.csv": [("status", 429, {"Retry-After": "7"}), ("status", 503, {"Retry-After": in_30_s})]}
    with _Server({"f.csv": b"a,b\n1,2\n"}, script=script) as server:
        _fetch_one(server, "f.csv", tmp_path, backoff_s=0.1)
    assert waits[0] == 7.0 and 25.0 <= waits[1] <= 30.0 and len(waits) == 2  # seconds, then an HTTP date

    script = {"g.csv": [("status", 429, {"Retry-After": "3600"})]}
    with _Server({"g.csv": b"x"}, script=script) as server:
        with pytest.raises(DermaidError, match=r"asks to wait 3600 s \(Retry-After\).*retry_after_max_s=600"):
            _fetch_one(server, "g.csv", tmp_path, retry_after_max_s=600)


def test_persistent_server_errors_give_up_after_the_retries(tmp_path, waits):
    with _Server({"f.csv": b"x"}, script={"f.csv": [("status", 502)] * 10}) as server:
        with pytest.raises(DermaidError, match=r"f.csv: failed after 2 retries \(HTTP 502"):
            _fetch_one(server, "f.csv", tmp_path, retries=2, backoff_s=0.1)
    assert len(server.requests) == 3 and waits == [0.1, 0.2]
    assert not (tmp_path / "out" / "f.csv").exists()


@pytest.mark.parametrize("validators", [("etag", "last_modified"), ("last_modified",)])
def test_a_file_changed_mid_way_is_fetched_again_from_the_start(tmp_path, waits, caplog, validators):
    old, new = b"old version " * 20_000, b"NEW VERSION, longer " * 20_000
    script = {"f.zip": [("drop", 100_000), ("replace", new)]}
    with _Server({"f.zip": old}, script=script, validators=validators) as server:
        first = server.validators_of("f.zip")
        with caplog.at_level(logging.WARNING, logger="dermaid.data.download"):
            entry = _fetch_one(server, "f.zip", tmp_path, backoff_s=0.1)
    # the resume asked for the rest of the version it began with; the server answered with the new file
    assert server.requests[1] == ("f.zip", f"bytes={CHUNK}-")
    assert server.if_ranges[1] == (first["ETag"] if "etag" in validators else first["Last-Modified"])
    assert (tmp_path / "out" / "f.zip").read_bytes() == new  # not old[:20000] + new[20000:]
    assert entry["sha256"] == hashlib.sha256(new).hexdigest() and entry["size"] == len(new)
    assert f"changed on the server since the first {CHUNK} bytes" in caplog.text and "starting over" in caplog.text


def test_a_server_ignoring_if_range_cannot_splice_two_versions(tmp_path, waits, caplog):
    old, new = b"a" * 200_000, b"b" * 200_000
    script = {"f.bin": [("drop", 100_000), ("replace", new)]}
    with _Server({"f.bin": old}, script=script, honour_if_range=False) as server:
        with caplog.at_level(logging.WARNING, logger="dermaid.data.download"):
            _fetch_one(server, "f.bin", tmp_path, backoff_s=0.1)
    assert [r for _, r in server.requests] == [None, f"bytes={CHUNK}-", None]  # the 206 of another ETag refused
    assert (tmp_path / "out" / "f.bin").read_bytes() == new
    assert "changed on the server (etag" in caplog.text


def test_without_a_validator_a_partial_file_is_never_resumed(tmp_path, waits, caplog):
    data = bytes(range(200)) * 1000
    with _Server({"f.bin": data}, drop_first_after={"f.bin": 100_000}, validators=()) as server:
        with caplog.at_level(logging.WARNING, logger="dermaid.data.download"):
            _fetch_one(server, "f.bin", tmp_path, backoff_s=0.1)
    assert [r for _, r in server.requests] == [None, None]  # no Range: nothing proves the bytes are the same file's
    assert (tmp_path / "out" / "f.bin").read_bytes() == data
    assert "no ETag or Last-Modified" in caplog.text and "starting over" in caplog.text


def test_a_later_run_resumes_only_the_version_it_began_with(tmp_path, waits):
    old, new = b"1" * 200_000, b"2" * 220_000
    script = {"f.bin": [("drop", 100_000)], "g.bin": [("drop", 100_000), ("replace", new)]}
    with _Server({"f.bin": old, "g.bin": old}, script=script) as server:
        with pytest.raises(DermaidError, match="run again to resume"):
            _fetch_one(server, "f.bin", tmp_path, retries=0)
        assert (tmp_path / "staging" / "f.bin.part").stat().st_size == CHUNK
        _fetch_one(server, "f.bin", tmp_path)  # the next run, the same file: resumed where it stopped
        assert server.requests[1:] == [("f.bin", f"bytes={CHUNK}-")]
        assert server.if_ranges[1] == server.validators_of("f.bin")["ETag"]
        assert (tmp_path / "out" / "f.bin").read_bytes() == old

        # a run interrupted, then the file replaced on the server before the next run: started over
        with pytest.raises(DermaidError):
            _fetch_one(server, "g.bin", tmp_path, retries=0)
        entry = _fetch_one(server, "g.bin", tmp_path)
    assert server.requests[3:] == [("g.bin", f"bytes={CHUNK}-")]  # asked If-Range: got the whole new file
    assert (tmp_path / "out" / "g.bin").read_bytes() == new and entry["sha256"] == hashlib.sha256(new).hexdigest()
    assert not list((tmp_path / "staging").iterdir())  # partial files and their validators cleaned up


def test_a_file_that_keeps_changing_is_given_up_on(tmp_path, waits):
    versions = [bytes([v]) * 200_000 for v in range(6)]
    script = {"f.bin": [("drop", 100_000)] + [("replace", v, ("drop", 100_000)) for v in versions[1:]]}
    with _Server({"f.bin": versions[0]}, script=script) as server:
        with pytest.raises(DermaidError, match="started over 3 times"):
            _fetch_one(server, "f.bin", tmp_path, retries=2, backoff_s=0.1)
    assert len(server.requests) <= 6
