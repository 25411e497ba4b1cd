"""The launcher: what `make up` runs (Redis, one tritonserver per stage replica, the gateway, the seed fronts) and
the placement that docker compose is rendered from. Product code: it imports common and the services, never the
developer tools (`tests/test_layering.py`)."""
