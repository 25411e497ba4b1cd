"""Root pytest plugin: real-process fixtures (tiny_model_dir, redis_server, stage_servers, stack) for every test."""
pytest_plugins = ["cosyvoice_tools.testing"]
