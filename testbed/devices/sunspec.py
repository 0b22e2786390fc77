"""SunSpec register layouts built from the model definitions shipped in pysunspec2.

Nothing here hand-types an offset: every point's address, type, size, scale-factor
reference and access comes from `sunspec2/models/json/model_<id>.json`. The module is
transport-free (like pysunspec2 keeps its model apart from Modbus): it turns engineering
values into 16-bit registers and back, and describes where each point lives. The Modbus
server and client in `modbus.py` move those registers.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any

from sunspec2 import device as ss_device
from sunspec2 import mb as ss_mb
from sunspec2 import mdef as ss_mdef

SUNS_MARKER = (0x5375, 0x6E53)  # "SunS"
END_MODEL_ID = ss_mb.SUNS_END_MODEL_ID
BASE_ADDRESSES = (40000, 0, 50000)
"""Where SunSpec devices put the `SunS` marker, in the order the standard says to probe."""
MAX_READ = 125
"""Largest holding-register read a Modbus request may carry."""

# type -> (struct format, unimplemented raw value)
_FORMATS: dict[str, tuple[str, int | float | None]] = {
    "int16": (">h", ss_mb.SUNS_UNIMPL_INT16),
    "uint16": (">H", ss_mb.SUNS_UNIMPL_UINT16),
    "count": (">H", ss_mb.SUNS_UNIMPL_UINT16),
    "acc16": (">H", None),  # accumulators have no "not implemented" value: 0 is a reading
    "enum16": (">H", ss_mb.SUNS_UNIMPL_ENUM16),
    "bitfield16": (">H", ss_mb.SUNS_UNIMPL_BITFIELD16),
    "pad": (">H", None),
    "sunssf": (">h", ss_mb.SUNS_UNIMPL_SUNSSF),
    "int32": (">i", ss_mb.SUNS_UNIMPL_INT32),
    "uint32": (">I", ss_mb.SUNS_UNIMPL_UINT32),
    "acc32": (">I", None),
    "enum32": (">I", ss_mb.SUNS_UNIMPL_ENUM32),
    "bitfield32": (">I", ss_mb.SUNS_UNIMPL_BITFIELD32),
    "ipaddr": (">I", None),
    "int64": (">q", ss_mb.SUNS_UNIMPL_INT64),
    "uint64": (">Q", ss_mb.SUNS_UNIMPL_UINT64),
    "acc64": (">Q", None),
    "float32": (">f", None),
    "float64": (">d", None),
}
_RAW_RANGE = {
    ">h": (-32767, 32767),  # -32768 is "not implemented"
    ">H": (0, 65534),  # 65535 is "not implemented" for most 16-bit types
    ">i": (-(2**31) + 1, 2**31 - 1),
    ">I": (0, 2**32 - 2),
    ">q": (-(2**63) + 1, 2**63 - 1),
    ">Q": (0, 2**64 - 2),
}


class SunSpecError(ValueError):
    """A register map or value that does not fit the SunSpec definitions."""


@dataclass(frozen=True)
class PointDef:
    """One point of a model, located relative to the model's `ID` register."""

    model_id: int
    name: str
    type: str
    size: int
    offset: int
    sf: str | int | None = None
    access: str = "R"
    units: str | None = None
    label: str | None = None
    mandatory: bool = False
    static: bool = False
    symbols: Mapping[str, int] = field(default_factory=dict)

    @property
    def writable(self) -> bool:
        return self.access == "RW"

    @property
    def is_string(self) -> bool:
        return self.type in ("string", "eui48", "ipv6addr")


@dataclass(frozen=True)
class ModelDef:
    """A SunSpec model's fixed block: its length `L` and its points in register order.

    Repeating groups (e.g. model 160's modules) are not expanded; their registers count in
    `length` so the walk over a device's models stays correct.
    """

    id: int
    name: str
    length: int
    points: Mapping[str, PointDef]

    @cached_property
    def decoder(self) -> tuple[struct.Struct, tuple[tuple[str, Any, str, int | None, int | None], ...]]:
        """One struct for the whole fixed block and, per point, how to finish its value.

        The driver decodes every poll, so the per-point work is done once per model here.
        """
        names = list(self.points)
        fmt = ">"
        steps = []
        for p in self.points.values():
            unimpl: int | float | None = None
            if p.is_string:
                fmt, how = fmt + f"{2 * p.size}s", "str"
            elif p.type in _FORMATS:
                f, unimpl = _FORMATS[p.type]
                fmt, how = fmt + f[1:], "float" if p.type in ("float32", "float64") else "int"
            else:
                fmt, how = fmt + f"{2 * p.size}s", "unknown"  # decoded as None
            sf_index = names.index(p.sf) if isinstance(p.sf, str) and p.sf in self.points else None
            sf_const = p.sf if isinstance(p.sf, int) else None
            steps.append((p.name, unimpl, how, sf_index, sf_const))
        return struct.Struct(fmt), tuple(steps)

    def point(self, name: str) -> PointDef:
        try:
            return self.points[name]
        except KeyError:
            raise SunSpecError(
                f"model {self.id} ({self.name}) has no point {name!r}; "
                f"points are: {', '.join(self.points)}") from None


