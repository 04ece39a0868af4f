"""The end-to-end demo on toy data: a list of steps, each a function of one shared state dict.

    make demo
    python -m dermaid.demo                      # everything under ./data, ./runs, ./reports
    python -m dermaid.demo paths.root=/tmp/demo # another base directory (paths.* overrides only)

Steps so far: synth (~600 toy images in the ISIC 2019 layout under data/toy, skipped when the
same n/seed is already there) -> prepare (shorter side 128 px, the toy experiment's size, tagged
`toy`) -> train (`experiment=toy`, 2 Ray workers, runs/toy; an existing run there is resumed, so
a finished one is re-used) -> evaluate (best checkpoint on the held-out test part, metrics table)
-> report (EDA and training reports under reports/, their HTML paths printed)
-> serve (the toy model at http://127.0.0.1:8000 until Ctrl-C, with example curl commands; with
`DEMO_SERVE=0`, one held-out toy image classified in-process and its saliency PNG written instead).
Later steps append themselves to STEPS and read what
earlier steps left in the state (`toy_root`, `prepared_dir`, `version_url`, `manifest`, ...).

The toy images are synthetic drawings, not real lesions; DermAID gives decision support only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from dermaid.classes import DISCLAIMER
from dermaid.config import compose, to_plain
from dermaid.errors import DermaidError

DEMO_N = 600  # the toy experiment's size: every class in every validation fold
DEMO_SEED = 0  # fixed: the same toy set and the same prepared version on every run
DEMO_IMAGE_SIZE = 128  # the toy experiment's prepared size (conf/experiment/toy.yaml data.image_size)
DEMO_TAG = "toy"  # tag of the prepared toy version (conf/experiment/toy.yaml data.tag)

State = dict[str, Any]


def step_synth(state: State) -> None:
    """Generate the toy set in the ISIC 2019 layout (re-used when already there)."""
    from dermaid.data.synth import generate

    cfg = compose("synth", [*state["overrides"], f"n={DEMO_N}", f"seed={DEMO_SEED}"])
    summary = generate(str(cfg.out), n=int(cfg.n), seed=int(cfg.seed), quality=int(cfg.quality),
                       workers=int(cfg.workers))
    state["toy_root"] = summary["out"]
    what = "re-used" if summary["reused"] else f"generated in {summary['seconds']} s"
    print(f"[synth] {summary['n']} toy images (synthetic drawings, not real lesions) at {summary['out']} ({what})")


def step_prepare(state: State) -> None:
    """Prepare the toy set into a tagged dataset version (cheap when nothing changed)."""
    from dermaid.data.prepare import prepare_dataset
    from dermaid.files import absolute_url, join

    cfg = compose("prepare", [*state["overrides"], f"data.root={state['toy_root']}",
                              f"data.image_size={DEMO_IMAGE_SIZE}", f"tag={DEMO_TAG}"])
    manifest = prepare_dataset(to_plain(cfg.data), out=str(cfg.out), tag=str(cfg.tag),
                               ray_address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    state["prepared_dir"] = absolute_url(str(cfg.out))
    state["version_url"] = join(state["prepared_dir"], manifest["version"])
    state["manifest"] = manifest
    print(f"[prepare] dataset version {manifest['version']} (tag {DEMO_TAG!r}): {state['version_url']}")
    print("[prepare] images per class: " + ", ".join(f"{c}={n}" for c, n in manifest["counts"]["class"].items()))


def step_train(state: State) -> None:
    """`dermaid train experiment=toy` on the prepared toy version: 2 Ray workers, runs/toy (resumed when there)."""
    from dermaid.training.train import train

    version = state["version_url"].rstrip("/").rsplit("/", 1)[-1]
    cfg = compose("train", [*state["overrides"], "experiment=toy", f"data.prepared_dir={state['prepared_dir']}",
                            f"data.version={version}", f"out={DEMO_RUN_DIR}"])
    summary = train(cfg)
    state["run_dir"] = summary["out"]
    state["train_summary"] = summary
    best = summary["best_metrics"]
    print(f"[train] {summary['out']}: best epoch {summary['best_epoch']} of {summary['last_epoch']}, "
          f"val/balanced_accuracy {best.get('val/balanced_accuracy', float('nan')):.3f}, "
          f"val/auc_macro {best.get('val/auc_macro', float('nan')):.3f}, temperature {summary['temperature']:.2f}")


def step_evaluate(state: State) -> None:
    """`dermaid evaluate` of the best checkpoint on the held-out test part: predictions.csv, metrics.json, table."""
    from dermaid.evaluation.evaluate import evaluate
    from dermaid.evaluation.metrics import format_metrics_table
    from dermaid.files import join

    version = state["version_url"].rstrip("/").rsplit("/", 1)[-1]
    out = join(state["run_dir"], "eval-test")
    cfg = compose("evaluate", [*state["overrides"], f"checkpoint={join(state['run_dir'], 'best')}",
                               f"data.prepared_dir={state['prepared_dir']}", f"data.version={version}",
                               "split=test", f"out={out}"])
    result = evaluate(cfg)
    state["eval_dir"] = out
    state["eval_metrics"] = result["metrics"]
    print(f"[evaluate] {result['num_images']} held-out test images -> {out}/predictions.csv, metrics.json")
    print(format_metrics_table(result["metrics"]))


DEMO_RUN_DIR = "${paths.runs_dir}/toy"  # the demo's training run (notebooks and reports read it there)

def step_report(state: State) -> None:
    """`dermaid report eda` of the toy set and `dermaid report train-report` of the run: executed notebook,
    HTML and key_figures.json under reports/ (the same path as the CLI)."""
    from dermaid.reporting.runner import HTML_FILE, build_report_from_config
    from dermaid.files import join

    state["reports"] = {}
    for name, params in (("eda", {"data_root": state["toy_root"]}), ("train-report", {"run_dir": state["run_dir"]})):
        cfg = compose("report", [*state["overrides"], f"name={name}",
                                 *[f"++params.{key}='{value}'" for key, value in params.items()]])  # quoted path
        folder = build_report_from_config(cfg)
        state["reports"][name] = folder
        print(f"[report] {name}: {join(folder, HTML_FILE)}")


def _demo_image(state: State) -> tuple[str, dict[str, Any]]:
    """A held-out toy image (its raw file URL) and its metadata, for the serve step's examples."""
    import math

    from dermaid.data.loading import load_records
    from dermaid.files import get_fs, join

    record = load_records(state["version_url"], split="test", with_images=False).iloc[0]
    fs, path = get_fs(join(state["toy_root"], "ISIC_2019_Training_Input"))
    (name,) = [p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].split(".")[0] == record["image_id"]]
    meta = {"age": None if record["age"] is None or math.isnan(record["age"]) else float(record["age"]),
            "sex": record["sex"], "site": record["site"]}
    return name, meta


