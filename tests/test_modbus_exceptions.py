"""The emulator server answers malformed requests with the exceptions the Modbus
specification (Application Protocol v1.1b3, 6.3/6.4/6.12) prescribes, checked with a
plain pymodbus client sending the raw request bodies (its own request classes refuse
to encode them)."""

from __future__ import annotations

import struct

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ModbusPDU

from testbed.devices.emulator import EmulatedSite, prosumer_params
from testbed.devices.modbus import ModbusEmulatorServer
from testbed.physics.models import BatteryParams, PVParams


class RawRequest(ModbusPDU):
    """Any function code with any body, as a misbehaving master would send it."""

    def __init__(self, fc: int, body: bytes, dev_id: int = 1) -> None:
        super().__init__(dev_id=dev_id)
        self.function_code, self.body = fc, body

    def encode(self) -> bytes:
        return self.body

    def decode(self, data: bytes) -> None:
        pass


@pytest.fixture
async def client():
    site = EmulatedSite()
    site.add_prosumer("x", prosumer_params(PVParams(), BatteryParams()))
    dev = site.add_device("x-pv", "pv", "x")
    async with ModbusEmulatorServer("127.0.0.1", 0, {1: dev}) as srv:
        c = AsyncModbusTcpClient("127.0.0.1", port=srv.port, timeout=2, retries=0)
        await c.connect()
        yield c
        c.close()


def _read(address: int, count: int) -> bytes:
    return struct.pack(">HH", address, count)


def _write(address: int, values: list[int]) -> bytes:
    return struct.pack(f">HHB{len(values)}H", address, len(values), 2 * len(values), *values)


CASES = [
    ("FC3 quantity 0", 3, _read(40000, 0), 3),
    ("FC3 quantity 126", 3, _read(40000, 126), 3),
    ("FC3 quantity 65535", 3, _read(40000, 65535), 3),
    ("FC4 quantity 0", 4, _read(40000, 0), 3),
    ("FC4 quantity 126", 4, _read(40000, 126), 3),
    ("FC4 quantity 65535", 4, _read(40000, 65535), 3),
    ("FC3 outside the map", 3, _read(1, 2), 2),
    ("FC3 running past the end of the map", 3, _read(65535, 1), 2),
    ("FC16 outside the map", 16, _write(1, [1]), 2),
    ("FC6 outside the map", 6, struct.pack(">HH", 1, 1), 2),
    ("FC16 124 registers", 16, _write(40000, [0] * 124), 3),
    ("FC16 quantity 0", 16, struct.pack(">HHB", 40000, 0, 0), 3),
    ("unknown function code 0x41", 0x41, b"\x00\x00", 1),
    ("unknown function code 0x64", 0x64, b"", 1),
]


@pytest.mark.parametrize(("what", "fc", "body", "code"), CASES, ids=[c[0] for c in CASES])
async def test_malformed_requests_get_the_specified_exception(client, what, fc, body, code):
    rr = await client.execute(False, RawRequest(fc, body))
    assert rr.isError(), what
    assert rr.function_code == fc | 0x80 and rr.exception_code == code, what


async def test_well_formed_edges_are_answered(client):
    rr = await client.execute(False, RawRequest(3, _read(40000, 125)))
    assert not rr.isError() and len(rr.registers) == 125
    rr = await client.execute(False, RawRequest(3, _read(40000, 1)))
    assert not rr.isError() and rr.registers == [0x5375]
    # after all those refusals the connection still serves ordinary requests
    assert (await client.read_holding_registers(40000, count=2, device_id=1)).registers == [0x5375, 0x6E53]
