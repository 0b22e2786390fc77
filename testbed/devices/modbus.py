"""SunSpec over Modbus: the client device model, and the names other modules import.

`SunSpecDevice` discovers the SunSpec map (40000, then 0, then 50000), reads the models
it needs in as few requests as possible over a shared `ModbusLink` (`modbus_link.py`),
applies scale factors and maps the values to neutral names (`sunspec_neutral.py`). The
emulator server is in `modbus_server.py`.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from .driver import (
    Device,
    DeviceError,
    DeviceKind,
    DeviceUnavailable,
    NotSunSpec,
    Reading,
    SetpointRejected,
)
from .modbus_link import (
    EXCEPTION_NAMES,
    GATEWAY_SILENT,
    GatewayTargetSilent,
    ModbusExceptionReply,
    ModbusLink,
    RequestTimeout,
    SerialSettings,
)
from .modbus_server import ModbusEmulatorServer, sim_device
from .sunspec import (
    BASE_ADDRESSES,
    END_MODEL_ID,
    MAX_READ,
    SUNS_MARKER,
    ModelDef,
    ModelValues,
    SunSpecError,
    decode_model,
    encode_raw,
    fit,
    model_def,
)
from .sunspec_neutral import (
    INVERTER_MODELS,
    KIND_MODELS,
    KIND_NEEDS,
    METER_MODELS,
    NEUTRAL,
    SETPOINT_NAMES,
    SETPOINT_WRITERS,
    STATIC_MODELS,
    infer_kind,
    kind_models,
)

__all__ = [
    "EXCEPTION_NAMES", "GATEWAY_SILENT", "INVERTER_MODELS", "KIND_MODELS", "METER_MODELS",
    "NEUTRAL",
    "DiscoveredModel", "GatewayTargetSilent", "MapChanged", "ModbusEmulatorServer",
    "ModbusExceptionReply", "ModbusLink", "RequestTimeout", "SerialSettings", "SunSpecDevice",
    "discover", "infer_kind", "kind_models", "plan_reads", "scan", "sim_device",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


VENDOR_MODELS = 64000
"""Model ids from here on are vendor-specific: walked over, never decoded."""


@dataclass(frozen=True)
class DiscoveredModel:
    id: int
    address: int
    length: int
    definition: ModelDef | None

    @property
    def name(self) -> str:
        return self.definition.name if self.definition else "(unknown model)"


async def discover(link: ModbusLink, unit: int, bases: Iterable[int] = BASE_ADDRESSES, *,
                   timeout_s: float | None = None, retries: int = 0,
                   hint: str = "") -> tuple[int, list[DiscoveredModel]]:
    """Find the `SunS` marker and walk the model list up to the end model.

    A timeout or exception at one base address is not a failure: the next is tried. An end
    model without its length register (some devices stop at the ID) ends the walk, as in
    pysunspec2's scan. Raises NotSunSpec naming what each base answered, or RequestTimeout
    when no base answered in time.
    """
    kw: dict[str, Any] = {"timeout_s": timeout_s, "retries": retries, "hint": hint}
    tried: list[str] = []
    timeout: RequestTimeout | None = None
    for base in bases:
        try:
            regs = await link.read(base, 2, unit, **kw)
        except ModbusExceptionReply as exc:
            tried.append(f"{base}: exception {exc.code:02d}")
            continue
        except RequestTimeout as exc:
            if not link.connected:
                raise
            timeout = timeout or exc
            tried.append(f"{base}: no answer")
            continue
        if tuple(regs) != SUNS_MARKER:
            tried.append(f"{base}: {regs[0]:#06x} {regs[1]:#06x} is not 'SunS'")
            continue
        models: list[DiscoveredModel] = []
        addr = base + 2
        for _ in range(256):
            try:
                mid, length = await link.read(addr, 2, unit, **kw)
            except ModbusExceptionReply:  # the end model may stop at its ID register
                (mid,) = await link.read(addr, 1, unit, **kw)
                if mid != END_MODEL_ID:
                    raise
                length = 0
            if mid == END_MODEL_ID:
                return base, models
            try:  # vendor models (64xxx) are skipped by their length, defined or not
                md: ModelDef | None = model_def(mid) if mid < VENDOR_MODELS else None
            except SunSpecError:
                md = None  # unknown: skipped the same way
            models.append(DiscoveredModel(mid, addr, length, md))
            addr += length + 2
        raise NotSunSpec(f"{link.endpoint} unit {unit}: no end model after 256 models at base {base}")
    if timeout is not None:
        raise timeout
    raise NotSunSpec(f"{link.endpoint} unit {unit}: no SunSpec device "
                     f"(no 'SunS' marker; {'; '.join(tried)})")


def plan_reads(models: Sequence[DiscoveredModel], wanted: set[int],
               max_count: int = MAX_READ) -> list[tuple[int, int]]:
    """Cover the wanted models with as few reads of <= max_count registers as possible.

    Models in between are read along (and discarded) when that saves a request: every
    register between the marker and the end model is valid in a SunSpec map.
    """
    spans = sorted((m.address, m.address + m.length + 2) for m in models if m.id in wanted)
    reads: list[tuple[int, int]] = []
    for start, end in spans:
        if reads and end - reads[-1][0] <= max_count:
            reads[-1] = (reads[-1][0], end - reads[-1][0])
            continue
        while end - start > max_count:
            reads.append((start, max_count))
            start += max_count
        reads.append((start, end - start))
    return reads


_HEADER = struct.Struct(">HH")


class MapChanged(NotSunSpec):
    """A model's ID and L registers no longer match the map discovered."""


