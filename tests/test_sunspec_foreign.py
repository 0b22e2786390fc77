"""Our driver against SunSpec devices this project did not build.

Each register image is laid out and encoded by pysunspec2's own model code
(`sunspec2.device.Model(...).get_mb()`), served by a plain pymodbus server (SimData), and
written values are read back with pysunspec2's own Modbus client. Layouts: legacy int+SF
(1+103+120+123), float 111-113, hybrid 103+124 without 802, 802+124, IEEE 1547 701-713,
vendor models, an end model without its length register, unit ids other than 1 and the
base addresses 0, 40000 and 50000.
"""

from __future__ import annotations

import asyncio

import pytest
import sunspec2.modbus.client as ss_client
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from sunspec2 import device as ss_device

from testbed.devices.driver import DeviceKind, NotSunSpec, SetpointRejected
from testbed.devices.modbus import ModbusLink, SunSpecDevice

COMMON = (1, {"Mn": "Foreign", "Md": "X1", "SN": "F-1"})


def image(models, *, end_length: bool = True) -> list[int]:
    """`SunS`, each model as pysunspec2 encodes it (vendor ids: ID, L, zeros), the end model."""
    data = b"SunS"
    for mid, values in models:
        if mid >= 64000:
            n = values.get("L", 4)
            data += mid.to_bytes(2, "big") + n.to_bytes(2, "big") + b"\x12\x34" * n
        else:  # every repeating group's count point 1, unless given
            counts = {c: 1 for c in _count_points(ss_device.get_model_def(mid)["group"])}
            values = dict(values)
            length = values.pop("_L", 0)  # a length other than the definition's
            data += ss_device.Model(model_id=mid, model_len=length,
                                    data={**counts, **values}).get_mb()
    data += b"\xff\xff" + (b"\x00\x00" if end_length else b"")
    return [int.from_bytes(data[i: i + 2], "big") for i in range(0, len(data), 2)]


def _count_points(group) -> list[str]:
    out = []
    for g in group.get("groups", []):
        if isinstance(g.get("count"), str):
            out.append(g["count"])
        out += _count_points(g)
    return out


class Served:
    """A plain pymodbus server holding one register image per unit."""

    def __init__(self, images: dict[int, list[int]], base: int = 40000) -> None:
        self.images, self.base = images, base

    async def __aenter__(self) -> Served:
        devices = [SimDevice(unit, [SimData(self.base, values=regs, datatype=DataType.REGISTERS)])
                   for unit, regs in self.images.items()]
        self.server = ModbusTcpServer(devices, address=("127.0.0.1", 0))
        await self.server.serve_forever(background=True)
        self.port = self.server.transport.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.shutdown()

    def device(self, unit: int = 1, kind: str | None = None, **kw) -> SunSpecDevice:
        return SunSpecDevice(f"dev{unit}", ModbusLink("127.0.0.1", self.port), unit, kind, **kw)

    async def pysunspec2(self, unit: int = 1) -> ss_client.SunSpecModbusClientDeviceTCP:
        """pysunspec2's own client, scanned (in a thread: it blocks)."""
        def scan() -> ss_client.SunSpecModbusClientDeviceTCP:
            dev = ss_client.SunSpecModbusClientDeviceTCP(slave_id=unit, ipaddr="127.0.0.1",
                                                        ipport=self.port, timeout=2)
            dev.scan()
            return dev
        return await asyncio.to_thread(scan)


LEGACY_PV = [
    COMMON,
    (103, {"A": 2170, "A_SF": -2, "PhVphA": 2301, "V_SF": -1, "W": 4990, "W_SF": 0, "Hz": 4998,
           "Hz_SF": -2, "VAr": -120, "VAr_SF": 0, "WH": 123456, "WH_SF": 0, "DCW": 520, "DCW_SF": 1,
           "TmpCab": 412, "Tmp_SF": -1, "St": 4, "Evt1": 0}),
    (120, {"DERTyp": 4, "WRtg": 600, "WRtg_SF": 1}),
    (123, {"WMaxLimPct": 100, "WMaxLimPct_SF": 0, "WMaxLim_Ena": 0}),
]


