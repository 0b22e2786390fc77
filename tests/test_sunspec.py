"""Register layouts come from pysunspec2's definitions; the codec round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sunspec2 import device as ss_device

from testbed.devices.sunspec import (
    SUNS_MARKER,
    RegisterMap,
    SunSpecError,
    decode_model,
    decode_raw,
    encode_raw,
    model_def,
    scale_factor_for,
)

MODELS = (1, 103, 120, 123, 124, 203, 802)


@pytest.mark.parametrize("mid", MODELS)
def test_offsets_and_length_match_pysunspec2(mid):
    """Our offsets equal the ones pysunspec2's own device model computes."""
    ours = model_def(mid)
    theirs = ss_device.Model(model_id=mid)
    assert ours.length + 2 == theirs.len  # pysunspec2 counts the ID and L registers
    for name, p in ours.points.items():
        assert theirs.points[name].offset == p.offset, name
        assert theirs.points[name].len == p.size, name


def test_map_starts_with_suns_and_ends_with_end_model():
    m = RegisterMap.build([1, 103, 123])
    assert tuple(m.registers[:2]) == SUNS_MARKER
    assert [x.address for x in m.models] == [40002, 40002 + 68, 40002 + 68 + 52]
    assert m.registers[-2:] == [0xFFFF, 0]
    assert m.registers[2:4] == [1, 66]


def test_scaled_values_round_trip_and_saturate():
    m = RegisterMap.build([1, 103])
    m.set_raw(103, "W_SF", -1)
    m.set(103, "W", 1234.56)
    assert m.get_raw(103, "W") == 12346
    assert m.get(103, "W") == pytest.approx(1234.6)
    m.set(103, "W", 1e9)  # saturates, never wraps
    assert m.get_raw(103, "W") == 32767
    m.set_raw(103, "WH_SF", 0)
    m.set(103, "WH", 3_000_000)  # acc32 spans two registers
    assert m.get(103, "WH") == 3_000_000


def test_a_writer_stores_what_set_stores():
    """`RegisterMap.writer` (an emulator's per-step fill) against `set`, point by point:
    scaled, saturated, two-register, raw, None, out of a raw range (the error of `set`),
    and after a scale factor changed."""
    names = ("W", "WH", "St", "A", "Hz")
    m, ref = RegisterMap.build([1, 103]), RegisterMap.build([1, 103])
    for mp in (m, ref):
        mp.set_raw(103, "W_SF", -1)
        mp.set_raw(103, "A_SF", -2)
    put = m.writer(103, names)
    for values in [(1234.56, 3_000_000, 4, 12.345, None), (1e9, 0, 7, -1e9, None),
                   (-5.04, 2**31, 1, 0.0, None)]:
        put(*values)
        for name, v in zip(names, values, strict=True):
            ref.set(103, name, v)
        assert m.registers == ref.registers
    with pytest.raises(SunSpecError, match="outside"):
        put(0, 0, 70000, 0, None)  # an enum16 has no room for 70000
    m.set_raw(103, "W_SF", 1)  # a scale factor changes: the writer follows
    ref.set_raw(103, "W_SF", 1)
    put(1234.0, 1, 1, 1.0, None)
    for name, v in zip(names, (1234.0, 1, 1, 1.0, None), strict=True):
        ref.set(103, name, v)
    assert m.registers == ref.registers
    assert m.get_raw(103, "W") == 123
    with pytest.raises(SunSpecError, match="no point 'Nope'"):
        m.writer(103, ("W", "Nope"))


def test_unimplemented_values_decode_to_none():
    m = RegisterMap.build([1, 103])
    assert m.get(103, "W") is None  # int16 0x8000
    assert m.get(103, "St") is None  # enum16 0xFFFF
    assert m.get(1, "Mn") is None  # empty string


def test_decode_model_applies_scale_factors():
    m = RegisterMap.build([1, 203])
    m.set_raw(203, "V_SF", -1)
    m.set_raw(203, "TotWh_SF", 1)
    m.set(203, "PhVphA", 229.9)
    m.set(203, "TotWhImp", 12340)
    inst = m.model(203)
    start = inst.address - m.base
    values = decode_model(inst.definition, m.registers[start: start + inst.length + 2])
    assert values["PhVphA"] == pytest.approx(229.9)
    assert values["TotWhImp"] == pytest.approx(12340)


@given(st.integers(-32767, 32767))
def test_int16_codec_round_trip(v):
    p = model_def(103).point("W")
    assert decode_raw(p, encode_raw(p, v)) == v


def test_codec_refuses_values_outside_the_type():
    with pytest.raises(SunSpecError, match="outside uint16"):
        encode_raw(model_def(123).point("WMaxLimPct"), 70000)
    with pytest.raises(SunSpecError, match="longer than"):
        encode_raw(model_def(1).point("Mn"), "x" * 40)


def test_unknown_model_and_point_errors_are_specific():
    with pytest.raises(SunSpecError, match="model 9999"):
        model_def(9999)
    with pytest.raises(SunSpecError, match="no point 'Watts'"):
        model_def(103).point("Watts")


def test_scale_factor_keeps_values_in_int16():
    assert scale_factor_for(5000) == -1 + 1  # 5000 W fits at SF 0 but not at -1 (50000)
    assert scale_factor_for(100) == -2
    assert scale_factor_for(1_000_000) == 2


@pytest.mark.parametrize("mid", (103, 123, 124, 203, 802, 701, 704, 713))
@given(data=st.data())
def test_decode_model_agrees_with_pysunspec2(mid, data):
    """Random register contents decode to the same engineering values as pysunspec2's,
    "not implemented" included (an accumulator of 0 too); 704's once-only groups as
    GROUP.POINT."""
    md = model_def(mid)
    regs = [mid, md.length]
    for p in list(md.points.values())[2:]:
        if p.type == "sunssf":
            regs.append(data.draw(st.sampled_from([0xFFFE, 0xFFFF, 0, 1, 2, 0x8000])))  # -2..2, unset
        elif p.is_string:  # ASCII, NUL-padded (pysunspec2 raises on invalid UTF-8)
            text = data.draw(st.binary(max_size=2 * p.size).filter(lambda b: b.isascii()))
            raw = text.ljust(2 * p.size, b"\0")
            regs += [int.from_bytes(raw[i: i + 2], "big") for i in range(0, len(raw), 2)]
        else:
            regs += data.draw(st.lists(st.integers(0, 0xFFFF), min_size=p.size, max_size=p.size))
    ours = decode_model(md, regs)
    theirs = ss_device.Model(model_id=mid, data=b"".join(r.to_bytes(2, "big") for r in regs))
    for name in md.points:
        group, _, leaf = name.rpartition(".")
        expected = (theirs.groups[group].points[leaf] if group else theirs.points[name]).cvalue
        if isinstance(expected, float):
            assert ours[name] == pytest.approx(expected), name
        else:
            assert ours[name] == expected, name
