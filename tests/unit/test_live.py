"""The pure parts of the live stock stream: SKU queries, event ids, filtering, parsing."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from config.settings import settings
from pipeline.web import live
from pipeline.web.live import (
    MAX_SKUS,
    QUEUE_LIMIT,
    RESYNC,
    BadQuery,
    LiveHub,
    StockUpdate,
    StreamState,
    Subscriber,
    decode_event_id,
    encode_event_id,
    fingerprint,
    format_event,
    is_newer,
    parse_message,
    parse_skus,
    parse_update,
    product_html,
)


def upd(sku: str, version: int, available: int = 5) -> StockUpdate:
    return StockUpdate(
        sku=sku,
        version=version,
        on_hand=available,
        reserved=0,
        safety_stock=0,
        available=available,
        in_stock=available > 0,
        updated_at=1_767_225_600_123,
        occurred_at=1_767_225_600_000,
    )


# --- the sku query ----------------------------------------------------------


def test_skus_come_from_commas_and_repeated_parameters_deduplicated_in_order():
    assert parse_skus(["B,A", "C", "A"]) == ("B", "A", "C")


def test_a_single_sku_is_a_query():
    assert parse_skus(["SKU-1"]) == ("SKU-1",)


@pytest.mark.parametrize(
    "values",
    [[], [""], ["A,,B"], ["A,"], [" "], ["A\x00B"], ["x" * (settings.max_sku_len + 1)]],
)
def test_a_query_without_valid_skus_is_refused(values):
    with pytest.raises(BadQuery):
        parse_skus(values)


def test_at_most_fifty_skus_per_stream():
    fifty = ",".join(f"S{i}" for i in range(MAX_SKUS))
    assert len(parse_skus([fifty])) == MAX_SKUS
    with pytest.raises(BadQuery, match="too many"):
        parse_skus([fifty + ",ONE-MORE"])


def test_duplicates_do_not_count_against_the_limit():
    assert parse_skus(["A"] * (MAX_SKUS * 2)) == ("A",)


# --- event ids --------------------------------------------------------------


def test_the_event_id_lists_the_version_per_sku_in_sorted_order():
    event_id = encode_event_id(["B", "A", "C"], {"A": 3, "C": 12})
    assert event_id == f"{fingerprint(['A', 'B', 'C'])}:3,0,12"


def test_an_event_id_decodes_to_the_versions_it_encodes():
    skus = ["B", "A", "C"]
    assert decode_event_id(encode_event_id(skus, {"A": 3, "C": 12}), skus) == {"A": 3, "C": 12}


def test_the_sku_order_of_the_request_does_not_matter():
    assert decode_event_id(encode_event_id(["A", "B"], {"B": 4}), ["B", "A"]) == {"B": 4}


@pytest.mark.parametrize(
    "raw",
    [None, "", "garbage", "deadbeef:1,2", ":1,2", "{fp}:1", "{fp}:1,2,3", "{fp}:1,x", "{fp}:-1,2"],
)
def test_an_id_of_another_stream_or_a_malformed_one_means_start_over(raw):
    skus = ["A", "B"]
    if raw is not None:
        raw = raw.replace("{fp}", fingerprint(skus))
    assert decode_event_id(raw, skus) == {}


def test_an_id_for_another_sku_set_is_ignored():
    assert decode_event_id(encode_event_id(["A", "B"], {"A": 9}), ["A", "C"]) == {}


def test_event_ids_are_ascii_without_line_breaks_even_for_unicode_skus():
    event_id = encode_event_id(["Größe-42", "ü"], {"Größe-42": 7})
    assert event_id.isascii() and "\n" not in event_id and "\r" not in event_id


@given(
    st.dictionaries(
        st.text(
            st.characters(min_codepoint=0x20, exclude_categories=["Cs"], exclude_characters=","),
            min_size=1,
        ),
        st.integers(min_value=0, max_value=2**63 - 1),
        min_size=1,
        max_size=MAX_SKUS,
    )
)
def test_every_position_survives_an_encode_decode_round_trip(versions):
    skus = list(versions)
    decoded = decode_event_id(encode_event_id(skus, versions), skus)
    assert decoded == {k: v for k, v in versions.items() if v > 0}


# --- parsing pub/sub messages and hashes -------------------------------------


def test_a_published_message_parses_with_a_json_boolean():
    msg = json.dumps(
        {
            "sku": "A",
            "version": 7,
            "on_hand": 10,
            "reserved": 3,
            "safety_stock": 0,
            "available": 7,
            "in_stock": True,
            "updated_at": 1767225600123,
            "occurred_at": 1767225600000,
        }
    )
    assert parse_message(msg) == StockUpdate(
        "A", 7, 10, 3, 0, 7, True, 1767225600123, 1767225600000
    )


@pytest.mark.parametrize(
    ("raw", "expected"), [(True, True), (False, False), (1, True), (0, False), ("1", True)]
)
def test_in_stock_may_be_a_boolean_or_one_or_zero(raw, expected):
    update = parse_update({"sku": "A", "version": 1, "available": 1, "in_stock": raw})
    assert update is not None and update.in_stock is expected


def test_a_redis_hash_of_decimal_strings_parses_with_the_sku_given():
    fields = {
        "on_hand": "4",
        "reserved": "1",
        "safety_stock": "1",
        "available": "2",
        "in_stock": "1",
        "version": "12",
        "updated_at": "1767225600123",
        "occurred_at": "1767225600000",
    }
    assert parse_update(fields, sku="Größe-42") == StockUpdate(
        "Größe-42", 12, 4, 1, 1, 2, True, 1767225600123, 1767225600000
    )


def test_backorderable_is_carried_and_reads_as_zero_where_it_is_missing():
    """A message or hash of a sink from before it existed still parses (0), and the
    stream's JSON carries it for the product page's "Preorder"."""
    old = {"sku": "A", "version": 3, "available": 0, "in_stock": False}
    assert parse_update(old).backorderable == 0
    update = parse_update({**old, "backorderable": "12"})
    assert update is not None and update.backorderable == 12
    assert update.to_json()["backorderable"] == 12
    assert parse_update({**old, "backorderable": "many"}) is None


def test_in_stock_defaults_to_available_above_zero():
    assert parse_update({"sku": "A", "version": 2, "available": 0}).in_stock is False
    assert parse_update({"sku": "A", "version": 2, "available": 3}).in_stock is True


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"sku": "A"},
        {"sku": "A", "version": 0},
        {"sku": "A", "version": "x"},
        {"sku": "A", "version": True},
        {"sku": "A", "version": 1.5},
        {"sku": "", "version": 1},
        {"sku": 5, "version": 1},
        {"sku": "A", "version": 1, "available": "lots"},
        {"sku": "A", "version": 1, "in_stock": "maybe"},
        {"sku": "A", "version": 1, "in_stock": 2},
    ],
)
def test_a_message_without_a_usable_sku_version_or_numbers_is_invalid(fields):
    assert parse_update(fields) is None


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '"A"', b"\xff\xfe", "null"])
def test_a_payload_that_is_not_a_json_object_is_invalid(data):
    assert parse_message(data) is None


# --- filtering: what one stream sends ------------------------------------------


def test_the_event_frame_is_named_stock_with_the_id_and_one_line_of_json():
    frame = format_event(upd("A", 3, available=2), "abc:3")
    lines = frame.decode().split("\n")
    assert lines[:2] == ["event: stock", "id: abc:3"]
    assert lines[2].startswith("data: {") and lines[3:] == ["", ""]
    assert json.loads(lines[2][len("data: ") :]) == {
        "sku": "A",
        "version": 3,
        "on_hand": 2,
        "reserved": 0,
        "safety_stock": 0,
        "available": 2,
        "in_stock": True,
        "updated_at": 1_767_225_600_123,
        "occurred_at": 1_767_225_600_000,
        "backorderable": 0,
    }


def test_newer_means_a_higher_version_than_sent_for_that_sku():
    assert is_newer(upd("A", 1), {})
    assert is_newer(upd("A", 4), {"A": 3, "B": 9})
    assert not is_newer(upd("A", 3), {"A": 3})
    assert not is_newer(upd("A", 2), {"A": 3})


def test_a_stream_sends_only_its_skus_and_only_rising_versions():
    state = StreamState(("A", "B"))
    assert state.accept(upd("C", 1)) is None
    assert state.accept(upd("A", 2)) is not None
    assert state.accept(upd("A", 2)) is None  # duplicate
    assert state.accept(upd("A", 1)) is None  # out of order
    assert state.accept(upd("B", 1)) is not None
    assert state.accept(upd("A", 5)) is not None  # a gap is fine: the latest state wins
    assert state.last == {"A": 5, "B": 1}


def test_each_event_id_carries_the_whole_stream_position():
    state = StreamState(("A", "B"))
    state.accept(upd("A", 2))
    frame = state.accept(upd("B", 7)).decode()
    assert f"id: {encode_event_id(['A', 'B'], {'A': 2, 'B': 7})}\n" in frame
    assert decode_event_id(state.event_id, ["B", "A"]) == {"A": 2, "B": 7}


def test_a_resumed_stream_sends_only_what_is_newer_than_its_last_event_id():
    previous = StreamState(("A", "B"))
    previous.accept(upd("A", 4))
    resumed = StreamState(("A", "B"), decode_event_id(previous.event_id, ("A", "B")))
    assert resumed.accept(upd("A", 4)) is None
    assert resumed.accept(upd("A", 3)) is None
    assert resumed.accept(upd("B", 1)) is not None
    assert resumed.accept(upd("A", 5)) is not None


def test_a_resume_position_for_skus_not_requested_is_ignored():
    assert StreamState(("A",), {"A": 2, "Z": 9}).last == {"A": 2}


@given(st.lists(st.tuples(st.sampled_from("ABC"), st.integers(1, 20)), max_size=60))
def test_versions_sent_per_sku_strictly_rise_and_end_at_the_highest_seen(messages):
    state = StreamState(("A", "B"))
    sent: dict[str, list[int]] = {}
    for sku, version in messages:
        frame = state.accept(upd(sku, version))
        if frame is not None:
            sent.setdefault(sku, []).append(version)
    assert "C" not in sent
    for sku, versions in sent.items():
        assert versions == sorted(set(versions))
        assert versions[-1] == max(v for s, v in messages if s == sku)


# --- the in-process fan-out (no Redis) -----------------------------------------


def test_a_slow_stream_overflowing_its_queue_resyncs_instead():
    async def scenario() -> list[object]:
        sub = Subscriber(("A",))
        for v in range(1, QUEUE_LIMIT + 2):
            sub.offer(upd("A", v))
        return [await sub.next(0.01), await sub.next(0.01)]

    assert asyncio.run(scenario()) == [RESYNC, None]


def test_an_idle_stream_wakes_after_its_timeout_and_a_closed_one_returns_nothing():
    async def scenario() -> tuple[object, object]:
        sub = Subscriber(("A",))
        idle = await sub.next(0.01)
        sub.offer(upd("A", 1))
        sub.close()
        return idle, await sub.next(0.01)

    assert asyncio.run(scenario()) == (None, None)


def test_the_hub_fans_an_update_out_to_the_streams_of_its_sku_only():
    async def scenario() -> tuple[object, object, object, int]:
        hub = LiveHub(settings)
        hub._ensure_running = lambda: None  # no Redis in unit tests
        ab = hub.open(("A", "B"))
        a = hub.open(("A",))
        c = hub.open(("C",))
        hub.dispatch(upd("B", 3))
        got = (await ab.next(0.01), await a.next(0.01), await c.next(0.01))
        hub.close(ab)
        hub.close(a)
        hub.close(c)
        return (*got, len(hub._by_sku))

    assert asyncio.run(scenario()) == (upd("B", 3), None, None, 0)


def test_a_stream_opened_while_subscribed_resyncs_first():
    async def scenario() -> object:
        hub = LiveHub(settings)
        hub._ensure_running = lambda: None
        hub.subscribed = True
        return await hub.open(("A",)).next(0.01)

    assert asyncio.run(scenario()) is RESYNC


def test_the_product_page_ships_with_the_package_and_uses_the_live_stream():
    html = product_html()
    for marker in ('id="available"', 'id="status"', 'id="version"', "EventSource(", "Preorder"):
        assert marker in html
    assert "http://" not in html and "https://" not in html  # no external resources


# --- serving over real HTTP (aiohttp's test server; no Redis: nothing is subscribed) ---


def sample(counter: object, *labels: str) -> float:
    return counter.labels(*labels)._value.get()  # type: ignore[attr-defined]


async def _hub_server(cap: int) -> tuple[LiveHub, TestServer]:
    hub = LiveHub(replace(settings, live_max_connections=cap))
    hub._ensure_running = lambda: None  # type: ignore[method-assign]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await hub.serve(request, parse_skus(request.query.getall("sku", [])))

    application = web.Application()
    application.router.add_get("/live/stock", handler)
    server = TestServer(application)
    await server.start_server()
    return hub, server


def test_past_the_cap_a_stream_is_refused_503_with_retry_after_until_one_closes() -> None:
    async def scenario() -> None:
        hub, server = await _hub_server(cap=2)
        refused = sample(live.REFUSED, "capacity")
        try:
            async with ClientSession() as session:
                url = server.make_url("/live/stock?sku=A")
                first = await session.get(url)
                second = await session.get(url)
                for r in (first, second):
                    assert r.status == 200
                    assert await r.content.readline() == b"retry: 1000\n"
                third = await session.get(url)
                assert third.status == 503
                assert third.headers["Retry-After"] == str(live.RETRY_AFTER_S)
                body = await third.json()
                assert body["error"] == "too_many_streams" and "2" in body["detail"]
                assert sample(live.REFUSED, "capacity") == refused + 1
                assert len(hub._subs) == 2
                first.close()  # the client leaves: the reaper frees its slot
                deadline = asyncio.get_running_loop().time() + 5
                while hub.full:
                    assert asyncio.get_running_loop().time() < deadline, "slot not freed"
                    await asyncio.sleep(0.05)
                fourth = await session.get(url)
                assert fourth.status == 200
                second.close()
                fourth.close()
        finally:
            await hub.stop()
            await server.close()

    asyncio.run(scenario())


def test_an_idle_stream_wakes_only_for_its_heartbeat_and_its_updates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, an idle stream woke every WAKE_S (1 s); now only when its heartbeat is
    due, or for an update."""
    monkeypatch.setattr(live, "HEARTBEAT_S", 2.5)

    async def scenario() -> tuple[float, float, list[bytes]]:
        hub, server = await _hub_server(cap=10)
        timer, item = sample(live.WAKEUPS, "timer"), sample(live.WAKEUPS, "item")
        lines: list[bytes] = []
        try:
            async with ClientSession() as session:
                resp = await session.get(server.make_url("/live/stock?sku=A"))
                assert await resp.content.readline() == b"retry: 1000\n"
                await asyncio.sleep(0.3)
                hub.dispatch(upd("A", 4))
                async with asyncio.timeout(5):
                    while not any(line.startswith(b"data:") for line in lines):
                        lines.append(await resp.content.readline())
                await asyncio.sleep(2.0)  # idle: less than a heartbeat since the event
                assert sample(live.WAKEUPS, "timer") == timer
                async with asyncio.timeout(5):
                    while b": keep-alive\n" not in lines:
                        lines.append(await resp.content.readline())
                resp.close()
        finally:
            await hub.stop()
            await server.close()
        return sample(live.WAKEUPS, "timer") - timer, sample(live.WAKEUPS, "item") - item, lines

    timers, items, lines = asyncio.run(scenario())
    assert (timers, items) == (1, 1), lines
