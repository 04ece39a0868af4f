"""Every primary config in conf/ composes; the `dermaid` command answers --help and --cfg job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dermaid.cli import COMMANDS
from dermaid.config import compose, conf_dir

PRIMARY_CONFIGS = sorted(p.stem for p in conf_dir().glob("*.yaml"))


def _dermaid(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermaid.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd)


def _required_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _required_keys(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in _required_keys(value, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


@pytest.mark.parametrize("name", PRIMARY_CONFIGS)
def test_primary_config_composes(name):
    cfg = compose(name)
    for key in _required_keys(OmegaConf.to_container(cfg, resolve=False)):  # `???`: the user's to give
        OmegaConf.update(cfg, key, "REQUIRED", force_add=True)
    plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert isinstance(plain, dict) and plain
    if name in COMMANDS:
        assert "paths" in cfg, f"conf/{name}.yaml should include the paths group"


def test_data_group_options_compose():
    for option in sorted(p.stem for p in (conf_dir() / "data").glob("*.yaml")):
        data = OmegaConf.to_container(compose("prepare", [f"data={option}"]).data, resolve=True)
        assert data["layout"] in ("isic2019", "ham10000")
        assert data["version"] is None and data["extra"] == [] and data["image_size"] >= 64


def test_cli_help_and_cfg_job(tmp_path):
    top = _dermaid("--help", cwd=tmp_path)
    assert top.returncode == 0 and "prepare" in top.stdout and "synth" in top.stdout
    synth = _dermaid("synth", "--help", cwd=tmp_path)
    assert synth.returncode == 0 and "'n': 600" in synth.stdout and "out:" in synth.stdout
    job = _dermaid("prepare", "--cfg", "job", "data.image_size=128", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    cfg = OmegaConf.create(job.stdout)
    assert cfg.data.image_size == 128 and cfg.data.layout == "isic2019"
    bad = _dermaid("nonsense", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
