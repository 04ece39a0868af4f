"""Notebook reports: execute a parameterized notebook with papermill, export HTML, keep key figures.

    dermaid report eda data.root=data/toy
    dermaid report train-report run_dir=runs/toy
    dermaid report tune-report tune_dir=runs/tune/toy
    dermaid report saliency-gallery checkpoint=runs/toy/best data.root=data/toy
    dermaid report monitoring checkpoint=runs/toy/best window_hours=24 fail_on_alert=true   # exit 1 on an alert
    dermaid report compare-runs root=runs baseline=toy              # runs side by side (dermaid.runs)
    dermaid report eda paths.reports_dir=/tmp/reports --cfg job      # show the composed config

`NAME` (eda | train-report | tune-report | saliency-gallery | compare-runs) selects conf/report/NAME.yaml: the notebook in
notebooks/ and which config values feed its parameters (`data.root` -> `data_root` ...). Keys of the
composed config (data.*, paths.*, out ...) are set as for every command; every other bare `key=value`
sets one of the notebook's own parameters (its `parameters` cell; `data_root=` too, as before). The
report lands in `${paths.reports_dir}/NAME-<timestamp>/`: `report.ipynb` (executed), `report.html`
(figures embedded as base64 PNG) and `key_figures.json` (the numbers automation reads). It is
written in a temporary folder and moved into place at the end, so a failed run never leaves a
report that looks complete; the partial notebook of a failed run is kept as `NAME-<ts>-FAILED.ipynb`.

Reports are decision-support material for research, never a diagnosis.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dermaid import files
from dermaid.config import conf_dir, is_word, to_plain
from dermaid.errors import DermaidError

KERNEL_NAME = "dermaid"  # the kernel `make lab` registers and the notebooks' kernelspec names
KERNEL_DISPLAY_NAME = "DermAID (.venv)"
FIGURES_PARAM = "key_figures_path"  # set by the runner; notebooks pass it to record_figures
NOTEBOOK_FILE = "report.ipynb"
HTML_FILE = "report.html"
FIGURES_FILE = "key_figures.json"
_PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list, tuple), "dict": (dict,),
}


def notebooks_dir() -> Path:
    """notebooks/ of the checkout ($DERMAID_NOTEBOOKS overrides, like $DERMAID_CONF for conf/)."""
    env = os.environ.get("DERMAID_NOTEBOOKS")
    return Path(env).resolve() if env else conf_dir().parent / "notebooks"


# --------------------------------------------------------------------------- command line

def report_names() -> list[str]:
    """The reports conf/report/ defines (NAME of `dermaid report NAME`)."""
    return sorted(p.stem for p in (conf_dir() / "report").glob("*.yaml"))


def hydra_args(argv: list[str]) -> list[str]:
    """`NAME key=value ...` -> Hydra overrides: `report=NAME`, the config's own keys as given, and every
    other bare `key=value` as a notebook parameter (`++params.key=value`, checked later against the notebook)."""
    own = _config_keys()
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i == 0 and is_word(arg):
            if arg not in report_names():
                raise DermaidError(f"report: unknown report {arg!r}; run `dermaid report NAME key=value ...` "
                                   f"with NAME one of {report_names()}")
            out.append(f"report={arg}")
            continue
        key = arg.split("=", 1)[0]
        if "=" in arg and not arg.startswith(("-", "+", "~")) and key.split(".")[0] not in own:
            out.append(f"++params.{arg}")
        else:
            out.append(arg)
    return out


def _config_keys() -> set[str]:
    """Top-level keys of conf/report.yaml: its own and those its defaults list brings (paths, data, report ...)."""
    raw = OmegaConf.load(conf_dir() / "report.yaml")
    keys = {str(k) for k in raw.keys() if k != "defaults"} | {"hydra"}
    for entry in raw.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            keys.add(entry.lstrip("+~").split("/")[0].split("@")[0])
        elif not isinstance(entry, str):
            keys.update(str(k).lstrip("+~").split("/")[0].split("@")[0] for k in entry.keys())
    return keys


def run(cfg: DictConfig) -> str:
    """`dermaid report`: execute the named notebook and print the report folder."""
    out = build_report_from_config(cfg)
    print(out)
    _exit_on_alerts(cfg, out)
    return out


def _exit_on_alerts(cfg: DictConfig | dict[str, Any], out: str) -> None:
    """With the parameter fail_on_alert=true (the monitoring report), exit 1 when key_figures.json lists alerts:
    the report is written first, so a scheduler that acts on the status has it to read."""
    plain = to_plain(cfg)
    if not {**(plain.get("report") or {}).get("params", {}), **plain.get("params", {})}.get("fail_on_alert"):
        return
    figures = json.loads(files.read_text(files.join(out, FIGURES_FILE)) or "{}")
    alerts = figures.get("alerts") or []
    if alerts:
        names = ", ".join(f"{a.get('feature')} ({a.get('statistic')})" for a in alerts)
        print(f"alert: {len(alerts)} alert(s) in {out}: {names}", file=sys.stderr)
        sys.exit(1)


def build_report_from_config(cfg: DictConfig | dict[str, Any]) -> str:
    """A composed `report` config (report=NAME, params, paths ...) -> the report folder URL."""
    plain = to_plain(cfg)
    spec = plain.get("report")  # absent until a report is selected (`report: null` in the defaults list)
    if not spec:
        raise DermaidError(f"report: no report named; run `dermaid report NAME key=value ...` "
                           f"with NAME one of {report_names()}")
    params = {**spec["params"], **plain["params"]}  # the command line's parameters win
    for key in [k for entry in spec["path_params"] for k in entry.split("|")]:
        if str(params.get(key) or "").startswith("registry://"):  # checkpoint=registry://NAME/production: what it names now
            from dermaid.registry import resolve_model_url

            params[key] = resolve_model_url(str(params[key]), plain["registry_root"])[0]
    return build_report(
        spec["name"],
        notebooks_dir() / spec["notebook"],
        params,
        reports_dir=plain["paths"]["reports_dir"],
        path_params=spec["path_params"],
        out=plain["out"],
        kernel_name=plain["kernel_name"],
        execution_timeout=plain["execution_timeout"],
    )


# --------------------------------------------------------------------------- the runner

def notebook_parameters(notebook: str | Path) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares: name -> {name, inferred_type_name, default, help}."""
    import papermill as pm

    logging.getLogger("papermill").setLevel(logging.WARNING)  # no "Input Notebook: ..." chatter
    if not Path(notebook).exists():
        raise DermaidError(f"report: notebook {notebook} does not exist")
    return pm.inspect_notebook(str(notebook))


