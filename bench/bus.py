"""Message bus throughput: messages/s round-tripped publish → broker → subscriber.

Run:  python bench/bus.py [--messages N] [--payload BYTES] [--quick] [--json PATH]

For each broker (the embedded amqtt broker in this process's event loop, and a Mosquitto
subprocess when installed) and QoS 0 and 1, one `BusClient` publishes N messages of
``--payload`` bytes while another `BusClient` subscribed to the topic receives them; the
figure is N / (first publish → last message received), every message checked to arrive in
order. Two publishing modes: "pipelined" (`publish_many`, a window of unacknowledged
messages) and "sequential" (``await publish()`` per message: one PUBACK round trip each).

Baseline, same run, same Mosquitto: paho's threaded pattern, ``loop_start()`` with the
caller's thread publishing (pipelined: ``publish()`` in a loop; sequential:
``publish().wait_for_publish()``), received by a second ``loop_start()`` client. The
"× loop_start" column is ours / baseline for the same mode and QoS.

Output: a rich table, and as the last line on stdout one JSON object with all figures (also
written to ``--json PATH``). Nothing is asserted: these are figures, not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from testbed.bus import BusClient, EmbeddedBroker, MosquittoBroker, find_mosquitto

TOPIC = "testbed/bench/meter/m1/readings"


def _payloads(n: int, size: int) -> list[bytes]:
    pad = b"x" * max(0, size - 8)
    return [b"%08d" % i + pad for i in range(n)]


async def ours(url: str, n: int, size: int, qos: int, sequential: bool = False) -> float:
    """Messages/s round-tripped through `url` with two BusClients in this event loop."""
    payloads = _payloads(n, size)
    async with BusClient(url) as sub_bus, BusClient(url) as pub:
        sub = await sub_bus.subscribe(TOPIC, qos=qos)
        done = asyncio.Event()
        got = 0
        t_last = 0.0

        async def consume() -> None:
            nonlocal got, t_last
            while got < n:
                m = await sub.get()
                if int(m.payload[:8]) != got:
                    raise AssertionError(f"out of order: {m.payload[:8]!r} at {got}")
                got += 1
            t_last = time.perf_counter()
            done.set()

        task = asyncio.create_task(consume())
        t0 = time.perf_counter()
        if sequential:
            for p in payloads:
                await pub.publish(TOPIC, p, qos)
        else:
            await pub.publish_many(((TOPIC, p) for p in payloads), qos=qos)
        try:
            await asyncio.wait_for(done.wait(), 60)
        except TimeoutError:
            task.cancel()
            raise RuntimeError(f"only {got}/{n} messages arrived (qos {qos})") from None
        await task
        return n / (t_last - t0)


def threaded_baseline(
    host: str, port: int, n: int, size: int, qos: int, sequential: bool = False
) -> float:
    """paho with loop_start(): the caller's thread publishes, paho's threads do the I/O."""
    payloads = _payloads(n, size)
    got = 0
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.max_inflight_messages_set(200)
    pub.max_queued_messages_set(0)
    for c in (sub, pub):
        c.connect(host, port)
        c.loop_start()
    sub.subscribe(TOPIC, qos)
    subscribed.wait(10)
    t0 = time.perf_counter()
    infos = []
    for p in payloads:
        infos.append(pub.publish(TOPIC, p, qos))
        if sequential:
            infos[-1].wait_for_publish(5)
    ok = done.wait(120)
    t1 = time.perf_counter()
    for info in infos[-1:]:
        info.wait_for_publish(5)
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    if not ok:
        raise RuntimeError(f"baseline: only {got}/{n} messages arrived (qos {qos})")
    return n / (t1 - t0)


async def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    n_mq = args.messages or (3_000 if args.quick else 30_000)
    n_emb = max(1, n_mq // 3) if args.quick else max(1, n_mq // 2)
    n_base = n_mq
    n_seq = max(1, n_mq // 3) if args.quick else max(1, n_mq // 6)
    figures: dict[str, Any] = {"payload_bytes": args.payload, "results": []}

    def add(name: str, mode: str, qos: int, n: int, rate: float) -> None:
        figures["results"].append({"broker": name, "mode": mode, "qos": qos, "messages": n,
                                   "msg_per_s": round(rate)})
        console.log(f"{name:28} {mode:10} qos {qos}: {rate:10,.0f} msg/s ({n:,} messages)")

    modes = (("pipelined", False), ("sequential", True))
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    async with EmbeddedBroker() as broker:
        for mode, seq in modes:
            for qos in (0, 1):
                n = n_seq if seq else n_emb
                add("embedded amqtt (in-process)", mode, qos, n,
                    await ours(broker.url, n, args.payload, qos, seq))

    if find_mosquitto() is None:
        console.log("mosquitto not installed: Mosquitto rows and the baseline are skipped")
        return figures
    async with MosquittoBroker() as broker:
        for mode, seq in modes:
            for qos in (0, 1):
                n = n_seq if seq else n_mq
                add("mosquitto, BusClient", mode, qos, n,
                    await ours(broker.url, n, args.payload, qos, seq))
                n = n_seq if seq else n_base
                rate = await asyncio.to_thread(
                    threaded_baseline, broker.host, broker.port, n, args.payload, qos, seq)
                add("mosquitto, paho loop_start", mode, qos, n, rate)
    base = {(r["mode"], r["qos"]): r["msg_per_s"] for r in figures["results"]
            if r["broker"] == "mosquitto, paho loop_start"}
    for r in figures["results"]:  # same broker only: amqtt vs Mosquitto is not like for like
        if r["broker"].startswith("mosquitto") and base.get((r["mode"], r["qos"])):
            r["ratio_to_loop_start"] = round(r["msg_per_s"] / base[(r["mode"], r["qos"])], 2)
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=None,
                    help="messages per pipelined Mosquitto run (embedded: half; sequential: 1/6)")
    ap.add_argument("--payload", type=int, default=400, help="payload size in bytes")
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 20 s)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    t0 = time.perf_counter()
    figures = asyncio.run(run(args, console))
    figures["seconds"] = round(time.perf_counter() - t0, 1)

    table = Table(title=f"bus round trip, {args.payload}-byte payloads (publish → subscriber)")
    for col in ("broker / client", "publishing", "QoS", "messages", "msg/s", "× loop_start"):
        table.add_column(col, justify="left" if col[0] in "bp" else "right")
    for r in figures["results"]:
        ratio = r.get("ratio_to_loop_start")
        table.add_row(r["broker"], r["mode"], str(r["qos"]), f"{r['messages']:,}",
                      f"{r['msg_per_s']:,}", f"{ratio:.1f}" if ratio else "")
    Console(width=max(Console().width, 100)).print(table)
    print(json.dumps(figures, separators=(",", ":")), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
