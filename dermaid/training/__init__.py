"""Training: loop.py (plain PyTorch epochs and predictions, no Ray), train.py (Ray Train wiring),
history.py (DIR/history.csv). Import the submodules; this package imports nothing heavy."""