@pytest.mark.parametrize("base", [0, 40000, 50000])
async def test_legacy_int_sf_inverter_at_each_base(base):
    async with Served({1: image(LEGACY_PV)}, base) as srv:
        d = srv.device()
        await d.connect()
        assert d.base == base and d.kind is DeviceKind.PV
        r = await d.read()
        v = r.values
        assert v["p_w"] == 4990 and v["voltage_v"] == pytest.approx(230.1)
        assert v["frequency_hz"] == pytest.approx(49.98) and v["q_var"] == -120
        assert v["energy_wh"] == 123456 and v["dc_w"] == 5200 and v["rating_w"] == 6000
        assert v["temperature_c"] == pytest.approx(41.2) and r.status["state"] == "MPPT"
        await d.write("limit_pct", 40)
        theirs = await srv.pysunspec2()
        ctl = theirs.models[123][0]
        assert ctl.WMaxLimPct.cvalue == 40 and ctl.WMaxLim_Ena.cvalue == 1
        assert (await d.read()).values["limit_pct"] == 40
        await d.close()


@pytest.mark.parametrize("mid", [111, 112, 113])
async def test_float_inverter_111_to_113(mid):
    models = [COMMON, (mid, {"W": 3210.5, "PhVphA": 229.75, "Hz": 50.01, "VAr": 10.5,
                             "WH": 7777.0, "St": 4}), (120, {"DERTyp": 4, "WRtg": 4000, "WRtg_SF": 0})]
    async with Served({1: image(models)}) as srv:
        d = srv.device()
        r = await d.read()
        assert d.kind is DeviceKind.PV
        assert r.values["p_w"] == pytest.approx(3210.5)
        assert r.values["voltage_v"] == pytest.approx(229.75)
        assert r.values["frequency_hz"] == pytest.approx(50.01, abs=1e-4)
        assert r.values["energy_wh"] == pytest.approx(7777.0) and r.values["rating_w"] == 4000
        assert r.values["dc_w"] is None  # NaN: not implemented
        with pytest.raises(SetpointRejected, match=r"limit_pct: .*cannot carry it \(needs 123 or 704\)"):
            await d.write("limit_pct", 50)
        await d.close()


HYBRID = [
    COMMON,
    (103, {"W": -1500, "W_SF": 0, "PhVphA": 2305, "V_SF": -1, "Hz": 5000, "Hz_SF": -2, "St": 4,
           "A": 650, "A_SF": -2}),
    (120, {"DERTyp": 82, "WRtg": 5000, "WRtg_SF": 0, "WHRtg": 1000, "WHRtg_SF": 1,
           "MaxChaRte": 3000, "MaxChaRte_SF": 0, "MaxDisChaRte": 4000, "MaxDisChaRte_SF": 0}),
    (123, {"WMaxLimPct_SF": 0}),
    (124, {"WChaMax": 3300, "WChaMax_SF": 0, "ChaState": 655, "ChaState_SF": -1, "ChaSt": 4,
           "StorCtl_Mod": 0, "InOutWRte_SF": -1, "OutWRte": 0, "InWRte": 0, "MinRsvPct": 10,
           "MinRsvPct_SF": 0}),
]


