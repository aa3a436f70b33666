"""The plugin model: explicit activation, resolvers before API keys, redactors before sealing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from meterwall import Meterwall
from meterwall.errors import ConfigurationError
from meterwall.reader import RecordReader
from tests.test_access import api_app
from tests.test_cli import meterwall
from tests.test_conformance import starlette_app


def guide_example() -> dict[str, Any]:
    """The plugin package of docs/plugins.md, executed as written there."""
    text = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/plugins.md", "exec"), namespace)
    return namespace


async def test_resolvers_go_first_and_redactors_see_every_value(
    redis, settings, private_key
) -> None:
    own = settings.replace(access="keys", access_rules="POST /echo=items:write")
    example = guide_example()
    resolver = example["header_caller"].create(own)
    redactor = example["word_redactor"].create(own)
    app = Meterwall(starlette_app(), settings=own, plugins=[resolver, redactor])
    assert app.plugins.names == ["header-caller", "word-redactor"]
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            ok = await client.post("/echo?note=swordfish", headers={"X-Test-Caller": "acme"},
                                   json={"a": "the swordfish", "b": ["swordfish"]})  # fmt: skip
            bad = await client.get("/items/1", headers={"X-Test-Caller": "bad"})
            none = await client.get("/items/1")
    assert (ok.status_code, bad.status_code, none.status_code) == (200, 401, 401)
    assert bad.json()["type"].endswith("/invalid-token")
    assert none.json()["detail"] == "missing-key"  # nothing for the resolver: the key path
    records = {r["status"]: r for r in await RecordReader(redis, own, private_key).records()}
    admitted = records[200]
    assert (admitted["consumer"], admitted["key_id"]) == ("acme", "sub-1")
    assert admitted["body"]["json"] == {"a": "the [word]", "b": ["[word]"]}
    assert admitted["query"] == "note=%5Bword%5D"
    assert "swordfish" not in json.dumps(list(records.values()))


def test_plugins_are_explicit_and_a_missing_one_stops_start_up(settings) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Meterwall(api_app, settings=settings.replace(plugins="no-such-plugin"))
    assert caught.value.setting == "MW_PLUGINS"
    adapter_only = Meterwall(api_app, settings=settings.replace(plugins="aiohttp"))
    assert adapter_only.plugins.names == []  # an adapter is set up by the app, not by settings
    with pytest.raises(ConfigurationError) as needs_access:
        Meterwall(api_app, settings=settings, plugins=[guide_example()["HeaderCaller"]()])
    assert needs_access.value.setting == "MW_ACCESS"
    with pytest.raises(ConfigurationError):
        Meterwall(api_app, settings=settings, plugins=[object()])


def test_plugins_list_shows_what_is_installed() -> None:
    done = meterwall("plugins", "list", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["aiohttp"]["kind"] == "adapter"
    assert rows["aiohttp"]["module"] == "meterwall_aiohttp:plugin"
