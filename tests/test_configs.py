"""Every primary config in conf/ composes; the `dermaid` command answers --help and --cfg job."""

from __future__ import annotations

import sys

import pytest
from omegaconf import OmegaConf

from dermaid.cli import COMMANDS
from dermaid.config import compose, conf_dir

PRIMARY_CONFIGS = sorted(p.stem for p in conf_dir().glob("*.yaml"))


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


def test_cli_help_and_cfg_job(tmp_path, dermaid_cli):
    top = dermaid_cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "prepare" in top.stdout and "synth" in top.stdout
    synth = dermaid_cli("synth", "--help", cwd=tmp_path)
    assert synth.returncode == 0 and "'n': 600" in synth.stdout and "out:" in synth.stdout
    job = dermaid_cli("prepare", "--cfg", "job", "data.image_size=128", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    cfg = OmegaConf.create(job.stdout)
    assert cfg.data.image_size == 128 and cfg.data.layout == "isic2019"
    bad = dermaid_cli("nonsense", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


@pytest.mark.parametrize("command, key", [("serve", "checkpoint"), ("evaluate", "checkpoint"),
                                          ("export", "checkpoint"), ("quantize", "checkpoint"),
                                          ("distill", "teacher")])
def test_missing_mandatory_key_is_one_line(command, key, tmp_path, monkeypatch, capsys):
    """Any `???` key left unset: one `error: KEY= is required (...)` line and status 2, no traceback, no Ray."""
    from dermaid.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DERMAID_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv for Hydra
    with pytest.raises(SystemExit) as info:
        main([command])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}= is required (") and "checkpoint" in err, err
    assert "Traceback" not in err and "MissingMandatoryValue" not in err and len(err.strip().splitlines()) == 1


def test_hydra_names_each_job_after_its_command(dermaid_cli, tmp_path):
    """Hydra's output folder is outputs/<command>/... whichever module holds the command."""
    for command in ("train", "tune", "serve", "labels-export", "report", "export"):
        shown = dermaid_cli(command, "--cfg", "hydra", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert OmegaConf.create(shown.stdout).hydra.job.name == command


def test_hydra_settings_and_ray_keys_live_in_one_place():
    """Hydra's output folder comes from conf/hydra/ (no primary config repeats it); Ray is reached through
    `ray.address` / `ray.num_cpus` in every config that starts Ray."""
    for name in PRIMARY_CONFIGS:
        raw = OmegaConf.to_container(OmegaConf.load(conf_dir() / f"{name}.yaml"))
        assert "hydra" not in raw, f"conf/{name}.yaml repeats the hydra block; list `- hydra: default` instead"
        defaults = [next(iter(e)) if isinstance(e, dict) else e for e in raw.get("defaults", [])]
        assert "hydra" in defaults or set(defaults) & {"train", "pipeline"}, f"conf/{name}.yaml lacks the hydra group"
    for path in conf_dir().rglob("*.yaml"):
        assert "ray_address" not in path.read_text(), path
    for name in ("prepare", "train", "tune", "pipeline", "serve"):
        overrides = ["hparams_search=toy"] if name == "tune" else []
        assert set(compose(name, overrides).ray) == {"address", "num_cpus"}, name


@pytest.mark.parametrize("name", ["synth", "prepare", "evaluate"])
def test_data_commands_take_the_toy_experiment(name):
    data = compose(name, ["experiment=toy", "paths.root=/home"]).data
    assert (data.root, data.image_size, data.tag) == ("/home/data/toy", 128, "toy")