async def test_hybrid_inverter_with_124_and_no_802_is_a_battery():
    async with Served({1: image(HYBRID)}) as srv:
        d = srv.device()
        r = await d.read()
        assert d.kind is DeviceKind.BATTERY
        v = r.values
        assert v["soc_pct"] == pytest.approx(65.5) and v["p_w"] == -1500
        assert v["capacity_wh"] == 10000 and v["max_charge_w"] == 3300
        assert v["max_discharge_w"] == 4000 and v["soc_min_pct"] == 10
        assert v["voltage_v"] == pytest.approx(230.5) and r.status["state"] == "MPPT"
        assert r.status["charge_status"] == "CHARGING"
        await d.write("power_w", 2000)  # discharge at half the 4000 W rating
        s = (await srv.pysunspec2()).models[124][0]
        assert s.StorCtl_Mod.cvalue == 2 and s.OutWRte.cvalue == pytest.approx(50.0)
        assert (await d.read()).values["setpoint_w"] == pytest.approx(2000)
        await d.write("power_w", -1650)  # charge at half of WChaMax
        s = (await srv.pysunspec2()).models[124][0]
        assert s.StorCtl_Mod.cvalue == 1 and s.InWRte.cvalue == pytest.approx(50.0)
        with pytest.raises(SetpointRejected, match=r"outside -3300 \(charge\) .. \+4000"):
            await d.write("power_w", 5000)
        await d.close()


async def test_802_with_124():
    models = [COMMON,
              (802, {"AHRtg": 200, "WHRtg": 1350, "WChaRteMax": 500, "WDisChaRteMax": 500,
                     "DisChaRte": 0, "SoCMax": 95, "SoCMin": 5, "SoC": 42, "ChaSt": 3, "State": 3,
                     "W": 1200, "V": 4801, "A": -25, "ReqW": 1200, "AHRtg_SF": 0, "WHRtg_SF": 1,
                     "WChaDisChaMax_SF": 1, "DisChaRte_SF": 0, "SoC_SF": 0, "V_SF": -1, "A_SF": 0,
                     "W_SF": 0, "SoH_SF": 0, "DoD_SF": 0}),
              (124, {"WChaMax": 4000, "WChaMax_SF": 0, "ChaState_SF": 0, "InOutWRte_SF": 0})]
    async with Served({5: image(models)}) as srv:  # unit 5
        d = srv.device(5)
        r = await d.read()
        assert d.kind is DeviceKind.BATTERY
        assert r.values["soc_pct"] == 42 and r.values["capacity_wh"] == 13500
        assert r.values["max_discharge_w"] == 5000 and r.values["max_charge_w"] == 4000
        assert r.values["p_w"] == 1200 and r.values["setpoint_w"] == 1200
        assert r.status["state"] == "CONNECTED" and r.status["charge_status"] == "DISCHARGING"
        await d.write("power_w", -2000)
        s = (await srv.pysunspec2(5)).models[124][0]
        assert s.StorCtl_Mod.cvalue == 1 and s.InWRte.cvalue == 50
        await d.close()


IEEE1547 = [
    COMMON,
    (701, {"ACType": 1, "St": 1, "InvSt": 3, "ConnSt": 1, "W": 3500, "W_SF": 0, "Var": -200,
           "Var_SF": 0, "LNV": 2312, "V_SF": -1, "Hz": 50020, "Hz_SF": -3, "TotWhInj": 987654,
           "TotWh_SF": 0, "TmpCab": 35, "Tmp_SF": 0, "A": 152, "A_SF": -1}),
    (702, {"WMaxRtg": 500, "W_SF": 1, "WChaRteMaxRtg": 300, "WDisChaRteMaxRtg": 400,
           "PF_SF": -2, "VA_SF": 0, "Var_SF": 0, "V_SF": 0, "A_SF": 0, "S_SF": 0}),
    (703, {}), (704, {"WMaxLimPctEna": 0, "WMaxLimPct": 1000, "WMaxLimPct_SF": -1,
                      "WSetEna": 0, "WSetMod": 0, "WSet": 0, "WSet_SF": 0, "PF_SF": -2,
                      "WSetPct_SF": 0, "VarSet_SF": 0, "VarSetPct_SF": 0}),
    (705, {"Ena": 0, "NPt": 2, "NCrv": 2, "V_SF": -1, "DeptRef_SF": 0, "RspTms_SF": 0,
           "Crv": [{"ActPt": 2, "Pt": [{"V": 2200, "Var": 30}, {"V": 2500, "Var": -30}]},
                   {"ActPt": 2, "Pt": [{"V": 2100, "Var": 40}, {"V": 2600, "Var": -40}]}]}),
    (706, {}), (707, {}), (708, {}), (709, {}), (710, {}), (711, {}), (712, {}),
    (713, {"WHRtg": 1000, "WH_SF": 1, "SoC": 771, "Pct_SF": -1, "Sta": 0}),
]


