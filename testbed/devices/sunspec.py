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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property, lru_cache
from types import CodeType
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

# type -> (struct format, unimplemented raw value), as pysunspec2's `sunspec2.mb` has them
_FORMATS: dict[str, tuple[str, int | float | None]] = {
    "int16": (">h", ss_mb.SUNS_UNIMPL_INT16),
    "uint16": (">H", ss_mb.SUNS_UNIMPL_UINT16),
    "count": (">H", ss_mb.SUNS_UNIMPL_UINT16),
    "acc16": (">H", ss_mb.SUNS_UNIMPL_ACC16),  # an accumulator of 0 is "not implemented"
    "enum16": (">H", ss_mb.SUNS_UNIMPL_ENUM16),
    "bitfield16": (">H", ss_mb.SUNS_UNIMPL_BITFIELD16),
    "pad": (">H", ss_mb.SUNS_UNIMPL_PAD),
    "sunssf": (">h", ss_mb.SUNS_UNIMPL_SUNSSF),
    "int32": (">i", ss_mb.SUNS_UNIMPL_INT32),
    "uint32": (">I", ss_mb.SUNS_UNIMPL_UINT32),
    "acc32": (">I", ss_mb.SUNS_UNIMPL_ACC32),
    "enum32": (">I", ss_mb.SUNS_UNIMPL_ENUM32),
    "bitfield32": (">I", ss_mb.SUNS_UNIMPL_BITFIELD32),
    "ipaddr": (">I", ss_mb.SUNS_UNIMPL_IPADDR),
    "int64": (">q", ss_mb.SUNS_UNIMPL_INT64),
    "uint64": (">Q", ss_mb.SUNS_UNIMPL_UINT64),
    "acc64": (">Q", ss_mb.SUNS_UNIMPL_ACC64),
    "float32": (">f", None),  # any NaN (pysunspec2: the 0x7fc00000 pattern)
    "float64": (">d", None),
}
_FULL_RANGE = {"acc16", "acc32", "acc64", "pad", "ipaddr"}
"""Types whose "not implemented" value is 0 but whose every bit pattern may be written."""
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

    @cached_property
    def codec(self) -> _Codec:
        return _Codec.of(self)


@dataclass(frozen=True)
class _Codec:
    """How one point's registers become a raw value and back, compiled once per point."""

    value: struct.Struct
    """The value's own format (whole point for strings)."""
    regs: struct.Struct
    """The point as `size` big-endian 16-bit registers."""
    how: str
    """int | float | str | unknown"""
    unimpl: int | float | None
    lo: float
    hi: float

    @classmethod
    def of(cls, p: PointDef) -> _Codec:
        regs = struct.Struct(f">{p.size}H")
        if p.is_string or p.type not in _FORMATS:
            return cls(struct.Struct(f">{2 * p.size}s"), regs, "str" if p.is_string else "unknown",
                       None, 0, 0)
        fmt, unimpl = _FORMATS[p.type]
        if fmt in _RAW_RANGE:
            lo, hi = _RAW_RANGE[fmt]
            if p.type in _FULL_RANGE:
                lo, hi = 0, 2 ** (8 * struct.calcsize(fmt)) - 1
            return cls(struct.Struct(fmt), regs, "int", unimpl, lo, hi)
        return cls(struct.Struct(fmt), regs, "float", None, -math.inf, math.inf)


@dataclass(frozen=True)
class ModelDef:
    """A SunSpec model's points in register order, located relative to its `ID` register.

    Points of groups that occur once (704's `PFWInj`) are named `GROUP.POINT`. Repeating
    groups (160's modules, 705's curves and their points) depend on counts the device
    reports, so `model_def` leaves them out (`length` is the fixed part) and `expand`
    lays them out for one device as `GROUP[i].POINT`, `GROUP[i].SUB[j].POINT` (1-based).
    """

    id: int
    name: str
    length: int
    points: Mapping[str, PointDef]
    repeating: tuple[Mapping[str, Any], ...] = field(default=(), compare=False)
    """Definitions of the repeating groups not yet laid out (pysunspec2's JSON)."""

    @cached_property
    def slots(self) -> dict[str, tuple[int, struct.Struct, str, int | float | None, str | int | None]]:
        """Per point: byte offset, value struct, kind (int/float/str/unknown), "not
        implemented" value, scale factor (SF point name or exponent; integers only)."""
        return {p.name: (2 * p.offset, p.codec.value, p.codec.how, p.codec.unimpl,
                         p.sf if p.codec.how == "int" else None)
                for p in self.points.values()}

    def point(self, name: str) -> PointDef:
        try:
            return self.points[name]
        except KeyError:
            raise SunSpecError(
                f"model {self.id} ({self.name}) has no point {name!r}; "
                f"points are: {', '.join(self.points)}") from None


