"""Evaluation: metrics.py (the ISIC 2019 metrics, one definition), calibration.py (temperature
scaling, ECE, NLL), evaluate.py (`dermaid evaluate`: predictions.csv + metrics.json).

The batch prediction path shared with dermaid.inference is
`dermaid.training.loop.predict_probabilities` (plain torch)."""
