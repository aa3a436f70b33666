"""The admin API fuzzed from its own OpenAPI document (schemathesis): no answer is a server
error, and no route but the document itself answers without a token."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import redis.asyncio as aioredis
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from meterwall import Settings
from meterwall.admin import AdminTokens, admin_app

ROLES = {"/usage": "billing", "/periods": "billing", "/trace": "security"}


# Each generated request runs in a fresh ASGI test client without lifespan events, so the admin
# app's lazily made Redis client is never closed here (a real server closes it at shutdown).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_route_survives_generated_requests(settings: Settings, private_key: Any) -> None:
    async def make_tokens() -> dict[str, str]:
        async with aioredis.Redis.from_url(settings.redis_url) as redis:
            store = AdminTokens(redis, settings.keyspace())
            return {role: await store.create("fuzz", role)  # type: ignore[arg-type]
                    for role in ("billing", "security", "admin")}  # fmt: skip

    tokens = asyncio.run(make_tokens())
    app = admin_app(settings, private_key=private_key)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 13  # every route of the document
    for operation in operations:
        role = next((r for p, r in ROLES.items() if operation.path.startswith(p)), "admin")
        fuzz(operation, {"Authorization": f"Bearer {tokens[role]}"})
    gc.collect()  # the unclosed client's warning lands here, not on the next test


def fuzz(operation: Any, headers: dict[str, str]) -> None:
    @hypothesis_settings(max_examples=12, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        answer = case.call(headers=headers)
        assert answer.status_code < 500, (case.path, answer.status_code, answer.text[:200])
        if case.path != "/openapi.json":
            assert case.call(headers={}).status_code == 401, case.path

    check()