class SunSpecDevice(Device):
    """A SunSpec device over Modbus (TCP, RTU over TCP, or RTU on a serial port).

    Discovery runs once. A reconnect keeps the map: every poll checks, for free, that each
    model it reads still starts with the ID and L registers discovered there, and only a
    mismatch discovers again; so a link that drops now and then costs no extra requests.
    """

    def __init__(self, name: str, link: ModbusLink, unit: int = 1,
                 kind: DeviceKind | str | None = None, *, timeout_s: float | None = None,
                 retries: int = 1, prefer: str = "ieee1547") -> None:
        self.name = name
        self.link = link
        self.unit = unit
        self.kind = DeviceKind(kind) if kind else None  # type: ignore[assignment]
        self.timeout_s = timeout_s or link.timeout_s
        self.retries = retries
        self.prefer = prefer
        self.base: int | None = None
        self.models: list[DiscoveredModel] = []
        self.static: dict[int, ModelValues] = {}
        self.last: dict[int, ModelValues] = {}
        self._reads: list[tuple[int, int]] = []
        self._wanted: set[int] = set()

    @property
    def endpoint(self) -> str:
        return f"{self.link.endpoint} unit {self.unit}"

    @property
    def _kw(self) -> dict[str, Any]:
        """Per-request settings of this device, and where to change them (built once per
        timeout value: this is on every request's path)."""
        kw = self._kw_cache
        if kw is None or kw["timeout_s"] != self.timeout_s:
            kw = self._kw_cache = {"timeout_s": self.timeout_s, "retries": 0,
                                   "hint": f"raise timeout_s of device {self.name!r} in the site file"}
        return kw

    _kw_cache: dict[str, Any] | None = None

    def _named(self, exc: DeviceError) -> DeviceError:
        """The same kind of error, its message prefixed with this device's name and endpoint."""
        if str(exc).startswith(f"{self.name} ("):
            return exc
        msg = str(exc)
        for where in (f"{self.endpoint}: ", f"{self.link.endpoint}: "):
            msg = msg.removeprefix(where)  # the prefix names it already
        if isinstance(exc, GatewayTargetSilent):
            return DeviceUnavailable(self._err(msg))
        cls = DeviceError if isinstance(exc, ModbusExceptionReply) else type(exc)
        return cls(self._err(msg))

    async def connect(self) -> None:
        await self._retrying(self._discover)

    async def _retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run fn, again up to `retries` times when the device did not answer (a timeout
        or a dropped connection); anything else fails at once."""
        for attempt in range(self.retries + 1):
            try:
                return await fn()
            except DeviceUnavailable as exc:
                if attempt == self.retries or self.link.backing_off:
                    raise self._named(exc) from exc
            except DeviceError as exc:
                raise self._named(exc) from exc
        raise AssertionError("unreachable")

    async def _discover(self) -> None:
        self.base, self.models = await discover(self.link, self.unit, **self._kw)
        ids = [m.id for m in self.models]
        kind = infer_kind(ids)
        if self.kind is None:
            if kind is None:
                raise NotSunSpec(self._err(f"models {ids} fit no known device kind"))
            self.kind = kind
        wanted = kind_models(self.kind, ids, self.prefer)
        if not wanted:
            raise NotSunSpec(self._err(
                f"configured as {self.kind.value} but offers models {ids} "
                f"(needs {KIND_NEEDS[self.kind]})"))
        static = {m.id for m in self.models if m.id in STATIC_MODELS}
        self.static = await self._read_models(plan_reads(self.models, static), static)
        self._wanted = wanted - static
        self._reads = plan_reads(self.models, self._wanted)

    async def _read_models(self, reads: list[tuple[int, int]], ids: set[int]) -> dict[int, ModelValues]:
        """Read the planned spans and view each wanted model's registers (decoded lazily)."""
        chunks = []
        whole = True
        for address, count in reads:
            data = await self.link.read_bytes(address, count, self.unit, **self._kw)
            chunks.append((address, len(data) // 2, data))
            whole = whole and len(data) == 2 * count
        plan = self._plan
        if plan is not None and plan[0] is reads and plan[1] is ids and whole:
            out = {}  # the poll as the last one found it: where each model sits
            for mid, length, k, offset, md in plan[2]:
                data = chunks[k][2]
                if _HEADER.unpack_from(data, offset) != (mid, length):
                    raise MapChanged(self._err(
                        f"model {mid} is no longer at {reads[k][0] + offset // 2} "
                        "(the device's map changed)"))
                out[mid] = ModelValues(md, data, offset)
            return out
        steps: list[tuple[int, int, int, int, ModelDef]] | None = [] if whole else None
        out = {}
        for i, m in enumerate(self.models):
            if m.id not in ids or m.definition is None or m.id in out:
                continue
            for c, (start, n, data) in enumerate(chunks):  # noqa: B007 - c: the read it sits in
                k = m.address - start
                if k >= 0 and k + m.length + 2 <= n:
                    data, offset = data, 2 * k
                    break
            else:  # a model longer than one read: join the consecutive pieces that cover it
                c, steps = -1, None
                end = m.address + m.length + 2
                pieces = [c for c in chunks if c[0] < end and c[0] + c[1] > m.address]
                first = pieces[0][0] if pieces else end
                data = b"".join(c[2] for c in pieces)
                if first > m.address or first + len(data) // 2 < end:
                    raise NotSunSpec(self._err(f"model {m.id} at {m.address} is not covered by the reads"))
                offset = 2 * (m.address - first)
            if _HEADER.unpack_from(data, offset) != (m.id, m.length):
                raise MapChanged(self._err(
                    f"model {m.id} is no longer at {m.address} (the device's map changed)"))
            md = m.definition
            if md.repeating or md.length != m.length:
                md = fit(md, m.length, ModelValues(fit(md, m.length, None), data, offset))
                self.models[i] = m = replace(m, definition=md)
                steps = None  # laid out now: the next poll makes the plan
            out[m.id] = ModelValues(md, data, offset)
            if steps is not None:
                steps.append((m.id, m.length, c, offset, md))
        self._plan = None if steps is None else (reads, ids, steps)
        return out

    _plan: tuple[list[tuple[int, int]], set[int], list[tuple[int, int, int, int, ModelDef]]] | None = None
    """The last poll's reads and wanted models, and where each model sat in them (id,
    length, read, byte offset, definition): the next poll of the same reads goes straight
    to its models, checking each still starts with its ID and L registers."""

    async def read_models(self) -> dict[int, ModelValues]:
        """Every dynamic model this device's kind uses, decoded with scale factors."""
        if self.models:  # the usual poll, without the retry machinery around it
            try:
                self.last = await self._read_models(self._reads, self._wanted)
                return self.last
            except MapChanged:
                pass
            except DeviceUnavailable as exc:
                if not self.retries or self.link.backing_off:
                    raise self._named(exc) from exc
            except DeviceError as exc:
                raise self._named(exc) from exc

        async def once() -> dict[int, ModelValues]:
            if not self.models:
                await self._discover()
            try:
                return await self._read_models(self._reads, self._wanted)
            except MapChanged as exc:  # another device (or firmware) behind the same address
                log.info("%s; discovering again", exc)
                await self._discover()
                return await self._read_models(self._reads, self._wanted)

        self.last = await self._retrying(once)
        return self.last

    async def read_model(self, model_id: int) -> ModelValues:
        """One whole model, any of the device's, its repeating groups laid out."""
        if not self.models:
            await self.connect()
        m = self._model(model_id)
        if m.definition is None:
            raise SunSpecError(self._err(f"model {model_id} has no SunSpec definition (vendor model)"))

        async def once() -> ModelValues:
            return (await self._read_models(plan_reads([m], {model_id}), {model_id}))[model_id]
        return await self._retrying(once)

    def _model(self, model_id: int) -> DiscoveredModel:
        m = next((m for m in self.models if m.id == model_id), None)
        if m is None:
            raise SetpointRejected(self._err(
                f"no model {model_id} on this device (has {[m.id for m in self.models]})"))
        return m

    def _values(self, model_id: int) -> Mapping[str, Any]:
        return self.last.get(model_id) or self.static.get(model_id) or {}

    @property
    def layout(self) -> set[int]:
        """The models this device is read and commanded through."""
        return self._wanted | set(self.static)

    async def read(self) -> Reading:
        models = await self.read_models()
        assert self.kind is not None
        values, status = NEUTRAL[self.kind](models, self.static)
        return Reading(self.name, self.kind, time.time(), values, status)

    async def write(self, point: str, value: float) -> None:
        """A neutral setpoint (`power_w`, `limit_pct`, ...) or a SunSpec point:
        `MODEL.POINT`, `MODEL.GROUP.POINT`, `MODEL.GROUP[i].SUB[j].POINT` (1-based)."""
        if not self.models:
            await self.connect()
        assert self.kind is not None
        if not self.last:
            await self.read_models()
        writes = SETPOINT_WRITERS.get((self.kind, point))
        try:
            if writes is not None:
                await self._write_points(writes(self, float(value)))
            else:
                model_id, pname = await self.resolve_point(point)
                await self.write_point(model_id, pname, value)
        except ModbusExceptionReply as exc:
            raise SetpointRejected(self._err(exc)) from exc

    async def resolve_point(self, point: str) -> tuple[int, str]:
        """`123.WMaxLimPct`, `705.Crv[1].Pt[2].V`, or a point name unique on the device."""
        head, _, rest = point.partition(".")
        if head.isdigit() and rest:
            mid = int(head)
            m = self._model(mid)
            if m.definition is None:
                raise SetpointRejected(self._err(f"model {mid} is a vendor model: no definition"))
            if rest not in m.definition.points and m.definition.repeating:
                await self.read_model(mid)  # lays out its repeating groups
                m = self._model(mid)
            assert m.definition is not None
            if rest not in m.definition.points:
                raise SetpointRejected(self._err(f"no point {point!r} on this device"))
            return mid, rest
        hits = [(m.id, point) for m in self.models if m.definition and point in m.definition.points]
        if len(hits) != 1:
            known = sorted(SETPOINT_NAMES.get(self.kind, ())) if self.kind else []
            why = "no such point" if not hits else f"ambiguous, in models {[h[0] for h in hits]}"
            raise SetpointRejected(self._err(
                f"{point!r}: {why}; use a setpoint {known} or MODEL.POINT"))
        return hits[0]

    async def _write_points(self, points: Iterable[tuple[int, str, float | int | str]]) -> None:
        """Write points in their order, those in adjacent registers in one request (a
        battery's OutWRte and InWRte): fewer requests, and the device checks them together."""
        runs: list[tuple[int, list[int]]] = []
        for model_id, point, value in points:
            address, regs = await self._encode_point(model_id, point, value)
            if runs and runs[-1][0] + len(runs[-1][1]) == address:
                runs[-1][1].extend(regs)
            else:
                runs.append((address, list(regs)))
        for address, regs in runs:
            await self._write_registers(address, regs)

    async def write_point(self, model_id: int, point: str, value: float | int | str) -> None:
        """Write one SunSpec point in engineering units, scaled with the device's own SF."""
        await self._write_registers(*await self._encode_point(model_id, point, value))

    async def _encode_point(self, model_id: int, point: str,
                            value: float | int | str) -> tuple[int, list[int]]:
        """Where one point is and its registers for `value` (engineering units, the
        device's own SF); SetpointRejected when it cannot be written."""
        m = self._model(model_id)
        if m.definition is None or point not in m.definition.points:
            raise SetpointRejected(self._err(f"no point {model_id}.{point} on this device"))
        p = m.definition.point(point)
        if not p.writable:
            raise SetpointRejected(self._err(f"{model_id}.{point} is read-only"))
        raw: int | float | str = value
        if isinstance(value, str) and not p.is_string:
            raw = p.symbols.get(value, value)  # an enum's symbol, e.g. ENABLED
        if p.sf is not None and not isinstance(raw, str):
            if isinstance(p.sf, int):
                sf: Any = p.sf
            else:
                values = self._values(model_id)
                if p.sf not in values:
                    values = await self.read_model(model_id)
                sf = values.get(p.sf)
            raw = round(float(raw) / 10.0 ** int(sf or 0))
        elif not p.is_string and p.type not in ("float32", "float64"):
            try:
                raw = round(float(raw))
            except ValueError:
                raise SetpointRejected(self._err(
                    f"{model_id}.{point}: {value!r} is not a number"
                    + (f" or one of {sorted(p.symbols)}" if p.symbols else ""))) from None
        try:
            return m.address + p.offset, encode_raw(p, raw)
        except SunSpecError as exc:
            raise SetpointRejected(self._err(exc)) from exc

    async def _write_registers(self, address: int, regs: list[int]) -> None:
        try:
            await self.link.write(address, regs, self.unit, **{**self._kw, "retries": self.retries})
        except GatewayTargetSilent as exc:
            raise self._named(exc) from exc
        except ModbusExceptionReply as exc:
            raise SetpointRejected(self._err(exc)) from exc
        except DeviceError as exc:
            raise self._named(exc) from exc

    async def close(self) -> None:
        self.link.close()


async def scan(host: str, port: int, unit: int = 1, timeout_s: float = 1.0, *,
               framer: str = "socket", serial: SerialSettings | None = None) -> dict[str, Any]:
    """SunSpec discovery of one endpoint (TCP, RTU over TCP, or a serial port): base
    address, models, identity."""
    link = ModbusLink(host, port, timeout_s=timeout_s, framer=framer, serial=serial)
    try:
        base, models = await discover(link, unit)
        common = next((m for m in models if m.id == 1), None)
        ident: dict[str, Any] = {}
        if common is not None and common.definition is not None:
            regs = await link.read(common.address, common.length + 2, unit)
            ident = decode_model(fit(common.definition, common.length, None), regs)
        return {"endpoint": link.endpoint, "unit": unit, "base": base, "models": models,
                "kind": infer_kind(m.id for m in models), "common": ident}
    finally:
        link.close()