def validate_parameters(notebook: str | Path, params: dict[str, Any], path_params: list[str] = (),
                        label: str | None = None) -> dict[str, Any]:
    """Reject unknown or mistyped parameters and missing paths before anything runs.

    Returns the parameters with local relative paths made absolute (the kernel may run elsewhere).
    """
    declared = notebook_parameters(notebook)
    label = label or Path(notebook).stem
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise DermaidError(
            f"report {label}: unknown parameter(s) {', '.join(unknown)}; "
            f"the notebook declares {', '.join(sorted(p for p in declared if p != FIGURES_PARAM))}"
        )
    if FIGURES_PARAM in params:
        raise DermaidError(f"report {label}: {FIGURES_PARAM} is set by the runner, not on the command line")
    checked: dict[str, Any] = {}
    for key, value in params.items():
        checked[key] = _check_type(label, key, value, declared[key]["inferred_type_name"])
    for entry in path_params:  # "a|b": the first of a, b with a non-empty value must exist
        names = entry.split("|")
        for key in names:
            if key not in declared:
                raise DermaidError(f"report {label}: config names path parameter {key!r} the notebook does not declare")
        key = next((k for k in names if checked.get(k, _literal_default(declared[k]["default"]))), names[-1])
        value = checked.get(key, _literal_default(declared[key]["default"]))
        values = value if isinstance(value, (list, tuple)) else [value]
        resolved = []
        for item in values:
            item = files.absolute_url(str(item))
            if not item or not files.exists(item):
                raise DermaidError(f"report {label}: {key}={item!r} does not exist")
            resolved.append(item)
        checked[key] = resolved if isinstance(value, (list, tuple)) else resolved[0]
    return checked


