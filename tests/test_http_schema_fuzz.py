"""A property-based fuzz of the HTTP front from its own OpenAPI schema (schemathesis + hypothesis, issue 14):
generated requests -- valid and invalid bodies, queries, paths, multipart uploads -- never get a 5xx, and
every error answer is in OpenAI's shape. Bounded (a few examples per operation) to stay within seconds;
jobs that valid generated creates queue are cancelled afterwards so they do not load the shared farm.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from scheduler.core import keys
from scheduler.ops.job_admin import cancel_jobs
from tests.http_fixtures import HttpFarm

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 15
# Fuzzed again with a user key (ownership filters, quotas, the admin-only usage route): the routes whose
# answers depend on who asks.
USER_KEY_PATHS = {"/v1/videos", "/v1/videos/{video_id}", "/v1/batches", "/v1/files/{file_id}", "/v1/usage"}


def test_no_generated_request_gets_a_server_error(http_farm: HttpFarm) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    status, _, body = http_farm.request("GET", "/openapi.json", headers=http_farm.headers())
    assert status == 200
    schema = schemathesis.openapi.from_dict(json.loads(body))
    started = time.time()
    failures: list[str] = []
    tried = 0
    statuses: set[tuple[str, str, int]] = set()
    user_headers = {"Authorization": f"Bearer {http_farm.extra['user_keys']['team-fuzz']}"}
    runs = [(result.ok(), http_farm.headers()) for result in schema.get_all_operations()]
    runs += [(op, user_headers) for op, _ in list(runs) if op.path in USER_KEY_PATHS]

    def fuzz(operation: Any, mode: Any, headers: dict[str, str]) -> None:
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case: Any) -> None:
            nonlocal tried
            tried += 1
            response = case.call(base_url=http_farm.base_url, headers=headers, timeout=30)
            statuses.add((case.method, case.operation.path, response.status_code))
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")
            elif response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                error = response.json().get("error", {})
                if set(error) != {"message", "type", "param", "code"}:
                    failures.append(
                        f"{case.method} {case.formatted_path}: error not in OpenAI's shape: {response.text[:300]}"
                    )

        call()

    for operation, headers in runs:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode, headers)
    # Valid creates queued real jobs: stop them so later tests have the farm to themselves.
    fuzzed = [m.decode() for m in http_farm.conn.zrangebyscore(keys.jobs_index_key(), started, "+inf")]
    cancel_jobs(http_farm.conn, fuzzed)
    assert tried >= 100
    # The fuzz got past the door too: generated creates and uploads were accepted, not only refused.
    assert {("POST", "/v1/videos", 200), ("POST", "/v1/files", 200)} <= statuses, sorted(statuses)
    assert not failures, "\n".join(failures[:10]) + "\n" + http_farm.front_log()
