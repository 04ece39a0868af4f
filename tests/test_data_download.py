"""`dermaid download` against a real HTTP server on loopback: resume after a dropped connection,
size and checksum checks, unpacking into the ISIC 2019 layout (local and memory:// targets)."""

from __future__ import annotations

import hashlib
import io
import threading
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
    """Serves bytes by path with HTTP Range support; can cut the first response short."""

    def __init__(self, files: dict[str, bytes], drop_first_after: dict[str, int] | None = None):
        self.files = files
        self.drop = dict(drop_first_after or {})
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = server.drop.pop(name, None)
                if cut is not None:  # send part of the body, then drop the connection
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

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


def test_unreachable_server_is_a_clear_error(tmp_path):
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
