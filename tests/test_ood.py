"""OOD detectors (dermaid.evaluation.ood) and the triage operating point (dermaid.evaluation.operating_point).

Synthetic Gaussian class clusters with a fixed linear head for the math; one real tiny timm model on
toy images from dermaid.data.synth for the feature path and the statistics file. Fast: no Ray.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dermaid.errors import DermaidError
from dermaid.evaluation.ood import (
    FEATURE_METHODS, METHODS, STATISTICS_FILE, check_compatible, choose_scale, choose_threshold, create_detector,
    load_statistics, normalised_unk, ood_metrics, save_statistics,
)
from dermaid.evaluation.operating_point import apply_cutoff, choose_triage_cutoff
from dermaid.models.card import CheckpointError

C, D = 4, 16  # classes, feature width of the synthetic clusters
OPTIONS = {"msp": {}, "energy": {}, "mahalanobis": {"normalise": True}, "knn": {"k": 5},
           "multilayer": {"levels": [(0, 12), (12, 16)]}}  # two "feature levels" (L2-normalised each)


def _clusters(rng: np.random.Generator, n: int, centre_axes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """n points around 6 * e_axis for each axis in turn (unit noise); labels = position in centre_axes."""
    labels = np.arange(n) % len(centre_axes)  # (N,)
    centres = np.zeros((len(centre_axes), D))
    centres[np.arange(len(centre_axes)), centre_axes] = 6.0
    return centres[labels] + rng.normal(size=(n, D)), labels  # (N, D), (N,)


HEAD = np.zeros((C, D))
HEAD[np.arange(C), np.arange(C)] = 1.0  # a fixed linear head: class c reads feature axis c


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    train, train_y = _clusters(rng, 400, [0, 1, 2, 3])
    val, _ = _clusters(rng, 200, [0, 1, 2, 3])
    test_in, _ = _clusters(rng, 200, [0, 1, 2, 3])
    far, _ = _clusters(rng, 200, [8, 9, 10, 11])  # clusters along axes the head never reads
    return {"train": (train, train_y), "val": val, "in": test_in, "out": far}


def _fitted(method: str, synthetic):
    train, train_y = synthetic["train"]
    return create_detector(method, **OPTIONS[method]).fit(train, train @ HEAD.T, train_y)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_separates_far_points(method, synthetic):
    det = _fitted(method, synthetic)
    s_in = det.score(synthetic["in"], synthetic["in"] @ HEAD.T)
    s_out = det.score(synthetic["out"], synthetic["out"] @ HEAD.T)
    threshold = choose_threshold(det.score(synthetic["val"], synthetic["val"] @ HEAD.T), 0.05)
    metrics = ood_metrics(s_in, s_out, threshold)
    assert metrics["auroc"] > (0.99 if method in FEATURE_METHODS else 0.9), metrics
    assert metrics["refused_out"] > 0.8 and metrics["refused_in"] < 0.12, metrics
    assert (metrics["n_in"], metrics["n_out"]) == (200, 200)


def test_feature_methods_catch_what_the_head_is_confident_about(synthetic):
    """Points on a class axis plus an off-manifold direction: same logits as class c, other features."""
    rng = np.random.default_rng(3)
    on_axis, labels = _clusters(rng, 200, [0, 1, 2, 3])
    off = on_axis.copy()
    off[np.arange(200), 8 + labels] += 8.0  # (N, D): the head does not read axes 8..11
    auroc = {m: ood_metrics(_fitted(m, synthetic).score(synthetic["in"], synthetic["in"] @ HEAD.T),
                            _fitted(m, synthetic).score(off, off @ HEAD.T), 0.0)["auroc"] for m in METHODS}
    assert all(auroc[m] > 0.95 for m in FEATURE_METHODS), auroc
    assert all(auroc[m] < 0.7 for m in ("msp", "energy")), auroc  # logit-only scores cannot see it


def test_choose_threshold_refuses_the_configured_share():
    rng = np.random.default_rng(1)
    val = rng.normal(size=300)
    for share in (0.0, 0.05, 0.2):
        refused = float((val > choose_threshold(val, share)).mean())
        assert abs(refused - share) <= 1 / len(val), (share, refused)
    tied = np.r_[np.zeros(250), rng.uniform(1, 2, size=50)]  # many equal scores (a saturated MSP)
    assert float((tied > choose_threshold(tied, 0.5)).mean()) <= 0.5 + 1 / len(tied)
    with pytest.raises(DermaidError, match="refuse_share"):
        choose_threshold(val, 1.0)


def test_ood_metrics_on_known_orderings():
    perfect = ood_metrics([0.1, 0.2, 0.3], [0.8, 0.9], threshold=0.5)
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95_tpr"] == 0.0
    assert perfect["refused_in"] == 0.0 and perfect["refused_out"] == 1.0
    inverted = ood_metrics([0.8, 0.9], [0.1, 0.2], threshold=0.5)
    assert inverted["auroc"] == 0.0 and inverted["fpr_at_95_tpr"] == 1.0


def test_normalised_unk_is_monotone_with_half_at_the_threshold():
    val = np.linspace(0.0, 10.0, 101)
    threshold = choose_threshold(val, 0.05)
    scale = choose_scale(val, threshold)
    unk = normalised_unk(np.r_[-1e9, val, 1e9], threshold, scale)
    assert np.all(np.diff(unk) >= 0) and unk[0] >= 0.0 and unk[-1] <= 1.0
    assert normalised_unk([threshold], threshold, scale)[0] == pytest.approx(0.5)
    assert normalised_unk([np.median(val)], threshold, scale)[0] == pytest.approx(0.05)


def test_statistics_round_trip_gives_identical_scores(synthetic, tmp_path):
    detectors = {m: _fitted(m, synthetic) for m in METHODS}
    file = save_statistics(str(tmp_path), detectors)
    assert file == STATISTICS_FILE and (tmp_path / file).is_file()
    loaded = load_statistics(str(tmp_path), file)
    assert sorted(loaded) == sorted(METHODS)
    x = np.r_[synthetic["in"], synthetic["out"]]
    for method in METHODS:
        assert np.array_equal(detectors[method].score(x, x @ HEAD.T), loaded[method].score(x, x @ HEAD.T)), method
        assert all(v.dtype != np.float64 for v in loaded[method].state().values())  # float32 on disk
    check_compatible(loaded, num_classes=C, feature_dim=D, source=str(tmp_path))


def test_mismatched_statistics_are_a_checkpoint_error_naming_both(synthetic, tmp_path):
    loaded = load_statistics(str(tmp_path), save_statistics(str(tmp_path), {m: _fitted(m, synthetic) for m in METHODS}))
    with pytest.raises(CheckpointError, match=f"for {D}-d features, model gives 512"):
        check_compatible(loaded, num_classes=C, feature_dim=512, source="ckpt")
    with pytest.raises(CheckpointError, match=f"for {C} classes, model gives 8"):
        check_compatible(loaded, num_classes=8, feature_dim=D, source="ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_statistics(str(tmp_path), "missing.npz")


def test_bad_method_and_missing_features_are_user_errors(synthetic):
    with pytest.raises(DermaidError, match="allowed: msp, energy, mahalanobis, knn, multilayer"):
        create_detector("odin")
    det = _fitted("mahalanobis", synthetic)
    with pytest.raises(DermaidError, match="needs penultimate features"):
        det.score(None, synthetic["in"] @ HEAD.T)
    train, train_y = synthetic["train"]
    with pytest.raises(DermaidError, match=r"columns \[8, 20\) do not fit 16-d features"):
        create_detector("mahalanobis", columns=(8, 20)).fit(train, train @ HEAD.T, train_y)
    with pytest.raises(DermaidError, match="column ranges"):
        create_detector("multilayer").fit(train, train @ HEAD.T, train_y)


def test_columns_restrict_a_detector_to_its_part_of_the_features(synthetic, tmp_path):
    """mahalanobis/knn on columns [0, 8) ignore the rest; multilayer sums its levels, each standardised on the
    training fold; the ranges survive the statistics file, and statistics written before `columns` existed
    (the whole vector) still load."""
    train, train_y = synthetic["train"]
    x = synthetic["out"].copy()
    shuffled = x.copy()
    shuffled[:, 8:] = np.random.default_rng(5).permutation(shuffled[:, 8:])  # (N, D): columns 8.. changed only
    for method in ("mahalanobis", "knn"):
        det = create_detector(method, columns=(0, 8)).fit(train, train @ HEAD.T, train_y)
        assert np.array_equal(det.score(x, x @ HEAD.T), det.score(shuffled, shuffled @ HEAD.T)), method
        full = create_detector(method).fit(train, train @ HEAD.T, train_y)
        assert not np.allclose(full.score(x, x @ HEAD.T), full.score(shuffled, shuffled @ HEAD.T)), method
    multi = _fitted("multilayer", synthetic)
    parts = [create_detector("mahalanobis", columns=c).fit(train, train @ HEAD.T, train_y)
             for c in OPTIONS["multilayer"]["levels"]]
    train_scores = [p.score(train, train @ HEAD.T) for p in parts]
    z = sum((p.score(x, x @ HEAD.T) - s.mean()) / s.std() for p, s in zip(parts, train_scores))  # (N,)
    assert np.allclose(multi.score(x, x @ HEAD.T), z, atol=1e-4)
    assert abs(multi.score(train, train @ HEAD.T).mean()) < 1e-3  # standardised: the training fold centres on 0
    loaded = load_statistics(str(tmp_path), save_statistics(str(tmp_path), {"multilayer": multi}))["multilayer"]
    assert loaded.levels == OPTIONS["multilayer"]["levels"]
    assert np.array_equal(loaded.score(x, x @ HEAD.T), multi.score(x, x @ HEAD.T))
    old = {k: v for k, v in _fitted("mahalanobis", synthetic).state().items() if k != "columns"}
    assert list(type(multi.parts[0]).from_state(old).columns) == [0, D]


def test_triage_cutoff_is_the_largest_reaching_the_target():
    rng = np.random.default_rng(2)
    is_malignant = rng.random(500) < 0.3
    malignancy = np.clip(rng.normal(np.where(is_malignant, 0.6, 0.3), 0.15), 0, 1)  # (N,)
    op = choose_triage_cutoff(malignancy, is_malignant, target_sensitivity=0.95)
    assert op["sensitivity"] >= 0.95 and op["target_sensitivity"] == 0.95
    assert op["tp"] + op["fn"] == is_malignant.sum() and op["tn"] + op["fp"] == (~is_malignant).sum()
    above = np.nextafter(op["cutoff"], np.inf)  # any larger cut-off misses the target
    assert apply_cutoff(malignancy, is_malignant, above)["sensitivity"] < 0.95
    assert apply_cutoff(malignancy, is_malignant, op["cutoff"])["specificity"] == op["specificity"]
    with pytest.raises(DermaidError, match="no malignant"):
        choose_triage_cutoff(malignancy, np.zeros(500, dtype=bool), 0.95)


def test_detectors_on_a_real_tiny_timm_model(tmp_path):
    from dermaid.data.isic import read_records
    from dermaid.data.synth import generate
    from dermaid.data.transforms import create_eval_transform
    from dermaid.files import read_bytes
    from dermaid.models.classifier import create_classifier, resolve_input_spec

    generate(str(tmp_path / "toy"), n=24, seed=0, size=(64, 64))
    records = read_records(str(tmp_path / "toy"))
    torch.manual_seed(0)
    model = create_classifier({"name": "test_efficientnet", "pretrained": False, "use_metadata": True}).eval()
    transform = create_eval_transform(resolve_input_spec(model, 64))
    images = torch.stack([transform(Image.open(io.BytesIO(read_bytes(u))).convert("RGB"))
                          for u in records["image_url"]])  # (N, 3, 64, 64)
    with torch.no_grad():
        feats, logits = (t.numpy() for t in model.forward_with_features(images))  # (N, D), (N, C)
    assert feats.shape == (24, model.feature_dim)
    layout = model.feature_layout  # head, then level0.. (2 x channels each: mean | std), contiguous
    assert list(layout)[0] == "head" and layout["head"] == (0, model.head.in_features)
    assert [start for start, _ in layout.values()][1:] == [stop for _, stop in layout.values()][:-1]
    assert feats[:, layout["level0"][0]:].std(axis=0).max() > 0  # the level statistics vary over images
    labels = np.arange(24) % 3  # three pseudo-classes: the untrained head's argmax may use only one
    options = {"knn": {"k": 1, "columns": layout["head"]}, "mahalanobis": {"columns": layout["head"]},
               "multilayer": {"levels": [layout[f"level{i}"] for i in range(len(model.feature_levels))]}}
    detectors = {m: create_detector(m, **options.get(m, {})).fit(feats, logits, labels) for m in METHODS}
    loaded = load_statistics(str(tmp_path), save_statistics(str(tmp_path), detectors))
    check_compatible(loaded, num_classes=logits.shape[1], feature_dim=model.feature_dim, source="tiny")
    for method in METHODS:
        scores = loaded[method].score(feats, logits)
        assert scores.shape == (24,) and np.isfinite(scores).all()
        assert np.array_equal(scores, detectors[method].score(feats, logits)), method
    assert loaded["knn"].score(feats, logits).max() < 1e-3  # k=1: each training image is its own neighbour
    other = create_classifier({"name": "resnet10t", "pretrained": False, "use_metadata": False})
    with pytest.raises(CheckpointError, match=f"for {model.feature_dim}-d features, model gives {other.feature_dim}"):
        check_compatible(loaded, num_classes=logits.shape[1], feature_dim=other.feature_dim, source="tiny")
