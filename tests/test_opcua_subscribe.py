"""OPC UA subscriptions on our emulator: monitored items follow the moving physics (seen by a
plain asyncua client), and the driver's subscribe mode reads what a poll reads."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from asyncua import Client

from testbed.config import SiteConfig
from testbed.devices.opcua import OpcUaDevice
from testbed.devices.site import BackgroundEmulators, open_devices

USER, PASSWORD = "operator", "s3cret-pw"


def site(mode: str = "poll", **emulation: object) -> SiteConfig:
    extra = {"opcua": {"mode": mode, "publishing_interval_s": 0.05}} if mode == "subscribe" else {}
    return SiteConfig.model_validate({
        "name": "sub", "emulation": {"start": "12:00", "seed": 1, **emulation},
        "opcua": {"allow_insecure": True, "username": USER, "password": PASSWORD},
        "prosumers": [{"name": "p1", "load": {"base_w": 400, "peak_w": 2500, "noise": 0.2},
                       "devices": [
                           {"name": "pv", "kind": "pv", "protocol": "opcua", "port": 0, **extra},
                           {"name": "bat", "kind": "battery", "protocol": "opcua", "port": 0, **extra},
                           {"name": "meter", "kind": "meter", "protocol": "opcua", "port": 0, **extra}]}],
    })


class Counting:
    """asyncua subscription handler: notifications per node, and the last value."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.last: dict[str, float] = {}

    def datachange_notification(self, node, val, data) -> None:
        key = node.nodeid.Identifier
        self.count[key] += 1
        self.last[key] = val


async def test_monitored_items_follow_the_moving_physics():
    # a minute of simulated time per real second, a step every 0.1 s of real time
    with BackgroundEmulators(site(speed=60.0, tick_s=6.0), clock=True) as em:
        ep = em.endpoints["bat"]
        client = Client(f"opc.tcp://{ep.host}:{ep.port}/")
        client.set_user(USER)
        client.set_password(PASSWORD)
        async with client:
            bat = client.get_node("ns=2;s=bat/power_w")
            await bat.write_value(3000.0)  # discharging: SOC moves every step
            handler = Counting()
            sub = await client.create_subscription(50, handler)
            names = ["bat/soc_pct", "bat/p_w", "meter/p_w", "meter/export_wh", "pv/energy_wh"]
            await sub.subscribe_data_change([client.get_node(f"ns=2;s={n}") for n in names])
            await asyncio.sleep(3.0)
            snapshot = dict(handler.count)
            soc = await client.get_node("ns=2;s=bat/soc_pct").read_value()
            await sub.delete()
            await bat.write_value(0.0)
    # before the fix each item sent exactly one notification (its initial value)
    for n in ("bat/soc_pct", "meter/p_w", "meter/export_wh", "pv/energy_wh"):
        assert snapshot[n] >= 8, (n, snapshot)
    physics = em.emulators.physics.prosumers["p1"].state.battery.soc * 100
    # the last notification is at most a step or two behind (the clock kept running)
    assert handler.last["bat/soc_pct"] == pytest.approx(soc, abs=0.3)
    assert handler.last["bat/soc_pct"] < 49.5  # and far from the initial 50 %
    assert soc == pytest.approx(physics, abs=0.5)


