"""Evaluation: metrics.py (the ISIC 2019 metrics, one definition), calibration.py (temperature
scaling, ECE, NLL), evaluate.py (`dermaid evaluate`: predictions.csv + metrics.json).

Evaluation and dermaid.inference share one path: `create_eval_transform(card.input)` for the pixels and
`dermaid.training.loop.probabilities_from_logits` (softmax(logits / card.temperature)) for the output."""
