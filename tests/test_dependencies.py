"""Dependencies say what was tested: every import is declared, constraints.txt pins what was tested.

- Every third-party module imported in dermaid/, serve/ and notebooks/ comes from a distribution in
  pyproject's `dependencies`; tests/ and benchmarks/ may also use the `dev` extra.
- constraints.txt holds exact pins only, pins every declared distribution, and each pin lies inside
  pyproject's range for it (a floor no tested version meets is a floor nobody tested).
- The three install paths (Makefile setup, environment.yml, cluster/Dockerfile) read constraints.txt.

Fast: reads files, starts nothing.

    .venv/bin/python -m pytest tests/test_dependencies.py -q
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CONSTRAINTS = REPO / "constraints.txt"
FIRST_PARTY = {"dermaid", "serve", "tests", "benchmarks"} | {
    p.stem for folder in ("tests", "benchmarks") for p in (REPO / folder).glob("*.py")
}


@functools.cache
def _module_to_dists() -> dict[str, set[str]]:
    """Top-level module -> canonical names of the installed distributions that provide it."""
    return {module: {canonicalize_name(d) for d in dists}
            for module, dists in importlib.metadata.packages_distributions().items()}


def _declared(*groups: str) -> set[str]:
    """Canonical distribution names in `dependencies` ("core") and the named extras."""
    requirements = [r for g in groups for r in (PYPROJECT["dependencies"] if g == "core"
                                                 else PYPROJECT["optional-dependencies"][g])]
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _sources(folder: str) -> Iterator[tuple[Path, str]]:
    """(file, Python source) for each .py file and each notebook code cell (magics dropped) under folder."""
    for path in sorted((REPO / folder).rglob("*")):
        if path.suffix == ".py":
            yield path, path.read_text()
        elif path.suffix == ".ipynb" and ".ipynb_checkpoints" not in path.parts:
            for cell in json.loads(path.read_text())["cells"]:
                if cell["cell_type"] == "code":
                    lines = "".join(cell["source"]).splitlines()
                    yield path, "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def _third_party_imports(folder: str) -> dict[str, set[str]]:
    """Top-level module -> files importing it, for absolute imports of neither stdlib nor this repo."""
    found: dict[str, set[str]] = {}
    for path, source in _sources(folder):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _undeclared(folders: tuple[str, ...], allowed: set[str]) -> list[str]:
    problems = []
    for folder in folders:
        for module, files in sorted(_third_party_imports(folder).items()):
            dists = _module_to_dists().get(module, set())
            if not dists & allowed:
                where = ", ".join(sorted(files)[:3])
                source = sorted(dists) or "no installed distribution"
                problems.append(f"`import {module}` ({where}) comes from {source}")
    return problems


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s=;]+)", line.strip())
            assert match, f"constraints.txt: {line!r} is not an exact `name==version` pin"
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_package_and_notebook_imports_are_core_dependencies():
    problems = _undeclared(("dermaid", "serve", "notebooks"), _declared("core"))
    assert not problems, "declare these in pyproject's dependencies:\n" + "\n".join(problems)


def test_test_and_benchmark_imports_are_declared():
    problems = _undeclared(("tests", "benchmarks"), _declared("core", "dev"))
    assert not problems, "declare these in pyproject (dependencies or the dev extra):\n" + "\n".join(problems)


def test_constraints_pin_every_declared_distribution_inside_its_range():
    pins = _pins()
    requirements = [*PYPROJECT["dependencies"], *(r for extra in PYPROJECT["optional-dependencies"].values()
                                                  for r in extra)]
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name} (pyproject: {text!r})"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"pyproject admits {text!r} but the tested version is {req.name}=={pins[name]}"
        )
    assert "dermaid" not in pins, "constraints.txt pins the project itself"


def test_constraints_pin_the_ray_these_tests_run_on():
    installed = importlib.metadata.version("ray")
    assert _pins()["ray"] == installed, f"Ray {installed} is installed: refresh constraints.txt after a tested upgrade"


def test_every_install_path_reads_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS := constraints\.txt$", makefile, re.M)
    assert re.search(r"^\$\(STAMP\):.*\$\(CONSTRAINTS\)", makefile, re.M), "setup must rerun when the pins change"
    extras = ",".join(PYPROJECT["optional-dependencies"])
    assert f'-e ".[{extras}]"' in makefile, f"make setup installs every extra ({extras})"
    assert re.search(r"pip install -c \S*constraints\.txt -e", makefile)

    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)
    assert "pip install -c constraints.txt" in dockerfile

    environment = (REPO / "environment.yml").read_text()
    assert re.search(r'^\s*- "-c constraints\.txt"', environment, re.M)


@pytest.mark.parametrize("module", ["isic_challenge_scoring", "psycopg2", "jupyterlab"])
def test_optional_packages_stay_out_of_the_core(module: str):
    """Test-only, database-driver and notebook-server packages live in extras, not in every install."""
    dists = _module_to_dists().get(module, {canonicalize_name(module)})
    assert not dists & _declared("core"), f"{sorted(dists)} belongs in an extra (dev, postgres, lab)"


def test_the_serving_front_starts_without_the_heavy_imports():
    """Cold start (issue #21 item 7): the launcher, the app's build and the Ingress replica import no torch or timm
    (only the model replicas need them), and no Ray process builds rfc3987-syntax's grammar (constraints.txt's
    jsonschema note). Each costs about a second or more of CPU per process on a 2-core machine."""
    import subprocess

    code = ("import sys, ray, serve.app, serve.launcher, serve.ingress, dermaid.inference, dermaid.models.card; "
            "from dermaid.inference import build_result, CAM_METHODS, ImageShapeError, OVERLAY_MAX_SIDE; "
            "print(sorted(m for m in ('torch', 'timm', 'rfc3987_syntax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_lazy_inference_package_names_every_export():
    """dermaid.inference loads its names on first use: each name in __all__ resolves, and only those do."""
    import dermaid.inference as inference

    assert sorted(inference.__all__) == sorted([*inference._HOME, "model_version"])
    assert all(getattr(inference, name) is not None for name in inference.__all__)
    with pytest.raises(AttributeError):
        inference.NotAName  # noqa: B018 - the lookup is the test
