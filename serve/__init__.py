"""Ray Serve application of DermAID (serve/app.py) and its Serve config (serve/config.yaml)."""
