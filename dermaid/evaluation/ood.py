"""Out-of-distribution (OOD) scores: post-hoc detectors fitted on the training fold, a refusal threshold
chosen on the validation fold, and the metrics evaluate reports.

    det = create_detector("mahalanobis", normalise=True).fit(train_feats, train_logits, train_labels)
    t = choose_threshold(det.score(val_feats, val_logits), refuse_share=0.05)  # refuse 5% of val
    abstain = det.score(feats, logits) > t                                      # (N,) bool
    file = save_statistics(checkpoint_dir, {"mahalanobis": det, ...})          # one ood_statistics.npz
    dets = load_statistics(checkpoint_dir, file); check_compatible(dets, C, D, checkpoint_dir)

Every score is "higher = more out-of-distribution":
- msp:          1 - max softmax(logits / T)                       (Hendrycks & Gimpel 2017)
- energy:       -T * logsumexp(logits / T)                        (Liu et al. 2020)
- mahalanobis:  min over classes of the Mahalanobis distance of the (L2-normalised) penultimate features
                to the class mean, with one shared (tied) covariance (Lee et al. 2018); the covariance is
                Ledoit-Wolf shrunk (sklearn) so a small training fold (N < D) still gives a stable inverse
- knn:          distance to the k-th nearest L2-normalised training feature (Sun et al. 2022)
- multilayer:   per timm feature level, the Mahalanobis distance (as above) of the level's L2-normalised
                per-channel mean|std pooled activations; each level's distance standardised by its mean and
                std on the training fold, then summed (the layer ensemble of Lee et al. 2018, with the
                channel statistics of feature-statistics OOD work). Early levels see colour, texture and
                sharpness: on the toy model it lifts AUROC from ~0.82 (head features) to ~0.99.
Feature methods take `columns` (mahalanobis, knn: one [start, stop) range; multilayer: one per level) of
the model's feature vector (LesionClassifier.feature_layout); the ranges are part of their state.

Why not pytorch-ood (0.4.0 fits torch/numpy here): its detectors are built around a model forward and
a DataLoader; its Mahalanobis asserts that every class 0..C-1 occurs in the fitting data and inverts an
unnormalised scatter matrix with a 1e-6 ridge (singular in practice when N < D, as on the toy set); and
its fitted state lives in tensor attributes with no way to write it to, and rebuild it from, one file
beside the checkpoint. The math here is ~100 lines of numpy on stored features and logits.

State is small and deterministic: float64 math (kNN: float32 cosine similarities against its float32 bank),
float32 arrays in `state()` and on disk; a detector rounds its state to float32 at the end of fit, so it
scores exactly as its reloaded copy. The kNN bank is the whole training fold (N x D float32: ~100 MB for
ISIC 2019 at D=1312); `max_bank` keeps a fixed random subsample instead.
Abstain means score > threshold (strictly).
"""

from __future__ import annotations

import io
import math
from typing import ClassVar

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score, roc_curve

from dermaid.errors import DermaidError
from dermaid.files import exists, join, read_bytes, write_bytes
from dermaid.models.card import CheckpointError

METHODS: tuple[str, ...] = ("msp", "energy", "mahalanobis", "knn", "multilayer")
FEATURE_METHODS: tuple[str, ...] = ("mahalanobis", "knn", "multilayer")  # need penultimate features; msp/energy need logits
STATISTICS_FILE = "ood_statistics.npz"
_QUERY_CHUNK = 1024  # kNN scores this many queries at a time: a (chunk, bank) distance matrix stays small


def _f32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _f64(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def _l2_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)  # (N, 1)
    return features / np.maximum(norms, 1e-12)  # (N, D)


def _column_range(columns, feature_dim: int, method: str) -> np.ndarray:
    """[start, stop) as an int64 (2,) array; None: every column."""
    start, stop = (0, feature_dim) if columns is None else (int(columns[0]), int(columns[1]))
    if not 0 <= start < stop <= feature_dim:
        raise DermaidError(f"ood {method}: columns [{start}, {stop}) do not fit {feature_dim}-d features")
    return np.array([start, stop], dtype=np.int64)


