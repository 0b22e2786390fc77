"""Message bus against real brokers: in-process amqtt and a Mosquitto subprocess."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from testbed.bus import (
    BusClient,
    BusError,
    EmbeddedBroker,
    MosquittoBroker,
    TLSOptions,
    find_mosquitto,
    make_test_ca,
    open_bus,
)
from testbed.bus.client import BrokerAddress

needs_mosquitto = pytest.mark.skipif(
    find_mosquitto() is None,
    reason="mosquitto not installed (apt-get install mosquitto); .ci/run installs it",
)


async def roundtrip(url: str, **kw: object) -> None:
    async with BusClient(url, **kw) as pub, BusClient(url, **kw) as sub:  # type: ignore[arg-type]
        s = await sub.subscribe("testbed/s1/market/+/orders", qos=1)
        await pub.publish("testbed/s1/market/7/orders", b"\x00bid\xff", qos=1)
        await pub.publish("testbed/s1/market/7/awards", "not for s", qos=1)
        await pub.publish("testbed/s1/market/8/orders", "text", qos=0)
        m = await s.get(timeout=5)
        assert (m.topic, m.payload, m.qos, m.retain) == (
            "testbed/s1/market/7/orders", b"\x00bid\xff", 1, False)
        m = await s.get(timeout=5)
        assert (m.topic, m.payload) == ("testbed/s1/market/8/orders", b"text")
        assert m.qos in (0, 1)  # amqtt 0.12 delivers at the subscription's QoS, Mosquitto at 0
        with pytest.raises(TimeoutError):
            await s.get(timeout=0.2)


# -- round trips ------------------------------------------------------------------------------

async def test_roundtrip_embedded() -> None:
    async with EmbeddedBroker() as broker:
        assert broker.url.startswith("mqtt://127.0.0.1:") and broker.port > 0
        await roundtrip(broker.url)


@needs_mosquitto
async def test_roundtrip_mosquitto() -> None:
    async with MosquittoBroker() as broker:
        await roundtrip(broker.url)


async def test_open_bus_starts_embedded_broker() -> None:
    async with open_bus() as bus:
        sub = await bus.subscribe("a/b")
        await bus.publish("a/b", b"x")
        assert (await sub.get(timeout=5)).payload == b"x"


@needs_mosquitto
async def test_overlapping_subscriptions_and_callbacks() -> None:
    async with MosquittoBroker() as broker, BusClient(broker.url) as bus:
        a = await bus.subscribe("testbed/+/meter/+/readings")
        b = await bus.subscribe("testbed/s1/#")
        c = await bus.subscribe("testbed/s1/#")  # same filter twice: both get it
        seen: list[str] = []
        done = asyncio.Event()

        async def handler(msg: object) -> None:
            seen.append(msg.topic)  # type: ignore[attr-defined]
            done.set()

        await bus.on("testbed/s1/ledger/tx", handler)
        await bus.publish("testbed/s1/meter/m1/readings", b"1")
        await bus.publish("testbed/s1/ledger/tx", b"2")
        assert (await a.get(timeout=5)).payload == b"1"
        assert [(await b.get(timeout=5)).payload for _ in range(2)] == [b"1", b"2"]
        assert [(await c.get(timeout=5)).payload for _ in range(2)] == [b"1", b"2"]
        await asyncio.wait_for(done.wait(), 5)
        assert seen == ["testbed/s1/ledger/tx"]
        c.close()  # b still holds the filter: no UNSUBSCRIBE yet
        await bus.publish("testbed/s1/x", b"3")
        assert (await b.get(timeout=5)).payload == b"3"
        b.close()
        await bus.publish("testbed/s1/y", b"4")
        with pytest.raises(TimeoutError):
            await a.get(timeout=0.2)
        with pytest.raises(BusError, match="closed"):
            await b.get(timeout=0.1)
        messages = []
        a.close()
        async for m in a:  # closed: iteration ends
            messages.append(m)
        assert messages == []


async def test_retained_message_reaches_late_subscriber() -> None:
    async with open_bus() as bus:
        await bus.publish("testbed/s1/ledger/blocks/committed", b"tip", retain=True)
        sub = await bus.subscribe("testbed/s1/ledger/blocks/committed")
        m = await sub.get(timeout=5)
        assert m.payload == b"tip" and m.retain


# -- credentials ------------------------------------------------------------------------------

@needs_mosquitto
async def test_credentials_mosquitto() -> None:
    async with MosquittoBroker(username="node1", password="s3cret:/@") as broker:
        host = broker.url.removeprefix("mqtt://")
        await roundtrip(broker.url, username="node1", password="s3cret:/@")
        # credentials in the URL (percent-encoded)
        async with BusClient(f"mqtt://node1:s3cret%3A%2F%40@{host}") as bus:
            assert bus.connected
        with pytest.raises(BusError, match=r"refused.*(user name or password|authori[sz]ed)") as e:
            async with BusClient(broker.url, username="node1", password="wrong"):
                pass
        assert broker.url in str(e.value) and "reason code" in str(e.value)
        assert "wrong" not in str(e.value)
        with pytest.raises(BusError, match="refused"):
            async with BusClient(broker.url):  # anonymous
                pass


async def test_credentials_embedded() -> None:
    async with EmbeddedBroker(username="node1", password="pw") as broker:
        await roundtrip(broker.url, username="node1", password="pw")
        with pytest.raises(BusError, match=r"refused.*reason code") as e:
            async with BusClient(broker.url, username="node1", password="nope"):
                pass
        assert broker.url in str(e.value)
        with pytest.raises(BusError, match="refused"):
            async with BusClient(broker.url):
                pass


async def test_unreachable_broker_is_a_bus_error() -> None:
    from testbed.bus.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BusError, match=f"cannot reach broker {url}"):
        async with BusClient(url, connect_timeout=2):
            pass


def test_url_parsing() -> None:
    a = BrokerAddress.parse("mqtts://u%40x:p%3Aw@broker.lab:18883")
    assert (a.scheme, a.host, a.port, a.username, a.password) == (
        "mqtts", "broker.lab", 18883, "u@x", "p:w")
    assert a.safe_url == "mqtts://broker.lab:18883"
    assert BrokerAddress.parse("mqtt://h").port == 1883
    assert BrokerAddress.parse("mqtts://h").port == 8883
    for bad in ("http://h:1", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(BusError, match="broker URL"):
            BrokerAddress.parse(bad)


# -- TLS --------------------------------------------------------------------------------------

@needs_mosquitto
async def test_tls_mosquitto(tmp_path: Path) -> None:
    async with MosquittoBroker(tls=True, username="u", password="p") as broker:
        assert broker.url.startswith("mqtts://")
        await roundtrip(broker.url, tls=broker.tls_options, username="u", password="p")
        # a client that does not trust the broker's CA is refused
        other = make_test_ca(tmp_path / "other")
        with pytest.raises(BusError, match="not trusted"):
            async with BusClient(broker.url, tls=TLSOptions(ca_file=other.ca_cert),
                                 username="u", password="p"):
                pass
        # system trust store does not know the test CA either
        with pytest.raises(BusError, match="not trusted"):
            async with BusClient(broker.url, username="u", password="p"):
                pass


async def test_tls_embedded() -> None:
    async with EmbeddedBroker(tls=True) as broker:
        assert broker.url.startswith("mqtts://")
        await roundtrip(broker.url, tls=broker.tls_options)


# -- reconnect --------------------------------------------------------------------------------

@needs_mosquitto
async def test_reconnect_after_broker_restart() -> None:
    async with MosquittoBroker() as broker, BusClient(broker.url, client_id="sub-1") as sub_bus, \
            BusClient(broker.url) as pub:
        sub = await sub_bus.subscribe("testbed/s1/ledger/tx")
        await pub.publish("testbed/s1/ledger/tx", b"before")
        assert (await sub.get(timeout=5)).payload == b"before"

        port = broker.port
        await broker.stop()
        await asyncio.sleep(0.3)
        assert not sub_bus.connected and not pub.connected
        # QoS 1 while down: held by the client, sent after the reconnect
        queued = pub.publish_nowait("testbed/s1/ledger/tx", b"while-down", qos=1)
        with pytest.raises(BusError, match="disconnected"):
            pub.publish_nowait("testbed/s1/ledger/tx", b"q0", qos=0)
        await broker.start()
        assert broker.port == port
        await sub_bus.wait_connected(10)
        await pub.wait_connected(10)
        assert sub_bus.reconnects == 1
        # the subscription was renewed on the fresh broker (no persistence there); the
        # queued message may race the re-subscribe, so only what follows is asserted
        await asyncio.wait_for(queued, 10)
        await asyncio.sleep(0.2)
        await pub.publish("testbed/s1/ledger/tx", b"after")
        got = []
        while (m := await sub.get(timeout=5)).payload != b"after":
            got.append(m.payload)
        assert got in ([], [b"while-down"])


async def test_publish_after_close_raises() -> None:
    async with open_bus() as bus:
        pass
    with pytest.raises(BusError, match="closed"):
        await bus.publish("a", b"x")


# -- throughput sanity (counts and order, never time) ----------------------------------------

async def _many(url: str, n: int) -> None:
    async with BusClient(url) as p1, BusClient(url) as p2, BusClient(url) as sub_bus:
        sub = await sub_bus.subscribe("testbed/s1/meter/+/readings")
        t1, t2 = "testbed/s1/meter/a/readings", "testbed/s1/meter/b/readings"
        counts = await asyncio.gather(
            p1.publish_many((t1, b"%d" % i) for i in range(n)),
            p2.publish_many(((t2, b"%d" % i) for i in range(n)), window=100),
        )
        assert counts == [n, n]
        seen: dict[str, list[int]] = {t1: [], t2: []}
        for _ in range(2 * n):
            m = await sub.get(timeout=10)
            seen[m.topic].append(int(m.payload))
        assert seen[t1] == list(range(n)) and seen[t2] == list(range(n))
        assert sub.pending() == 0


@needs_mosquitto
async def test_many_messages_in_order_mosquitto() -> None:
    async with MosquittoBroker() as broker:
        await _many(broker.url, 5000)


async def test_many_messages_in_order_embedded() -> None:
    async with EmbeddedBroker() as broker:
        await _many(broker.url, 5000)


@needs_mosquitto
async def test_publish_nowait_queue_limit() -> None:
    async with MosquittoBroker() as broker, BusClient(broker.url, max_queued=50) as bus:
        futs = [bus.publish_nowait("t", b"x") for _ in range(50)]
        with pytest.raises(BusError, match="already queued"):
            bus.publish_nowait("t", b"x")
        await asyncio.gather(*futs)
        await bus.publish("t", b"room again")


@needs_mosquitto
async def test_burst_of_50k_is_flow_controlled() -> None:
    async with MosquittoBroker() as broker, BusClient(broker.url, max_queued=2_000) as bus:
        n = await bus.publish_many(("testbed/s1/ledger/tx", b"%d" % i) for i in range(50_000))
        assert n == 50_000
        assert len(bus._client._out_messages) == 0  # noqa: SLF001 - nothing left behind


async def check_session_messages_before_subscribe(url: str) -> None:
    """A persistent session's queued messages arrive before the restarted process subscribes
    again: the client holds them and hands them to the subscription when it is made."""
    async with BusClient(url, client_id="held-1") as first:
        await first.subscribe("t/held/#", qos=1)
    async with BusClient(url) as pub:
        for i in range(5):
            await pub.publish(f"t/held/{i}", f"m{i}", qos=1)
        await pub.publish("t/other", "x", qos=1)
    async with BusClient(url, client_id="held-1") as again:
        await asyncio.sleep(0.3)  # the broker delivers the session's queue on connect
        sub = await again.subscribe("t/held/#", qos=1)
        got = [(await sub.get(timeout=5)).payload for _ in range(5)]
        assert got == [f"m{i}".encode() for i in range(5)]
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.2)
        assert again.unclaimed_dropped == 0


@needs_mosquitto
async def test_persistent_session_messages_before_subscribe_mosquitto() -> None:
    async with MosquittoBroker() as broker:
        await check_session_messages_before_subscribe(broker.url)


def test_unclaimed_messages_are_bounded() -> None:
    bus = BusClient("mqtt://127.0.0.1:1", max_unclaimed=3)

    class M:
        def __init__(self, i: int) -> None:
            self.topic, self.payload, self.qos, self.retain = f"a/{i}", b"", 1, False

    for i in range(5):
        bus._on_message(bus._client, None, M(i))  # type: ignore[arg-type]
    assert [m.topic for m in bus._unclaimed] == ["a/2", "a/3", "a/4"]
    assert bus.unclaimed_dropped == 2


async def test_bounded_subscription_drops_the_oldest() -> None:
    async with EmbeddedBroker() as broker, BusClient(broker.url) as bus:
        sub = await bus.subscribe("t/bounded", max_pending=3)
        await bus.publish_many([("t/bounded", str(i)) for i in range(10)])
        await asyncio.sleep(0.3)
        got = [sub.get_nowait() for _ in range(sub.pending())]
        assert [m.payload for m in got] == [b"7", b"8", b"9"] and sub.dropped == 7
