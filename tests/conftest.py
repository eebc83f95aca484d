"""Fixtures shared by the suite: real Valkey, real SeaweedFS S3, the tiny model directories."""

from tests.conftest_models import tiny_i2v_model_dir, tiny_model_dir  # noqa: F401
from tests.service_fixtures import redis_url, s3_client, s3_config, s3_server, valkey_server  # noqa: F401
