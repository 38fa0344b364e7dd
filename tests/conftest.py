import os
from pathlib import Path

import pytest

from tests.helpers import demo_subset

for _key, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    """The real demo dataset (photos from scikit-image / scikit-learn), generated once per session."""
    from embedpipe.workers.ingest.demo_data import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo") / "images").root


@pytest.fixture
def small_holidays(tmp_path, demo_images) -> Path:
    """Three groups of the demo dataset plus two distractors: a small real Holidays-layout folder."""
    return demo_subset(demo_images, tmp_path / "holidays", (1000, 1001, 1002), (200001, 200101))
