"""Faust's ``app.topic_route``, answering 503 instead of 500 before the topic is known.

A view decorated with it is answered by the worker that owns the key's partition of
``topic`` (the request is forwarded there, or served here when that is this worker).
Faust's own decorator asks the producer for the key's partition; until the producer
has the topic's metadata (a worker that just started), aiokafka raises ``TypeError``
and the request failed with 500 and a text body. Here that is a JSON 503
``recovering``, as for any other stock query that cannot be answered yet.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from faust.exceptions import SameNode
from faust.web import Request, Response, View

Handler = Callable[..., Awaitable[Response]]


def owner_route(
    app: Any, topic: Any, *, match_info: str = "", query_param: str = ""
) -> Callable[[Handler], Handler]:
    """``@app.topic_route(topic=..., match_info=... | query_param=...)``, see above."""

    def decorator(fun: Handler) -> Handler:
        @wraps(fun)
        async def get(view: View, request: Request, *args: Any, **kwargs: Any) -> Response:
            key = request.match_info[match_info] if match_info else request.query[query_param]
            try:
                return await app.router.route_topic_req(topic, key, view.web, request)
            except SameNode:
                return await fun(view, request, *args, **kwargs)
            except TypeError:  # no partition metadata for the topic yet
                return view.json({"error": "recovering"}, status=503)

        return get

    return decorator
