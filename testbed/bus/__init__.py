"""MQTT message bus shared by the ledger nodes and the market (transport only: bytes in,
bytes out; signing lives in the ledger). See README "Message bus" and `topics` for the
topic scheme.
"""

from testbed.bus.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto, open_bus
from testbed.bus.client import BusClient, BusError, BusMessage, Subscription, TLSOptions
from testbed.bus.tls import TestCA, make_test_ca
from testbed.bus.topics import QOS, TopicError

__all__ = [
    "QOS",
    "BusClient",
    "BusError",
    "BusMessage",
    "EmbeddedBroker",
    "MosquittoBroker",
    "Subscription",
    "TLSOptions",
    "TestCA",
    "TopicError",
    "find_mosquitto",
    "make_test_ca",
    "open_bus",
]