@cache
def model_def(model_id: int) -> ModelDef:
    """Load a model definition from pysunspec2's bundled JSON files."""
    try:
        raw = ss_device.get_model_def(model_id, mapping=False)
    except Exception as exc:  # pysunspec2 raises its own ModelDefinitionError
        raise SunSpecError(f"no SunSpec model definition for model {model_id}: {exc}") from exc
    if raw is None:
        raise SunSpecError(f"no SunSpec model definition for model {model_id}")
    group = raw[ss_mdef.GROUP]
    points: dict[str, PointDef] = {}
    offset = 0
    for p in group.get(ss_mdef.POINTS, []):
        size = int(p.get(ss_mdef.SIZE, 1))
        points[p[ss_mdef.NAME]] = PointDef(
            model_id=model_id,
            name=p[ss_mdef.NAME],
            type=p[ss_mdef.TYPE],
            size=size,
            offset=offset,
            sf=p.get(ss_mdef.SF),
            access=p.get(ss_mdef.ACCESS, "R"),
            units=p.get(ss_mdef.UNITS),
            label=p.get(ss_mdef.LABEL),
            mandatory=p.get(ss_mdef.MANDATORY) == "M",
            static=p.get(ss_mdef.STATIC) == "S",
            symbols={s[ss_mdef.NAME]: int(s[ss_mdef.VALUE]) for s in p.get(ss_mdef.SYMBOLS, [])},
        )
        offset += size
    # Fixed block length = points after ID and L; repeating groups are not counted here.
    return ModelDef(id=model_id, name=group[ss_mdef.NAME], length=offset - 2, points=points)


# --------------------------------------------------------------------------- point codec


def encode_raw(p: PointDef, raw: int | float | str | None) -> list[int]:
    """Raw (unscaled) value -> registers; None encodes the "not implemented" pattern."""
    if p.is_string:
        data = b"" if raw is None else str(raw).encode("utf-8")
        if len(data) > 2 * p.size:
            raise SunSpecError(f"{p.name}: string {raw!r} longer than {2 * p.size} bytes")
        data = data.ljust(2 * p.size, b"\0")
        return list(struct.unpack(f">{p.size}H", data))
    fmt, unimpl = _FORMATS.get(p.type, (None, None))
    if fmt is None:
        raise SunSpecError(f"{p.name}: unsupported SunSpec type {p.type!r}")
    if raw is None:
        if p.type == "float32":
            raw_bytes = struct.pack(">I", ss_mb.SUNS_UNIMPL_FLOAT32)
        elif p.type == "float64":
            raw_bytes = struct.pack(">Q", ss_mb.SUNS_UNIMPL_FLOAT64)
        else:
            raw_bytes = struct.pack(fmt, 0 if unimpl is None else unimpl)
    else:
        if fmt in _RAW_RANGE:
            lo, hi = _RAW_RANGE[fmt]
            if unimpl is None:  # accumulators, pads: every unsigned value is a reading
                lo, hi = 0, 2 ** (8 * struct.calcsize(fmt)) - 1
            if not lo <= int(raw) <= hi:
                raise SunSpecError(f"{p.name}: raw value {raw} outside {p.type} range {lo}..{hi}")
            raw_bytes = struct.pack(fmt, int(raw))
        else:
            raw_bytes = struct.pack(fmt, float(raw))
    return list(struct.unpack(f">{len(raw_bytes) // 2}H", raw_bytes))


def decode_raw(p: PointDef, regs: Sequence[int]) -> int | float | str | None:
    """Registers -> raw value; None when the device marks the point not implemented."""
    data = struct.pack(f">{p.size}H", *regs[: p.size])
    if p.is_string:
        text = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        return text or None
    fmt, unimpl = _FORMATS.get(p.type, (None, None))
    if fmt is None:
        return None
    (value,) = struct.unpack(fmt, data[: struct.calcsize(fmt)])
    if p.type in ("float32", "float64"):
        return None if math.isnan(value) else value
    if unimpl is not None and value == unimpl:
        return None
    return value


def scale_factor_for(max_abs: float, *, digits: int = 4) -> int:
    """Smallest power of ten that keeps `max_abs` inside a signed 16-bit register.

    This is how real devices choose fixed scale factors: resolution where the range allows.
    """
    if max_abs <= 0:
        return 0
    sf = math.ceil(math.log10(max_abs / 32767.0))
    return max(-digits, min(10, sf))


# --------------------------------------------------------------------------- register map


@dataclass(frozen=True)
class ModelInstance:
    """A model placed in a device's map: where its ID register sits."""

    definition: ModelDef
    address: int
    length: int

    @property
    def id(self) -> int:
        return self.definition.id