def _1547(without=()):
    return [(mid, dict(v)) for mid, v in IEEE1547 if mid not in without]


async def test_ieee1547_only_device_as_pv():
    async with Served({1: image(_1547(without=(713,)))}) as srv:
        d = srv.device()
        r = await d.read()
        assert d.kind is DeviceKind.PV
        v = r.values
        assert v["p_w"] == 3500 and v["q_var"] == -200 and v["voltage_v"] == pytest.approx(231.2)
        assert v["frequency_hz"] == pytest.approx(50.02) and v["energy_wh"] == 987654
        assert v["rating_w"] == 5000 and v["limit_pct"] == 100 and v["limit_enabled"] == 0
        assert r.status["state"] == "MPPT"
        await d.write("limit_pct", 40)
        ctl = (await srv.pysunspec2()).models[704][0]
        assert ctl.WMaxLimPct.cvalue == pytest.approx(40) and ctl.WMaxLimPctEna.cvalue == 1
        await d.close()


async def test_ieee1547_only_device_as_battery_writes_704_wset():
    async with Served({1: image(_1547())}) as srv:
        d = srv.device(kind="battery")
        r = await d.read()
        assert r.values["soc_pct"] == pytest.approx(77.1) and r.values["capacity_wh"] == 10000
        assert r.values["max_charge_w"] == 3000 and r.values["max_discharge_w"] == 4000
        assert r.values["p_w"] == 3500
        await d.write("power_w", -2500)
        ctl = (await srv.pysunspec2()).models[704][0]
        assert ctl.WSet.cvalue == -2500 and ctl.WSetEna.cvalue == 1 and ctl.WSetMod.cvalue == 1
        assert (await d.read()).values["setpoint_w"] == -2500
        await d.close()


async def test_repeating_groups_decode_and_write_by_group_address():
    async with Served({1: image(_1547())}) as srv:
        d = srv.device(kind="pv")
        await d.connect()
        vv = await d.read_model(705)
        assert vv["NCrv"] == 2 and vv["Crv[1].Pt[2].V"] == pytest.approx(250.0)
        assert vv["Crv[2].Pt[1].Var"] == 40 and vv["Crv[2].ActPt"] == 2
        await d.write("705.Crv[1].Pt[2].V", 248.5)
        await d.write("705.Ena", 1)
        theirs = (await srv.pysunspec2()).models[705][0]
        assert theirs.Crv[0].Pt[1].V.cvalue == pytest.approx(248.5)
        assert theirs.Crv[1].Pt[1].V.cvalue == pytest.approx(260.0)  # the neighbour untouched
        assert theirs.Ena.cvalue == 1
        with pytest.raises(SetpointRejected, match=r"no point '705.Crv\[3\].Pt\[1\].V'"):
            await d.write("705.Crv[3].Pt[1].V", 230)
        await d.write("704.WSetEna", "ENABLED")  # an enum by its symbol
        assert (await srv.pysunspec2()).models[704][0].WSetEna.cvalue == 1
        with pytest.raises(SetpointRejected, match=r"'ON' is not a number or one of "
                                                   r"\['DISABLED', 'ENABLED'\]"):
            await d.write("704.WSetEna", "ON")
        await d.close()


