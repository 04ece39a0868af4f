"""The end-to-end demo on toy data: `dermaid synth`, then the pipeline's own steps, then `dermaid serve`.

    make demo
    python -m dermaid.demo                      # everything under ./data, ./runs, ./reports
    python -m dermaid.demo paths.root=/tmp/demo # another base directory (paths.* overrides only)

Its settings are conf/demo.yaml: the pipeline config with `experiment=toy` plus where the demo writes.
synth (~600 toy images in the ISIC 2019 layout at data.root, skipped when the same set is already
there) -> prepare (dermaid.pipeline.prepare_data: shorter side 128 px, tagged `toy`) -> train
(dermaid.pipeline.train_model: 2 Ray workers, demo.run_dir = runs/toy; an existing run there is resumed,
so a finished one is re-used) -> calibrate (dermaid.pipeline.calibrate_model: OOD detectors, abstention
threshold and triage cut-off from the validation fold, into the best checkpoint) -> evaluate (dermaid.pipeline.evaluate_model: the best checkpoint on the
held-out test part, metrics table) -> report (dermaid.pipeline.write_report: EDA and training reports
under reports/, their HTML paths printed) -> serve (the toy model at http://127.0.0.1:8000 until Ctrl-C,
with example curl commands; with `DEMO_SERVE=0`, one held-out toy image classified in-process and its
saliency PNG written instead). Each step is a function of one shared state dict and reads what earlier
steps left there (`config`, `version_url`, `manifest`, `run_dir`, ...).

The toy images are synthetic drawings, not real lesions; DermAID gives decision support only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from dermaid import pipeline
from dermaid.classes import DISCLAIMER
from dermaid.config import compose, to_plain
from dermaid.errors import DermaidError

State = dict[str, Any]


def step_synth(state: State) -> None:
    """`dermaid synth experiment=toy` into the toy experiment's data.root (re-used when already there)."""
    from dermaid.data.synth import generate

    cfg = compose("synth", [*state["overrides"], "experiment=toy"])
    summary = generate(state["config"]["data"]["root"], n=int(cfg.n), seed=int(cfg.seed), quality=int(cfg.quality),
                       workers=int(cfg.workers))
    what = "re-used" if summary["reused"] else f"generated in {summary['seconds']} s"
    print(f"[synth] {summary['n']} toy images (synthetic drawings, not real lesions) at {summary['out']} ({what})")


def step_prepare(state: State) -> None:
    """The pipeline's prepare step: the toy set as a tagged dataset version (cheap when nothing changed)."""
    from dermaid.data.loading import read_manifest

    state["version_url"] = pipeline.prepare_data(state["config"])
    state["config"] = pipeline.with_version(state["config"], state["version_url"])
    manifest = state["manifest"] = read_manifest(state["version_url"])
    print(f"[prepare] dataset version {manifest['version']} (tag {state['config']['data']['tag']!r}): "
          f"{state['version_url']}")
    print("[prepare] images per class: " + ", ".join(f"{c}={n}" for c, n in manifest["counts"]["class"].items()))


def step_train(state: State) -> None:
    """The pipeline's train step (`dermaid train experiment=toy`): 2 Ray workers, demo.run_dir (resumed when there)."""
    summary = pipeline.train_model(state["config"], state["config"]["demo"]["run_dir"])
    state["trained"] = summary
    state["run_dir"] = summary["run_dir"]
    best = summary["best_metrics"]
    print(f"[train] {summary['out']}: best epoch {summary['best_epoch']} of {summary['last_epoch']}, "
          f"val/balanced_accuracy {best.get('val/balanced_accuracy', float('nan')):.3f}, "
          f"val/auc_macro {best.get('val/auc_macro', float('nan')):.3f}, temperature {summary['temperature']:.2f}")


def step_calibrate(state: State) -> None:
    """The pipeline's calibrate step: OOD detectors, the abstention threshold and the triage cut-off from the
    validation fold, stored with the best checkpoint (the served model then abstains on non-lesion photos)."""
    result = pipeline.calibrate_model(state["config"], state["trained"]["checkpoint"])
    ood, triage = result["ood"], result["triage"]
    print(f"[calibrate] abstain above {ood['method']} score {ood['threshold']:.3g} (refuses {ood['refuse_share']:.0%} "
          f"of validation lesions); see-a-doctor-soon cut-off {triage['cutoff']:.3f} (validation sensitivity "
          f"{triage['sensitivity']:.2f}, specificity {triage['specificity']:.2f})")


def step_evaluate(state: State) -> None:
    """The pipeline's evaluate step: the best checkpoint on the held-out test part, predictions.csv, metrics.json."""
    from dermaid.evaluation.metrics import format_metrics_table
    from dermaid.files import absolute_url

    out = absolute_url(state["config"]["demo"]["eval_dir"])
    result = pipeline.evaluate_model(state["config"], state["trained"]["checkpoint"], out)
    state["eval_dir"] = out
    state["eval_metrics"] = result["metrics"]
    print(f"[evaluate] {result['num_images']} held-out test images -> {out}/predictions.csv, metrics.json")
    print(format_metrics_table(result["metrics"]))


