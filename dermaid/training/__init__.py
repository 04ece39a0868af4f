"""Training: loop.py (plain PyTorch epochs and predictions, no Ray), driver.py (config -> checked inputs ->
Ray Train TorchTrainer -> summary), worker.py (train_fn_per_worker: one Ray Train worker), worker_config.py
(the typed config both read), hooks.py (loss hooks, e.g. distillation from dermaid.compress), history.py
(DIR/history.csv). Import the submodules; this package imports nothing heavy."""