async def test_subscribe_mode_read_equals_a_poll_mode_read():
    with BackgroundEmulators(site("subscribe"), clock=False) as em:
        em.step(1.0)
        sub_devs = open_devices(em.site)
        poll_site = em.site.model_copy(update={"prosumers": [p.model_copy(update={"devices": [
            d.model_copy(update={"opcua": None}) for d in p.devices]}) for p in em.site.prosumers]})
        poll_devs = open_devices(poll_site)
        try:
            for d in (*sub_devs.values(), *poll_devs.values()):
                await d.connect()
            assert all(isinstance(d, OpcUaDevice) and d.mode == "subscribe" for d in sub_devs.values())
            await sub_devs["bat"].write("power_w", -2000)
            for _ in range(5):
                em.step(30.0)  # the physics moves; then both kinds of read must agree
                poll = {n: await d.read() for n, d in poll_devs.items()}
                for _ in range(200):  # until the notifications of this step arrived
                    sub = {n: await d.read() for n, d in sub_devs.items()}
                    if all(sub[n].values == poll[n].values for n in poll):
                        break
                    await asyncio.sleep(0.02)
                for n in poll:
                    assert sub[n].values == poll[n].values, n
                    assert sub[n].status == poll[n].status, n
            assert poll["bat"].values["p_w"] == pytest.approx(-2000)
            feed = sub_devs["bat"]._feed
            assert feed is not None and feed.notifications >= 5 * 3  # answered from the subscription
        finally:
            await sub_devs["bat"].write("power_w", 0)
            for d in (*sub_devs.values(), *poll_devs.values()):
                await d.close()


async def test_subscribe_mode_recovers_after_the_server_restarts(caplog):
    from dataclasses import replace

    from testbed.devices.driver import DeviceUnavailable
    from testbed.devices.emulator import EmulatedSite, prosumer_params
    from testbed.devices.opcua import OpcUaEmulatorServer, OpcUaLink, OpcUaSecurity
    from testbed.physics.models import BatteryParams

    em = EmulatedSite()
    em.add_prosumer("x", prosumer_params(None, BatteryParams()))
    devs = {"x-bat": em.add_device("x-bat", "battery", "x")}
    em.step(1.0)
    security = OpcUaSecurity(None, username=USER, password=PASSWORD, accounts={USER: PASSWORD},
                             allow_insecure=True)
    server = OpcUaEmulatorServer("127.0.0.1", 0, devs, security, sample_s=0.02)
    port = await server.start()
    cfg = site("subscribe").prosumers[0].devices[1].opcua
    link = OpcUaLink("127.0.0.1", port, security, timeout_s=1.0, backoff_s=0.1, backoff_max_s=0.2)
    dev = OpcUaDevice("x-bat", link, "battery", config=cfg)
    try:
        await dev.connect()
        assert (await dev.read()).values["soc_pct"] == pytest.approx(50, abs=0.1)
        await server.stop()
        with pytest.raises(DeviceUnavailable, match=r"x-bat \(opc\.tcp://127\.0\.0\.1:\d+ Devices/x-bat\)"):
            for _ in range(40):  # no stale answers from the cache once the session is gone
                await dev.read()
                await asyncio.sleep(0.05)
        server = OpcUaEmulatorServer("127.0.0.1", port, devs, security, sample_s=0.02)
        await server.start()
        pr = em.prosumers["x"]
        pr.update(battery=replace(pr.state.battery, soc=0.42))
        em.step(1.0)
        await asyncio.sleep(0.25)  # past the backoff
        for _ in range(100):
            try:
                r = await dev.read()
            except DeviceUnavailable:
                r = None
            if r is not None and r.values["soc_pct"] == pytest.approx(42, abs=0.1):
                break
            await asyncio.sleep(0.05)
        assert r is not None and r.values["soc_pct"] == pytest.approx(42, abs=0.1)
        feed = dev._feed
        assert feed is not None and feed.generation == link.generation and feed.values
        # the server ends the subscription (as when its lifetime runs out): asyncua hands
        # the handler a StatusChangeNotification; the next read subscribes again
        from asyncua import ua
        feed.status_change_notification(ua.StatusChangeNotification(
            Status=ua.StatusCode(ua.StatusCodes.BadTimeout)))
        assert feed.dead == "BadTimeout"
        r = await dev.read()
        assert r.values["soc_pct"] == pytest.approx(42, abs=0.1)
        assert dev._feed is not feed and dev._feed is not None and not dev._feed.dead
        # the lost session's client is shut down, not left retrying its publish loop
        caplog.clear()
        with caplog.at_level("ERROR", logger="asyncua"):
            await asyncio.sleep(2.5)
        assert not [r for r in caplog.records if "Publish" in r.getMessage()]
    finally:
        await dev.close()
        await server.stop()