def _stored_columns(state: dict[str, np.ndarray], feature_dim: int) -> np.ndarray:
    """A state's column range; statistics written before `columns` existed used the whole vector."""
    if "columns" not in state:
        return np.array([0, feature_dim], dtype=np.int64)
    return np.asarray(state["columns"], dtype=np.int64)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=1, keepdims=True)  # (N, 1)
    return (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]  # (N,)


class OodDetector:
    """Base: fit on the training fold, score any images; `state()` holds everything scoring needs."""

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False

    def __init__(self) -> None:
        self.num_classes: int | None = None
        self.feature_dim: int | None = None

    def fit(self, features: np.ndarray | None, logits: np.ndarray, labels: np.ndarray) -> OodDetector:
        logits = _f64(logits)  # (N, C)
        if logits.ndim != 2 or len(logits) == 0:
            raise DermaidError(f"ood {self.name}: fit needs (N, C) logits with N > 0, got shape {logits.shape}")
        self.num_classes = int(logits.shape[1])
        if self.needs_features:
            features = self._check_features(features, len(logits), fitting=True)
            self.feature_dim = int(features.shape[1])
        labels = np.asarray(labels, dtype=np.int64)  # (N,)
        if labels.shape != (len(logits),):
            raise DermaidError(f"ood {self.name}: labels of shape {labels.shape} do not match "
                               f"{len(logits)} logits rows")
        self._fit(features, logits, labels)
        return self

    def score(self, features: np.ndarray | None, logits: np.ndarray) -> np.ndarray:
        """(N,) float64 scores, higher = more out-of-distribution."""
        if self.num_classes is None:
            raise DermaidError(f"ood {self.name}: the detector is not fitted")
        logits = _f64(logits)  # (N, C)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise DermaidError(f"ood {self.name}: fitted for {self.num_classes} classes, "
                               f"logits have shape {logits.shape}")
        if self.needs_features:
            features = self._check_features(features, len(logits), fitting=False)
        return self._score(features, logits)

    def _check_features(self, features, n: int, fitting: bool) -> np.ndarray:
        if features is None:
            raise DermaidError(f"ood {self.name}: needs penultimate features (forward_with_features), got none")
        features = _f64(features)  # (N, D)
        if features.ndim != 2 or len(features) != n:
            raise DermaidError(f"ood {self.name}: features of shape {features.shape} do not match {n} logits rows")
        if not fitting and features.shape[1] != self.feature_dim:
            raise DermaidError(f"ood {self.name}: fitted on {self.feature_dim}-d features, got {features.shape[1]}-d")
        return features

    def state(self) -> dict[str, np.ndarray]:
        shape = {"num_classes": np.array([self.num_classes], dtype=np.int64)}
        if self.needs_features:
            shape["feature_dim"] = np.array([self.feature_dim], dtype=np.int64)
        return {**shape, **self._state()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> OodDetector:
        det = cls.__new__(cls)
        OodDetector.__init__(det)
        det.num_classes = int(state["num_classes"][0])
        det.feature_dim = int(state["feature_dim"][0]) if cls.needs_features else None
        det._load(state)
        return det

    # subclasses implement these three (+ _state)
    def _fit(self, features: np.ndarray | None, logits: np.ndarray, labels: np.ndarray) -> None:
        raise NotImplementedError

    def _score(self, features: np.ndarray | None, logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _load(self, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


class MspDetector(OodDetector):
    """1 - max softmax(logits / T): a confident prediction is in-distribution."""

    name = "msp"

    def __init__(self, temperature: float = 1.0) -> None:  # T: the card's calibration temperature when given
        super().__init__()
        self.temperature = float(temperature)

    def _fit(self, features, logits, labels) -> None:
        self.temperature = float(np.float32(self.temperature))

    def _score(self, features, logits) -> np.ndarray:
        z = logits / self.temperature  # (N, C)
        return 1.0 - np.exp(z.max(axis=1) - _logsumexp(z))  # (N,)

    def _state(self) -> dict[str, np.ndarray]:
        return {"temperature": _f32([self.temperature])}

    def _load(self, state) -> None:
        self.temperature = float(state["temperature"][0])


class EnergyDetector(MspDetector):
    """-T * logsumexp(logits / T): low total evidence is out-of-distribution."""

    name = "energy"

    def _score(self, features, logits) -> np.ndarray:
        return -self.temperature * _logsumexp(logits / self.temperature)  # (N,)


class MahalanobisDetector(OodDetector):
    """Class means + one tied, Ledoit-Wolf-shrunk covariance; score = distance to the closest class mean."""

    name = "mahalanobis"
    needs_features = True

    # normalise: L2-normalised features separate far better (SSD, KNN papers); columns: None = all of them
    def __init__(self, normalise: bool = True, columns: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.normalise, self.columns = bool(normalise), columns

    def _prepare(self, features: np.ndarray) -> np.ndarray:
        x = features[:, self.columns[0]:self.columns[1]]  # (N, D')
        return _l2_normalise(x) if self.normalise else x

    def _fit(self, features, logits, labels) -> None:
        self.columns = _column_range(self.columns, features.shape[1], self.name)
        x = self._prepare(features)  # (N, D')
        classes = np.unique(labels)  # classes absent from the fold get no mean
        means = np.stack([x[labels == c].mean(axis=0) for c in classes])  # (K, D)
        centred = x - means[np.searchsorted(classes, labels)]  # (N, D)
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_  # (D, D)
        self.classes = classes.astype(np.int64)
        self._set(_f32(means), _f32((precision + precision.T) / 2.0))

    def _set(self, means: np.ndarray, precision: np.ndarray) -> None:
        """Keep the float32 state; cache its float64 products so scoring one image stays ~D^2 work."""
        self.means, self.precision = means, precision  # (K, D), (D, D) float32
        self._p64, self._mu_p = _f64(precision), _f64(means) @ _f64(precision)  # (D, D), (K, D)
        self._mu_p_mu = (self._mu_p * _f64(means)).sum(axis=1)  # (K,)

    def _score(self, features, logits) -> np.ndarray:
        x = self._prepare(features)  # (N, D)
        squared = ((x @ self._p64 * x).sum(axis=1)[:, None] - 2.0 * x @ self._mu_p.T
                   + self._mu_p_mu[None, :])  # (N, K): (x - mu)' P (x - mu), P symmetric
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))  # (N,)

    def _state(self) -> dict[str, np.ndarray]:
        return {"normalise": np.array([self.normalise]), "columns": self.columns, "classes": self.classes,
                "means": self.means, "precision": self.precision}

    def _load(self, state) -> None:
        self.normalise = bool(state["normalise"][0])
        self.columns = _stored_columns(state, self.feature_dim)
        self.classes = np.asarray(state["classes"], dtype=np.int64)
        self._set(_f32(state["means"]), _f32(state["precision"]))


class KnnDetector(OodDetector):
    """Distance to the k-th nearest L2-normalised training feature (the bank: the training fold)."""

    name = "knn"
    needs_features = True

    # k: conf/calibrate.yaml's ood.knn_k sets it (10 here for direct calls); max_bank: subsample large folds
    def __init__(self, k: int = 10, max_bank: int | None = None, columns: tuple[int, int] | None = None) -> None:
        super().__init__()
        if int(k) < 1:
            raise DermaidError(f"ood knn: k must be >= 1, got {k}")
        self.k, self.max_bank, self.columns = int(k), max_bank, columns

    def _fit(self, features, logits, labels) -> None:
        self.columns = _column_range(self.columns, features.shape[1], self.name)
        bank = _l2_normalise(features[:, self.columns[0]:self.columns[1]])  # (N, D')
        if self.max_bank and len(bank) > self.max_bank:
            keep = np.random.default_rng(0).choice(len(bank), size=int(self.max_bank), replace=False)
            bank = bank[np.sort(keep)]  # deterministic subsample
        if len(bank) < self.k:
            raise DermaidError(f"ood knn: k={self.k} needs at least {self.k} training images, got {len(bank)}")
        self.bank = _f32(bank)

    def _score(self, features, logits) -> np.ndarray:
        x = _f32(_l2_normalise(features[:, self.columns[0]:self.columns[1]]))  # (N, D'): float32 like the bank (cosine needs no more; half the memory)
        out = np.empty(len(x), dtype=np.float64)
        for start in range(0, len(x), _QUERY_CHUNK):
            sim = _f64(x[start:start + _QUERY_CHUNK] @ self.bank.T)  # (n, M) cosine similarity
            kth = np.partition(-sim, self.k - 1, axis=1)[:, self.k - 1]  # (n,) -(k-th largest similarity)
            out[start:start + _QUERY_CHUNK] = np.sqrt(np.maximum(2.0 + 2.0 * kth, 0.0))  # |a-b|^2 = 2 - 2a.b
        return out

    def _state(self) -> dict[str, np.ndarray]:
        return {"k": np.array([self.k], dtype=np.int64), "columns": self.columns, "bank": self.bank}

    def _load(self, state) -> None:
        self.k, self.max_bank = int(state["k"][0]), None
        self.columns = _stored_columns(state, self.feature_dim)
        self.bank = _f32(state["bank"])


class MultiLayerDetector(OodDetector):
    """Sum over feature levels of each level's Mahalanobis distance, standardised on the training fold."""

    name = "multilayer"
    needs_features = True

    def __init__(self, levels: list[tuple[int, int]] | None = None) -> None:  # levels: [start, stop) per level
        super().__init__()
        self.levels = levels

    def _fit(self, features, logits, labels) -> None:
        if not self.levels:
            raise DermaidError("ood multilayer: needs the feature levels' column ranges (levels=[(start, stop), ...])")
        self.parts = [MahalanobisDetector(normalise=True, columns=columns).fit(features, logits, labels)
                      for columns in self.levels]
        train = np.stack([part._score(features, logits) for part in self.parts], axis=1)  # (N, L)
        self.centre, self.spread = _f32(train.mean(axis=0)), _f32(np.maximum(train.std(axis=0), 1e-6))  # (L,)

    def _score(self, features, logits) -> np.ndarray:
        # (N, L); score() checked the features once, so the parts skip their own checks
        per_level = np.stack([part._score(features, logits) for part in self.parts], axis=1)
        return ((per_level - _f64(self.centre)) / _f64(self.spread)).sum(axis=1)  # (N,)

    def _state(self) -> dict[str, np.ndarray]:
        state = {"centre": self.centre, "spread": self.spread}
        for index, part in enumerate(self.parts):
            state.update({f"level{index}/{key}": value for key, value in part.state().items()})
        return state

    def _load(self, state) -> None:
        self.centre, self.spread = _f32(state["centre"]), _f32(state["spread"])
        self.parts = [MahalanobisDetector.from_state({key.split("/", 1)[1]: value for key, value in state.items()
                                                      if key.startswith(f"level{index}/")})
                      for index in range(len(self.centre))]
        self.levels = [tuple(int(c) for c in part.columns) for part in self.parts]


_DETECTORS: dict[str, type[OodDetector]] = {
    cls.name: cls for cls in (MspDetector, EnergyDetector, MahalanobisDetector, KnnDetector, MultiLayerDetector)}


def create_detector(method: str, **options) -> OodDetector:
    """A fresh detector; options go to its constructor (temperature, normalise, k, max_bank, columns, levels)."""
    if method not in _DETECTORS:
        raise DermaidError(f"ood: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    try:
        return _DETECTORS[method](**options)
    except TypeError as exc:
        raise DermaidError(f"ood {method}: bad options {sorted(options)}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Thresholds and metrics


def choose_threshold(val_scores, refuse_share: float) -> float:
    """The score above which (strictly) round(refuse_share * N) validation images lie, ties kept in.

    Ties at the threshold are never refused, so the refused share is at most refuse_share + 1/(2N).
    """
    scores = np.sort(_f64(val_scores))  # (N,)
    if not 0.0 <= refuse_share < 1.0:
        raise DermaidError(f"ood: refuse_share must be in [0, 1), got {refuse_share}")
    if len(scores) == 0:
        raise DermaidError("ood: no validation scores to choose a threshold from")
    n_refuse = int(round(refuse_share * len(scores)))
    return float(scores[len(scores) - n_refuse - 1])


def choose_scale(val_scores, threshold: float) -> float:
    """The UNK scale: the median validation image maps to UNK 0.05 (threshold to 0.5)."""
    spread = threshold - float(np.median(_f64(val_scores)))
    return max(spread, 1e-6 * max(1.0, abs(threshold))) / math.log(19.0)


def normalised_unk(scores, threshold: float, scale: float = 1.0) -> np.ndarray:
    """(N,) in [0, 1], monotone in the score: logistic((score - threshold) / scale); 0.5 at the threshold."""
    z = (_f64(scores) - float(threshold)) / float(scale)  # (N,)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)) without overflow


def ood_metrics(in_scores, out_scores, threshold: float) -> dict[str, float | int]:
    """AUROC (OOD = positive), FPR at 95% TPR, and the refused shares at `threshold`."""
    s_in, s_out = _f64(in_scores), _f64(out_scores)
    result: dict[str, float | int] = {"auroc": float("nan"), "fpr_at_95_tpr": float("nan")}
    if len(s_in) and len(s_out):
        y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]  # (N_in + N_out,)
        s = np.r_[s_in, s_out]
        result["auroc"] = float(roc_auc_score(y, s))
        fpr, tpr, _ = roc_curve(y, s)
        result["fpr_at_95_tpr"] = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
    result["refused_in"] = float((s_in > threshold).mean()) if len(s_in) else float("nan")
    result["refused_out"] = float((s_out > threshold).mean()) if len(s_out) else float("nan")
    return {**result, "n_in": int(len(s_in)), "n_out": int(len(s_out))}


# ---------------------------------------------------------------------------------------------
# One statistics file beside the checkpoint


def save_statistics(url_dir: str, detectors: dict[str, OodDetector]) -> str:
    """Write every detector's state to `url_dir`/ood_statistics.npz (keys "<method>/<array>"); its file name."""
    arrays = {f"{method}/{key}": value for method, det in detectors.items() for key, value in det.state().items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(join(url_dir, STATISTICS_FILE), buf.getvalue())
    return STATISTICS_FILE


def load_statistics(url_dir: str, file: str) -> dict[str, OodDetector]:
    """The detectors saved by save_statistics; CheckpointError for a missing, unreadable or unknown file."""
    url = join(url_dir, file)
    if not exists(url):
        raise CheckpointError(f"OOD statistics {url} not found; refit them with `dermaid calibrate checkpoint=...`")
    try:
        with np.load(io.BytesIO(read_bytes(url)), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"OOD statistics {url} are unreadable: {exc}") from None
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        method, _, name = key.partition("/")
        grouped.setdefault(method, {})[name] = value
    unknown = sorted(set(grouped) - set(_DETECTORS))
    if unknown:
        raise CheckpointError(f"OOD statistics {url} hold unknown methods {unknown}; allowed: {', '.join(METHODS)}")
    return {method: _DETECTORS[method].from_state(state) for method, state in grouped.items()}


def check_compatible(detectors: dict[str, OodDetector], num_classes: int, feature_dim: int, source: str) -> None:
    """CheckpointError naming both sides when the statistics were fitted for another model."""
    for method, det in detectors.items():
        if det.num_classes != num_classes:
            raise CheckpointError(f"{source}: OOD statistics ({method}) for {det.num_classes} classes, "
                                  f"model gives {num_classes}")
        if det.needs_features and det.feature_dim != feature_dim:
            raise CheckpointError(f"{source}: OOD statistics ({method}) for {det.feature_dim}-d features, "
                                  f"model gives {feature_dim}; refit them with `dermaid calibrate checkpoint=...` "
                                  "(statistics from before the feature levels were added cover the head only)")
