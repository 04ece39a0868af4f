"""What the notebooks in notebooks/ import: tables and matplotlib figures, no notebook logic.

    figures.py   shared plotting helpers (headless Figure objects, image grids, heatmaps)
    eda.py       01-eda: dataset tables and plots for any layout the readers support
    training.py  02-train-report: learning curves, ISIC metrics, calibration, subgroups, errors
    abstention.py 02-train-report: OOD score histograms and refused shares, the triage operating point
    tuning.py    03-tune-report: trials table, metric against each hyperparameter, best config
    saliency.py  02/04: CAM overlays per class and per method

Metrics come from dermaid.evaluation (never recomputed here). Every figure is built on a
`matplotlib.figure.Figure` (no pyplot state), so it renders the same in JupyterLab, in a
papermill run and in a test; notebooks display it as the cell's value.
Reports are decision support for research, never a diagnosis.
"""