@dataclass
class RegisterMap:
    """A device's complete SunSpec register image, starting at the `SunS` marker.

    Values are set and read in engineering units; scale factors are applied from the SF
    points of the same model. `registers[i]` is the holding register at `base + i`.
    """

    base: int
    models: list[ModelInstance]
    registers: list[int]

    @classmethod
    def build(cls, model_ids: Iterable[int], base: int = 40000) -> RegisterMap:
        """Lay out `SunS`, then each model (ID, L, points), then the end model."""
        regs: list[int] = list(SUNS_MARKER)
        models: list[ModelInstance] = []
        for mid in model_ids:
            md = model_def(mid)
            address = base + len(regs)
            block = [0] * (md.length + 2)
            for p in md.points.values():
                block[p.offset: p.offset + p.size] = encode_raw(p, None)
            block[0], block[1] = mid, md.length
            regs.extend(block)
            models.append(ModelInstance(md, address, md.length))
        regs.extend([END_MODEL_ID, 0])
        return cls(base=base, models=models, registers=regs)

    @property
    def size(self) -> int:
        """Registers from the marker through the end model (the list may be longer)."""
        last = self.models[-1] if self.models else None
        return (last.address + last.length + 2 - self.base if last else 2) + 2

    # -- lookup
    def model(self, model_id: int) -> ModelInstance:
        for m in self.models:
            if m.id == model_id:
                return m
        raise SunSpecError(f"model {model_id} is not in this map (has {[m.id for m in self.models]})")

    def address_of(self, model_id: int, point: str) -> int:
        m = self.model(model_id)
        return m.address + m.definition.point(point).offset

    def locate(self, address: int) -> tuple[ModelInstance, PointDef] | None:
        """The point that holds `address`, if any."""
        for m in self.models:
            if m.address <= address < m.address + m.length + 2:
                rel = address - m.address
                for p in m.definition.points.values():
                    if p.offset <= rel < p.offset + p.size:
                        return m, p
        return None

    # -- raw access
    def set_raw(self, model_id: int, point: str, raw: int | float | str | None) -> None:
        m = self.model(model_id)
        p = m.definition.point(point)
        i = m.address - self.base + p.offset
        self.registers[i: i + p.size] = encode_raw(p, raw)

    def get_raw(self, model_id: int, point: str) -> int | float | str | None:
        m = self.model(model_id)
        p = m.definition.point(point)
        i = m.address - self.base + p.offset
        return decode_raw(p, self.registers[i: i + p.size])

    # -- engineering values
    def scale_of(self, model_id: int, p: PointDef) -> int:
        if p.sf is None:
            return 0
        if isinstance(p.sf, int):
            return p.sf
        sf = self.get_raw(model_id, p.sf)
        return int(sf) if sf is not None else 0

    def set(self, model_id: int, point: str, value: float | int | str | None) -> None:
        """Store an engineering value, applying the point's scale factor (saturating)."""
        p = self.model(model_id).definition.point(point)
        if value is None or p.is_string or p.sf is None:
            self.set_raw(model_id, point, value)
            return
        raw = round(float(value) / 10.0 ** self.scale_of(model_id, p))
        fmt = _FORMATS[p.type][0]
        if fmt in _RAW_RANGE:
            lo, hi = _RAW_RANGE[fmt]
            raw = max(lo, min(hi, raw))
        self.set_raw(model_id, point, raw)

    def get(self, model_id: int, point: str) -> float | int | str | None:
        p = self.model(model_id).definition.point(point)
        raw = self.get_raw(model_id, point)
        if raw is None or p.sf is None or isinstance(raw, str):
            return raw
        return raw * 10.0 ** self.scale_of(model_id, p)


def decode_model(md: ModelDef, regs: Sequence[int]) -> dict[str, float | int | str | None]:
    """Decode a model's registers (starting at its ID register) into engineering values.

    Unimplemented points decode to None; scale factors from the same model are applied.
    """
    decoder, steps = md.decoder
    n = decoder.size // 2
    if len(regs) < n:
        raise SunSpecError(f"model {md.id}: {len(regs)} registers, the definition needs {n}")
    raw = decoder.unpack(struct.pack(f">{n}H", *regs[:n]))
    out: dict[str, float | int | str | None] = {}
    for (name, unimpl, how, _, _), value in zip(steps, raw, strict=True):
        if how == "str":
            value = value.split(b"\0", 1)[0].decode("utf-8", errors="replace") or None
        elif how == "float":
            value = None if value != value else value  # NaN: not implemented
        elif how == "unknown" or (unimpl is not None and value == unimpl):
            value = None
        out[name] = value
    for name, _, how, sf_index, sf_const in steps:
        value = out[name]
        if how != "int" or value is None or (sf_index is None and not sf_const):
            continue
        sf = sf_const if sf_index is None else out[steps[sf_index][0]]
        if sf:
            out[name] = value * 10.0 ** int(sf)
    return out
