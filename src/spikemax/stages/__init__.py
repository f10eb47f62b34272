"""One module per DVC stage, each a small `run(params, paths)`; `cli.py` calls them."""