def step_serve(state: State) -> None:
    """Serve the toy model at http://127.0.0.1:8000 until Ctrl-C (example curl commands printed). With
    DEMO_SERVE=0: classify one held-out toy image in-process, write its saliency PNG, print both, return."""
    import os

    from dermaid.auth import create_token, hash_token
    from dermaid.files import join, read_bytes, write_bytes

    checkpoint = join(state["run_dir"], "best")
    token = create_token()  # a fresh demo reviewer token each run; only its hash goes into the app's config
    cfg = compose("serve", [*state["overrides"], f"checkpoint={checkpoint}",
                            f"+review.tokens.demo_reviewer={hash_token(token)}"])
    image, meta = _demo_image(state)
    if os.environ.get("DEMO_SERVE", "1") != "0":
        from serve.launcher import run as serve

        url = f"http://{cfg.host}:{cfg.port}"
        print(f"[serve] {checkpoint} at {url} (Ctrl-C stops; DEMO_SERVE=0 skips serving)")
        print(f"[serve] web page {url}/ ; dermatologist review {url}/review with the demo reviewer token {token}")
        serve(cfg, example_image=image, reviewer_token=token)
        return
    from dermaid.inference import Explainer, Predictor, build_result, saliency_png
    from dermaid.models.card import float_weights_for

    predictor = Predictor(checkpoint)
    data = read_bytes(image)
    probabilities = predictor.predict([(data, meta["age"], meta["sex"], meta["site"])])[0]
    result = build_result(probabilities, list(cfg.malignant_codes), dict(cfg.triage))  # as the served app scores it
    print(f"[serve] DEMO_SERVE=0: {image} (age {meta['age']}, sex {meta['sex']}, site {meta['site']})")
    for row in result["probabilities"][:3]:
        print(f"[serve]   {row['code']:<5} {row['name']:<26} {row['probability']:.3f}")
    print(f"[serve] malignancy score {result['malignancy_score']:.3f} ({result['triage']['level']}): "
          f"{result['triage']['message']}")
    weights = float_weights_for(checkpoint)  # Grad-CAM needs float weights: a compressed model's source
    explainer = Explainer(predictor if weights == checkpoint else Predictor(weights))
    saliency = explainer.explain(data, meta["age"], meta["sex"], meta["site"])
    out = join(str(cfg.paths.reports_dir), "demo-saliency.png")
    write_bytes(out, saliency_png(saliency, predictor.version))
    state["saliency_png"] = out
    state["serve_result"] = result
    print(f"[serve] Grad-CAM ({saliency.layer}) for {saliency.target} ({saliency.probability:.3f}) -> {out}")
    print(f"[serve] {DISCLAIMER}")


STEPS: list[Callable[[State], None]] = [step_synth, step_prepare, step_train, step_evaluate, step_report,
                                        step_serve]


def run_demo(overrides: list[str] | None = None, steps: list[Callable[[State], None]] | None = None) -> State:
    """Run the steps in order; returns the final state."""
    state: State = {"overrides": [o for o in (overrides or []) if o.startswith("paths.")]}
    for step in steps or STEPS:
        start = time.perf_counter()
        step(state)
        state.setdefault("seconds", {})[step.__name__] = round(time.perf_counter() - start, 1)
    return state


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ignored = [a for a in argv if not a.startswith("paths.")]
    if ignored:
        print(f"error: the demo takes only paths.* overrides, got {ignored}", file=sys.stderr)
        sys.exit(2)
    print(DISCLAIMER)
    try:
        state = run_demo(argv)
    except DermaidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("[demo] done: " + ", ".join(f"{k} {v} s" for k, v in state["seconds"].items()))


if __name__ == "__main__":
    main()