async def test_160_mppt_modules():
    models = [*LEGACY_PV, (160, {"DCA_SF": -2, "DCV_SF": -1, "DCW_SF": 0, "DCWH_SF": 0, "N": 3,
                                 "module": [{"ID": 1, "DCW": 1000, "DCV": 3801, "DCWH": 0},
                                            {"ID": 2, "DCW": 2000, "DCV": 3902, "DCWH": 55},
                                            {"ID": 3, "DCW": 3000, "DCV": 4003}]})]
    async with Served({1: image(models)}) as srv:
        d = srv.device()
        await d.connect()
        mppt = await d.read_model(160)
        assert [mppt[f"module[{i}].DCW"] for i in (1, 2, 3)] == [1000, 2000, 3000]
        assert mppt["module[2].DCV"] == pytest.approx(390.2)
        assert mppt["module[1].DCWH"] is None and mppt["module[2].DCWH"] == 55  # acc 0: unset
        await d.close()


async def test_legacy_preference_reads_a_dual_device_through_1xx():
    models = [*LEGACY_PV, *_1547(without=(1, 713))]
    async with Served({1: image(models)}) as srv:
        new = srv.device()
        assert (await new.read()).values["p_w"] == 3500  # 701 by default
        old = SunSpecDevice("old", new.link, 1, prefer="legacy")
        assert (await old.read()).values["p_w"] == 4990  # 103
        await old.write("limit_pct", 30)
        theirs = (await srv.pysunspec2()).models
        assert theirs[123][0].WMaxLimPct.cvalue == 30 and theirs[704][0].WMaxLimPctEna.cvalue == 0
        await new.close()


async def test_vendor_models_skipped_and_end_model_without_length():
    models = [COMMON, (64001, {"L": 6}), *LEGACY_PV[1:], (64100, {"L": 3})]
    async with Served({3: image(models, end_length=False)}, base=50000) as srv:
        d = srv.device(3)
        await d.connect()
        assert [m.id for m in d.models] == [1, 64001, 103, 120, 123, 64100]
        assert d.models[1].definition is None and d.models[1].length == 6
        r = await d.read()
        assert r.values["p_w"] == 4990
        with pytest.raises(SetpointRejected, match=r"vendor model"):
            await d.write("64001.X", 1)
        await d.close()
        theirs = await srv.pysunspec2(3)  # pysunspec2 walks the same map
        assert [k for k in theirs.models if isinstance(k, int)] == [1, 64001, 103, 120, 123, 64100]


async def test_meter_203_accumulator_of_zero_is_not_implemented():
    models = [COMMON, (203, {"W": -800, "W_SF": 0, "TotWhImp": 0, "TotWhExp": 4242, "TotWh_SF": 0,
                             "PhVphA": 2299, "PhV": 2299, "V_SF": -1, "Hz": 5001, "Hz_SF": -2})]
    async with Served({2: image(models)}) as srv:
        d = srv.device(2)
        r = await d.read()
        assert d.kind is DeviceKind.METER
        theirs = (await srv.pysunspec2(2)).models[203][0]
        assert r.values["import_wh"] is None and theirs.TotWhImp.cvalue is None
        assert r.values["export_wh"] == theirs.TotWhExp.cvalue == 4242
        assert r.values["p_w"] == -800 and r.values["voltage_v"] == pytest.approx(229.9)
        await d.close()


async def test_a_battery_without_a_storage_model_says_what_it_needs():
    async with Served({1: image(LEGACY_PV)}) as srv:
        d = srv.device(kind="battery")
        with pytest.raises(NotSunSpec, match=r"configured as battery .*needs 802, or 124 or 713"):
            await d.connect()
        d.link.close()


async def test_common_model_of_65_registers():
    """Older devices end model 1 before its Pad (L=65), which pysunspec2 accepts too."""
    from testbed.devices.modbus import scan

    models = [(1, {"Mn": "OldCo", "Md": "Inv-2", "SN": "OLD-7", "_L": 65}), *LEGACY_PV[1:]]
    async with Served({1: image(models)}) as srv:
        found = await scan("127.0.0.1", srv.port, 1)
        assert [m.id for m in found["models"]] == [1, 103, 120, 123]
        assert found["models"][0].length == 65 and found["common"]["SN"] == "OLD-7"
        d = srv.device()
        assert (await d.read()).values["p_w"] == 4990
        assert d.static[1]["Mn"] == "OldCo"
        await d.close()