def _check_type(label: str, key: str, value: Any, type_name: str) -> Any:
    base = (type_name or "").split("[")[0].strip()
    if base not in _TYPES or value is None:
        return value
    if base == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # Hydra reads `fold=1`-like strings as numbers
    ok = isinstance(value, _TYPES[base]) and not (base in ("int", "float") and isinstance(value, bool))
    if not ok:
        raise DermaidError(f"report {label}: parameter {key}={value!r} should be {type_name}, not {type(value).__name__}")
    if base == "list":
        return list(value)
    return value


def _literal_default(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def resolve_kernel_name(requested: str | None = None) -> str:
    """A kernel that runs this interpreter: `dermaid` if registered for it, else ipykernel's `python3`.

    When neither points at this venv, register `dermaid` in sys.prefix (what `make lab` does), so a
    fresh venv needs no manual step. An explicitly requested kernel is used as given.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    if requested:
        try:
            ksm.get_kernel_spec(requested)
        except NoSuchKernel:
            names = sorted(ksm.find_kernel_specs())
            raise DermaidError(f"report: kernel {requested!r} is not installed; installed: {names}") from None
        return requested
    for name in (KERNEL_NAME, "python3"):
        try:
            spec = ksm.get_kernel_spec(name)
        except NoSuchKernel:
            continue
        if _runs_this_python(spec.argv):
            return name
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME, prefix=sys.prefix)
    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    if not _runs_this_python(spec.argv):
        raise DermaidError(
            f"report: kernel {KERNEL_NAME!r} at {spec.resource_dir} runs {spec.argv[0]}, not {sys.executable}; "
            f"remove it or pass kernel_name=..."
        )
    return KERNEL_NAME


def _runs_this_python(argv: list[str]) -> bool:
    if not argv:
        return False
    exe = argv[0]
    if exe in _PYTHON_NAMES:  # jupyter_client substitutes sys.executable for these
        return True
    return Path(exe).absolute().parent == Path(sys.executable).absolute().parent


def build_report(
    name: str,
    notebook: str | Path,
    params: dict[str, Any],
    reports_dir: str,
    path_params: list[str] = (),
    out: str | None = None,
    kernel_name: str | None = None,
    execution_timeout: int | None = None,
) -> str:
    """Execute `notebook` with `params`; write report.ipynb, report.html and key_figures.json.

    Returns the report folder URL (`reports_dir/NAME-<timestamp>` unless `out` is given).
    Raises DermaidError for bad parameters (before executing) and for a failing cell.
    """
    import papermill as pm

    params = validate_parameters(notebook, params, path_params, label=name)
    kernel = resolve_kernel_name(kernel_name)
    reports_dir = files.absolute_url(str(reports_dir))
    final = files.absolute_url(str(out)) if out else _unique_dir(reports_dir, name)
    work = Path(tempfile.mkdtemp(prefix=f"dermaid-report-{name}-"))
    try:
        executed = work / NOTEBOOK_FILE
        figures = work / FIGURES_FILE
        try:
            pm.execute_notebook(
                str(notebook), str(executed),
                parameters={**params, FIGURES_PARAM: str(figures)},
                kernel_name=kernel, progress_bar=False, log_output=False, cwd=os.getcwd(),
                start_timeout=120, execution_timeout=execution_timeout, config=_kernel_config(),
            )
        except pm.PapermillExecutionError as exc:
            kept = _keep_failed(executed, final)
            raise DermaidError(_describe_failure(name, Path(notebook).name, exc, executed, kept)) from None
        html = export_html(executed)
        # a fresh folder published in one step; on object stores report.html is copied last (the marker)
        with files.atomic_dir(final, markers=(HTML_FILE,)) as tmp:
            files.write_bytes(files.join(tmp, NOTEBOOK_FILE), executed.read_bytes())
            files.write_text(files.join(tmp, HTML_FILE), html)
            figures_json = figures.read_text() if figures.exists() else "{}\n"
            files.write_text(files.join(tmp, FIGURES_FILE), figures_json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _kernel_config():
    """Talk to the kernel over local sockets (files in the Jupyter runtime dir), not loopback TCP."""
    from traitlets.config import Config

    return Config({"KernelManager": {"transport": "ipc" if os.name == "posix" else "tcp"}})


def _unique_dir(reports_dir: str, name: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    url = files.join(reports_dir, f"{name}-{stamp}")
    n = 2
    while files.exists(url):
        url = files.join(reports_dir, f"{name}-{stamp}-{n}")
        n += 1
    return url


def _keep_failed(executed: Path, final: str) -> str | None:
    if not executed.exists():
        return None
    kept = f"{final.rstrip('/')}-FAILED.ipynb"
    try:
        files.write_bytes(kept, executed.read_bytes())
    except OSError:
        return None
    return kept


def _describe_failure(name: str, notebook_name: str, exc: Any, executed: Path, kept: str | None) -> str:
    """`report NAME failed in cell N of NB.ipynb (`first line`): Error: message; partial notebook: ...`."""
    index = exc.cell_index
    try:  # papermill inserts an `injected-parameters` cell; count cells as in the source notebook
        import nbformat

        cells = [c for c in nbformat.read(str(executed), as_version=4).cells
                 if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]  # banners added after the run
        injected = [i for i, c in enumerate(cells) if "injected-parameters" in c.metadata.get("tags", [])]
        if injected and index > injected[0]:
            index -= 1
    except Exception:  # the partial notebook is a convenience; the error itself is what matters
        pass
    first = next((line.strip() for line in str(exc.source or "").splitlines() if line.strip()), "")
    text = f"report {name} failed in cell {index} of {notebook_name} ({first[:80]!r}): {exc.ename}: {exc.evalue}"
    return text + (f"; partial notebook: {kept}" if kept else "")


# Warnings an executed report may show on stderr, each with why it is expected (a regular expression matched
# against the whole stderr text of one output). Empty: a report reads clean; anything else is a stray red box
# (tests/test_reports.py fails on it).
EXPECTED_STDERR: dict[str, str] = {}


def stray_stderr(notebook: str | Path) -> list[str]:
    """The stderr outputs of an executed notebook that EXPECTED_STDERR does not explain: `cell N: text`."""
    import re

    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    stray = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                text = str(output.get("text", ""))
                if text.strip() and not any(re.search(p, text) for p in EXPECTED_STDERR):
                    stray.append(f"cell {index}: {text.strip()[:500]}")
    return stray


def export_html(notebook: str | Path) -> str:
    """Executed notebook -> standalone HTML (figures embedded as base64 PNG)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    quiet = logging.getLogger(f"{__name__}.html")
    quiet.setLevel(logging.ERROR)  # nbconvert warns about every figure without alt text
    body, _ = HTMLExporter(embed_images=True, log=quiet).from_notebook_node(nb)
    return body


# --------------------------------------------------------------------------- notebook helpers

def record_figures(figures: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Merge key figures into the JSON file at `path` (the runner's `key_figures_path`).

    Notebooks call this once per section; with an empty path (JupyterLab) it only returns them.
    Numpy scalars become plain numbers and NaN becomes null, so the file is strict JSON.
    """
    clean = {str(k): _plain(v) for k, v in figures.items()}
    if not path:
        return clean
    current: dict[str, Any] = {}
    if files.exists(path):
        current = json.loads(files.read_text(path) or "{}")
    current.update(clean)
    files.write_text(path, json.dumps(current, indent=2, sort_keys=True) + "\n")
    return clean


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def project_path(path: str) -> str:
    """Resolve a notebook's path parameter: URLs and absolute paths as given, relative ones against
    $DERMAID_HOME (what `paths.root` uses; `make lab` sets it), else the working directory, except
    in the checkout's notebooks/ folder (JupyterLab's default), where they mean the checkout root.
    """
    if not path or "://" in path or os.path.isabs(path):
        return path
    home = os.environ.get("DERMAID_HOME")
    if home:
        return os.path.abspath(os.path.join(home, path))
    cwd = Path.cwd()
    if cwd.resolve() == notebooks_dir().resolve():
        return str(cwd.parent / path)
    return str(cwd / path)
