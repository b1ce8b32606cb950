"""pipeline.web.routing.owner_route with a stand-in router (the adapter's error paths).

Routed queries against real workers are covered by test_two_workers.py and
test_advertised_url.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from faust.exceptions import SameNode
from faust.web import Response

from pipeline.web.routing import owner_route


class FakeView:
    web = object()

    def json(self, value: Any, status: int = 200) -> Any:
        return SimpleNamespace(status=status, body=json.dumps(value))


def call(route: Any, request: Any) -> Any:
    app = SimpleNamespace(router=SimpleNamespace(route_topic_req=route))
    served: list[str] = []

    @owner_route(app, "orders", match_info="sku")
    async def get(view: Any, request: Any, sku: str) -> Response:
        served.append(sku)
        return view.json({"sku": sku})

    answer = asyncio.run(get(FakeView(), request, sku=request.match_info["sku"]))
    return answer, served


REQUEST = SimpleNamespace(match_info={"sku": "SKU-1"}, query={})


def test_the_owner_serves_it_here() -> None:
    async def same_node(*_: Any) -> Any:
        raise SameNode()

    answer, served = call(same_node, REQUEST)
    assert (answer.status, served) == (200, ["SKU-1"])


def test_another_owner_answers_through_the_router() -> None:
    async def forwarded(topic: str, key: str, web: Any, request: Any) -> Any:
        assert (topic, key) == ("orders", "SKU-1")
        return SimpleNamespace(status=200, body="from the owner")

    answer, served = call(forwarded, REQUEST)
    assert (answer.body, served) == ("from the owner", [])


def test_no_topic_metadata_yet_is_a_json_503_not_a_500() -> None:
    # what aiokafka's partitioner raises before the producer has the topic's metadata
    async def no_metadata(*_: Any) -> Any:
        raise TypeError("'NoneType' object is not iterable")

    answer, served = call(no_metadata, REQUEST)
    assert (answer.status, json.loads(answer.body), served) == (503, {"error": "recovering"}, [])
