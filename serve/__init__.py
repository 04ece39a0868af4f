"""DermAID on Ray Serve: `build_app` (serve/app.py, which maps the modules), its Serve config (serve/config.yaml),
the `dermaid serve` launcher (serve/launcher.py) and the web pages (serve/web/)."""