def _count(g: Mapping[str, Any]) -> int | str | None:
    c = g.get(ss_mdef.COUNT)
    return None if c is None or c == 1 else c


def _place(model_id: int, g: Mapping[str, Any], prefix: str, offset: int,
           points: dict[str, PointDef], counts: Mapping[str, int] | None,
           room: int) -> tuple[int, list[Mapping[str, Any]]]:
    """Lay out a group's points from `offset`: once-only subgroups inline, repeating ones
    with `counts` (None: left out and returned). Returns the end offset."""
    for p in g.get(ss_mdef.POINTS, []):
        size = int(p.get(ss_mdef.SIZE, 1))
        name = prefix + p[ss_mdef.NAME]
        points[name] = PointDef(
            model_id=model_id, name=name, type=p[ss_mdef.TYPE], size=size, offset=offset,
            sf=p.get(ss_mdef.SF), access=p.get(ss_mdef.ACCESS, "R"), units=p.get(ss_mdef.UNITS),
            label=p.get(ss_mdef.LABEL), mandatory=p.get(ss_mdef.MANDATORY) == "M",
            static=p.get(ss_mdef.STATIC) == "S",
            symbols={s[ss_mdef.NAME]: int(s[ss_mdef.VALUE]) for s in p.get(ss_mdef.SYMBOLS, [])})
        offset += size
    left: list[Mapping[str, Any]] = []
    for sub in g.get(ss_mdef.GROUPS, []):
        count = _count(sub)
        if count is None:
            offset, more = _place(model_id, sub, f"{prefix}{sub[ss_mdef.NAME]}.", offset, points,
                                  counts, room)
            left += more
            continue
        if counts is None:
            left.append(sub)
            continue
        if isinstance(count, str):
            n = counts.get(count)
            if n is None:
                raise SunSpecError(f"model {model_id}: group {sub[ss_mdef.NAME]} counts by "
                                   f"{count}, which the device does not implement")
        elif count == 0:  # as many as the model's length holds (pysunspec2 does the same)
            one = _group_len(model_id, sub)
            n = max(0, (room - offset) // one) if one else 0
        else:
            n = int(count)
        for i in range(1, n + 1):
            offset, _ = _place(model_id, sub, f"{prefix}{sub[ss_mdef.NAME]}[{i}].", offset, points,
                               counts, room)
    return offset, left


def _group_len(model_id: int, g: Mapping[str, Any]) -> int:
    scratch: dict[str, PointDef] = {}
    end, left = _place(model_id, g, "", 0, scratch, None, 0)
    if left:
        raise SunSpecError(f"model {model_id}: group {g[ss_mdef.NAME]} repeats inside a group "
                           "counted by the model's length")
    return end


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
    end, left = _place(model_id, group, "", 0, points, None, 0)
    # Fixed length = points after ID and L; repeating groups are laid out per device.
    return ModelDef(id=model_id, name=group[ss_mdef.NAME], length=end - 2, points=points,
                    repeating=tuple(left))


def expand(md: ModelDef, length: int, fixed: Mapping[str, Any]) -> ModelDef:
    """`md` with its repeating groups laid out for a device whose model is `length`
    registers long (its `L`) and whose fixed points read `fixed` (the counts)."""
    if not md.repeating:
        return md
    counts = {k: int(v) for k, v in fixed.items()
              if isinstance(v, int) and md.points.get(k) is not None
              and md.points[k].type in ("count", "uint16")}
    points = dict(md.points)
    group = {ss_mdef.NAME: md.name, ss_mdef.GROUPS: list(md.repeating)}
    end, _ = _place(md.id, group, "", md.length + 2, points, counts, length + 2)
    if end > length + 2:
        raise SunSpecError(f"model {md.id}: its groups need {end - 2} registers, "
                           f"the device says L={length}")
    return ModelDef(md.id, md.name, end - 2, points)


def fit(md: ModelDef, length: int, fixed: Mapping[str, Any] | None) -> ModelDef:
    """`md` as one device has it: cut to a shorter `L` (an older revision, model 1 with
    L=65 as pysunspec2 allows), or with its repeating groups laid out from the counts in
    `fixed` (None: the fixed part only)."""
    if md.length > length:
        points = {n: p for n, p in md.points.items() if p.offset + p.size <= length + 2}
        return ModelDef(md.id, md.name, length, points)
    if not md.repeating or fixed is None:
        return md
    return expand(md, length, fixed)


# --------------------------------------------------------------------------- point codec


def encode_raw(p: PointDef, raw: int | float | str | None) -> list[int]:
    """Raw (unscaled) value -> registers; None encodes the "not implemented" pattern."""
    c = p.codec
    if c.how == "str":
        data = b"" if raw is None else str(raw).encode("utf-8")
        if len(data) > 2 * p.size:
            raise SunSpecError(f"{p.name}: string {raw!r} longer than {2 * p.size} bytes")
        return list(c.regs.unpack(data.ljust(2 * p.size, b"\0")))
    if c.how == "unknown":
        raise SunSpecError(f"{p.name}: unsupported SunSpec type {p.type!r}")
    if raw is None:
        if p.type == "float32":
            data = struct.pack(">I", ss_mb.SUNS_UNIMPL_FLOAT32)
        elif p.type == "float64":
            data = struct.pack(">Q", ss_mb.SUNS_UNIMPL_FLOAT64)
        else:
            data = c.value.pack(c.unimpl or 0)
    elif c.how == "int":
        if not c.lo <= raw <= c.hi:
            raise SunSpecError(f"{p.name}: raw value {raw} outside {p.type} range {c.lo}..{c.hi}")
        data = c.value.pack(int(raw))
    else:
        data = c.value.pack(float(raw))
    return list(c.regs.unpack(data))


def _finish(how: str, unimpl: int | float | None, value: Any) -> int | float | str | None:
    """Unpacked value -> raw value, None where SunSpec means "not implemented"."""
    if how == "int":
        return None if value == unimpl else value
    if how == "str":  # as pysunspec2: a leading NUL is "not implemented"; trailing NULs go
        return None if not value or value[0] == 0 else \
            value.decode("utf-8", errors="replace").rstrip("\0")
    if how == "float":
        return None if value != value else value  # NaN
    return None


def decode_raw(p: PointDef, regs: Sequence[int]) -> int | float | str | None:
    """Registers -> raw value; None when the device marks the point not implemented."""
    c = p.codec
    return _finish(c.how, c.unimpl, c.value.unpack_from(c.regs.pack(*regs[: p.size]))[0])


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
    def build(cls, model_ids: Iterable[int | ModelDef], base: int = 40000) -> RegisterMap:
        """Lay out `SunS`, then each model (ID, L, points), then the end model. A model
        with repeating groups is given as its `expand`ed definition."""
        regs: list[int] = list(SUNS_MARKER)
        models: list[ModelInstance] = []
        for m in model_ids:
            md = m if isinstance(m, ModelDef) else model_def(m)
            mid = md.id
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

    def __post_init__(self) -> None:
        # (model id, point) -> (register index, definition): set/get are on the emulator's
        # per-read path, so lookups are one dict access.
        self._slots: dict[tuple[int, str], tuple[int, PointDef]] = {
            (m.id, p.name): (m.address - self.base + p.offset, p)
            for m in reversed(self.models) for p in m.definition.points.values()
        }  # reversed: with a model twice, the first one wins, as in `model()`
        self._sf: dict[tuple[int, str], int] = {}
        """Scale-factor exponents; SF points are read-only on the wire, so only `_store`
        (behind `set_raw` and `set`) changes them, and it drops the cache."""
        self._ints: dict[tuple[int, str], tuple[int, int, str | int | None, int, int]] = {
            key: (i, p.size, p.sf, int(p.codec.lo), int(p.codec.hi))
            for key, (i, p) in self._slots.items()
            if p.codec.how == "int" and p.type != "sunssf"
        }
        """Integer points (all but scale factors): (index, size, SF, lo, hi). An emulator
        refills its map on every physics step, so `set`/`set_raw` store these without
        struct: a big-endian two's-complement value split into 16-bit registers."""
        self._unit: dict[tuple[int, str], float] = {}
        """Per scaled point, 10 ** its SF exponent; dropped with `_sf`."""
        self._sf_epoch = 0
        """Bumped whenever a scale factor may have changed (what `writer`s check)."""

    def copy(self) -> RegisterMap:
        """The same map with its own registers (an emulator's trial of a write). The
        lookup tables depend on the layout only and are shared: building them again took
        ~100 us, most of a setpoint write's cost on the emulator side."""
        new = object.__new__(RegisterMap)
        new.base, new.models, new.registers = self.base, self.models, list(self.registers)
        new._slots, new._ints = self._slots, self._ints
        new._sf, new._unit = dict(self._sf), dict(self._unit)
        new._sf_epoch = self._sf_epoch
        return new

    # -- lookup
    def model(self, model_id: int) -> ModelInstance:
        for m in self.models:
            if m.id == model_id:
                return m
        raise SunSpecError(f"model {model_id} is not in this map (has {[m.id for m in self.models]})")

    def slot(self, model_id: int, point: str) -> tuple[int, PointDef]:
        try:
            return self._slots[(model_id, point)]
        except KeyError:
            self.model(model_id).definition.point(point)  # raises the specific error
            raise

    def address_of(self, model_id: int, point: str) -> int:
        return self.base + self.slot(model_id, point)[0]

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
        fast = self._ints.get((model_id, point))
        if fast is not None and raw is not None and not isinstance(raw, str) \
                and fast[3] <= raw <= fast[4]:
            self._put(fast[0], fast[1], int(raw))
            return
        i, p = self.slot(model_id, point)
        self._store(i, p, raw)

    def _put(self, i: int, size: int, raw: int) -> None:
        """An in-range integer into `size` registers from index i, as `encode_raw` does."""
        regs = self.registers
        if size == 1:
            regs[i] = raw & 0xFFFF
        elif size == 2:
            raw &= 0xFFFFFFFF
            regs[i] = raw >> 16
            regs[i + 1] = raw & 0xFFFF
        else:
            raw &= (1 << 16 * size) - 1
            for k in range(size - 1, -1, -1):
                regs[i + k] = raw & 0xFFFF
                raw >>= 16

    def get_raw(self, model_id: int, point: str) -> int | float | str | None:
        i, p = self.slot(model_id, point)
        return decode_raw(p, self.registers[i: i + p.size])

    # -- engineering values
    def scale_of(self, model_id: int, p: PointDef) -> int:
        if p.sf is None:
            return 0
        if isinstance(p.sf, int):
            return p.sf
        key = (model_id, p.sf)
        cached = self._sf.get(key)
        if cached is None:
            sf = self.get_raw(model_id, p.sf)
            cached = self._sf[key] = int(sf) if sf is not None else 0
        return cached

    def set(self, model_id: int, point: str, value: float | int | str | None) -> None:
        """Store an engineering value, applying the point's scale factor (saturating)."""
        key = (model_id, point)
        fast = self._ints.get(key)
        if fast is not None and value is not None and not isinstance(value, str):
            i, size, sf, lo, hi = fast
            if sf is None:
                if lo <= value <= hi:
                    self._put(i, size, int(value))
                    return
            else:
                unit = self._unit.get(key)
                if unit is None:
                    unit = self._unit[key] = 10.0 ** self.scale_of(model_id, self._slots[key][1])
                raw = round(float(value) / unit)
                raw = lo if raw < lo else hi if raw > hi else raw
                if size == 1:
                    self.registers[i] = raw & 0xFFFF
                else:
                    self._put(i, size, raw)
                return
        i, p = self.slot(model_id, point)
        c = p.codec
        if value is not None and c.how == "int" and p.sf is not None:
            raw = round(float(value) / 10.0 ** self.scale_of(model_id, p))
            value = max(c.lo, min(c.hi, raw))
        self._store(i, p, value)

    def writer(self, model_id: int, points: Sequence[str]) -> Callable[..., None]:
        """`set` of several points of one model in one call, values in the order of
        `points`: an emulator refills its dynamic points on every physics step, and one
        `set` per point (a key, two lookups, a call) was most of that. The writer is
        straight-line code made for these points (as `dataclasses` makes `__init__`):
        register indexes, ranges and units as constants, made again after a scale factor
        changes. Anything but an integer point given a number (None, a float or string
        point, out of a raw range) goes through `set`, errors included."""
        names = tuple(points)
        for name in names:
            self.slot(model_id, name)  # an unknown point fails here, not on the first fill

        def make() -> Callable[..., None]:
            args = ", ".join(f"v{k}" for k in range(len(names)))
            body = [f"def put({args}):",
                    f"    if m._sf_epoch != {self._sf_epoch}:",
                    f"        return remake()({args})",
                    "    r = m.registers"]
            for k, name in enumerate(names):
                v = f"v{k}"
                fast = self._ints.get((model_id, name))
                slow = f"set_({model_id}, {name!r}, {v})"
                if fast is None:
                    body.append(f"    {slow}")
                    continue
                i, size, sf, lo, hi = fast
                if size == 1:
                    store = f"r[{i}] = x & 0xFFFF"
                elif size == 2:
                    store = f"x &= 0xFFFFFFFF; r[{i}] = x >> 16; r[{i + 1}] = x & 0xFFFF"
                else:
                    store = f"put_({i}, {size}, x)"
                body.append(f"    if {v} is None or {v}.__class__ is str:")
                body.append(f"        {slow}")
                if sf is None:
                    body.append(f"    elif {lo} <= {v} <= {hi}:")
                    body.append(f"        x = int({v}); {store}")
                    body.append("    else:")
                    body.append(f"        {slow}")
                else:
                    unit = 10.0 ** self.scale_of(model_id, self._slots[(model_id, name)][1])
                    body.append("    else:")
                    body.append(f"        x = round({v} / {unit!r})")
                    body.append(f"        x = {lo} if x < {lo} else {hi} if x > {hi} else x; {store}")
            scope: dict[str, Any] = {"m": self, "set_": self.set, "put_": self._put,
                                     "remake": remake}
            exec(_compiled("\n".join(body)), scope)  # noqa: S102 - our own code, from the map's layout
            return scope["put"]

        current: list[Any] = [None, -1]  # the writer, and the scale factors' epoch it is for

        def remake() -> Callable[..., None]:
            """The writer for the scale factors as they are now."""
            if current[1] != self._sf_epoch:
                current[0], current[1] = make(), self._sf_epoch
            return current[0]

        return remake()

    def _store(self, i: int, p: PointDef, raw: int | float | str | None) -> None:
        if p.type == "sunssf":
            self._sf.clear()
            self._unit.clear()
            self._sf_epoch += 1
        self.registers[i: i + p.size] = encode_raw(p, raw)

    def get(self, model_id: int, point: str) -> float | int | str | None:
        i, p = self.slot(model_id, point)
        raw = decode_raw(p, self.registers[i: i + p.size])
        if raw is None or p.sf is None or isinstance(raw, str):
            return raw
        return raw * 10.0 ** self.scale_of(model_id, p)


@lru_cache(maxsize=256)
def _compiled(source: str) -> CodeType:
    """A writer's code, compiled once per text: devices of one kind and rating share it
    (compiling was ~2 ms per device of a site's start-up; executing the code ~10 us)."""
    return compile(source, "<RegisterMap.writer>", "exec")


_MISSING: Any = object()


class ModelValues(Mapping[str, Any]):
    """A model's values in engineering units, each decoded on first access.

    The driver polls whole models but uses a handful of points, so decoding lazily keeps
    the per-poll cost low; scale factors come from the same model's SF points. `data` is
    the raw bytes of a read that contains the model at byte `offset` (its ID register).
    """

    __slots__ = ("_cache", "_data", "_offset", "_slots", "definition")

    def __init__(self, definition: ModelDef, data: bytes, offset: int = 0) -> None:
        if len(data) < offset + 2 * (definition.length + 2):
            raise SunSpecError(f"model {definition.id}: {(len(data) - offset) // 2} registers, "
                               f"the definition needs {definition.length + 2}")
        self.definition = definition
        self._data = data
        self._offset = offset
        self._slots = definition.slots
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_registers(cls, definition: ModelDef, regs: Sequence[int]) -> ModelValues:
        return cls(definition, struct.pack(f">{len(regs)}H", *regs))

    def get(self, name: str, default: Any = None) -> Any:
        """The point's engineering value (None: not implemented), `default` when the model
        has no such point. The driver's per-poll path: one call per point, no exception."""
        value = self._cache.get(name, _MISSING)
        if value is not _MISSING:
            return value
        slot = self._slots.get(name)
        if slot is None:
            return default
        offset, value_struct, how, unimpl, sf = slot
        value = value_struct.unpack_from(self._data, self._offset + offset)[0]
        if how == "int":  # the common case of _finish, inline
            if value == unimpl:
                value = None
            elif sf is not None:
                exp = sf if type(sf) is int else self.get(sf)
                if exp:
                    value = value * 10.0 ** exp
        else:
            value = _finish(how, unimpl, value)
        self._cache[name] = value
        return value

    def __getitem__(self, name: str) -> Any:
        value = self.get(name, _MISSING)
        if value is _MISSING:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.definition.points)

    def __len__(self) -> int:
        return len(self.definition.points)


def decode_model(md: ModelDef, regs: Sequence[int]) -> dict[str, float | int | str | None]:
    """Decode all of a model's registers (starting at its ID register) at once."""
    return dict(ModelValues.from_registers(md, regs))
