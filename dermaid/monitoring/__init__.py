"""Watching what the service sees, without keeping images: the prediction log, image statistics, the reference
profile, drift, and a simulated stream.

Modules, one idea each:
    features.py   image statistics of the model input, the log row (no image, nothing identifying), FEATURES
    log.py        PredictionLog: batched background Parquet writes by day under monitoring.url; read_log
    reference.py  the reference profile of a checkpoint's validation fold (written by `dermaid calibrate`)
    drift.py      KS / chi-square drift of every feature against the reference, Bonferroni-corrected alerts
    simulate.py   `dermaid monitor simulate`: toy uploads, optionally shifted, through a running service

The Serve side (metrics, the Ingress's recorder) is serve/metrics.py; the report is notebooks/05-monitoring.ipynb
(`dermaid report monitoring`). Monitoring is for operating a research tool; nothing here is a diagnosis.
"""