def step_report(state: State) -> None:
    """The pipeline's report step for each of pipeline.reports (eda, train-report): executed notebook, HTML and
    key_figures.json under reports/ (the same path as the CLI)."""
    from dermaid.files import join
    from dermaid.reporting.runner import HTML_FILE

    state["reports"] = {}
    for name in state["config"]["pipeline"]["reports"]:
        folder = pipeline.write_report(state["config"], name, state["trained"])
        state["reports"][name] = folder
        print(f"[report] {name}: {join(folder, HTML_FILE)}")


def _demo_image(state: State) -> tuple[str, dict[str, Any]]:
    """A held-out toy image (its raw file URL) and its metadata, for the serve step's examples."""
    from dermaid.classes import is_missing
    from dermaid.data.isic import ISIC2019_INPUT_DIR
    from dermaid.data.loading import load_records
    from dermaid.files import get_fs, join

    record = load_records(state["version_url"], split="test", with_images=False).iloc[0]
    fs, path = get_fs(join(state["config"]["data"]["root"], ISIC2019_INPUT_DIR))
    (name,) = [p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].split(".")[0] == record["image_id"]]
    meta = {"age": None if is_missing(record["age"]) else float(record["age"]),
            "sex": record["sex"], "site": record["site"]}
    return name, meta


def step_serve(state: State) -> None:
    """Serve the toy model at http://127.0.0.1:8000 until Ctrl-C (example curl commands printed). With
    DEMO_SERVE=0: classify one held-out toy image in-process, write its saliency PNG, print both, return."""
    import os

    from dermaid.auth import create_token, hash_token

    checkpoint = state["trained"]["checkpoint"]
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
    _classify_in_process(state, cfg, checkpoint, image, meta)


def _scored(predictor, cfg, data: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    """One image scored as the served app scores it: probabilities, OOD decision, the card's triage cut-off."""
    from dermaid.inference import build_result

    batch = predictor.predict_full([(data, meta.get("age"), meta.get("sex"), meta.get("site"))])
    ood = {} if batch.ood_scores is None else {"ood_score": batch.ood_scores[0], "abstain": batch.abstain[0]}
    return build_result(batch.probabilities[0], list(cfg.malignant_codes), dict(cfg.triage),
                        operating_point=predictor.card.triage, **ood)


def _classify_in_process(state: State, cfg, checkpoint: str, image: str, meta: dict[str, Any]) -> None:
    """DEMO_SERVE=0: a held-out toy image classified and explained in-process, and a photo of a document refused."""
    from dermaid.data.synth_ood import iter_ood_images
    from dermaid.files import read_bytes, write_bytes
    from dermaid.inference import Explainer, Predictor, saliency_png
    from dermaid.models.card import float_weights_for

    predictor = Predictor(checkpoint)
    data = read_bytes(image)
    result = _scored(predictor, cfg, data, meta)
    print(f"[serve] DEMO_SERVE=0: {image} (age {meta['age']}, sex {meta['sex']}, site {meta['site']})")
    for row in result["probabilities"][:3]:
        print(f"[serve]   {row['code']:<5} {row['name']:<26} {row['probability']:.3f}")
    if result.get("abstain"):
        print(f"[serve] abstained (OOD score {result['ood_score']:.3g}): {result['message']}")
    else:
        print(f"[serve] malignancy score {result['malignancy_score']:.3f} ({result['triage']['level']}): "
              f"{result['triage']['message']}")
    _, document = next(iter_ood_images(1, seed=0, kinds=("document",)))
    refused = _scored(predictor, cfg, document, {})
    print(f"[serve] a photo of a document: abstain={refused.get('abstain')} (OOD score "
          f"{refused.get('ood_score') or float('nan'):.3g}) {refused.get('message') or ''}")
    weights = float_weights_for(checkpoint)  # Grad-CAM needs float weights: a compressed model's source
    explainer = Explainer(predictor if weights == checkpoint else Predictor(weights))
    saliency = explainer.explain(data, meta["age"], meta["sex"], meta["site"])
    out = state["config"]["demo"]["saliency_png"]
    write_bytes(out, saliency_png(saliency, predictor.version))
    state["saliency_png"] = out
    state["serve_result"] = result
    print(f"[serve] Grad-CAM ({saliency.layer}) for {saliency.target} ({saliency.probability:.3f}) -> {out}")
    print(f"[serve] {DISCLAIMER}")


STEPS: list[Callable[[State], None]] = [step_synth, step_prepare, step_train, step_calibrate, step_evaluate,
                                        step_report, step_serve]


def run_demo(overrides: list[str] | None = None, steps: list[Callable[[State], None]] | None = None) -> State:
    """Run the steps in order; returns the final state."""
    paths_only = [o for o in (overrides or []) if o.startswith("paths.")]
    state: State = {"overrides": paths_only, "config": to_plain(compose("demo", paths_only))}
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
