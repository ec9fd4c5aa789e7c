"""Session-wide fixtures live in tests/fixtures/*, one module per concern (models, Ray cluster, latent datasets)."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WDS_SECURE", "1")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.latent_datasets",
    "tests.fixtures.s3",
    "tests.fixtures.scorer_models",
    "tests.fixtures.eval_folders",
    "tests.fixtures.browser",
    "tests.fixtures.zoo_encodes",
    "tests.fixtures.flow_models",
    "tests.fixtures.cli_runs",
]
