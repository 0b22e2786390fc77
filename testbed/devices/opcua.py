"""OPC UA: the device emulator server and the client driver (asyncua), with security.

Information model (namespace URI `urn:testbed:devices`, "ns" below)::

    Objects
      ns:Devices                      FolderType, NodeId ns;s=Devices
        ns:<device name>              BaseObjectType, NodeId ns;s=<device>
          ns:kind                     Property, String: pv | battery | meter
          ns:serial                   Property, String
          ns:<measurement>            BaseAnalogType, Double, read-only, NodeId ns;s=<device>/<name>
            EngineeringUnits          Property, EUInformation (UNECE code, e.g. WTT = W)
          ns:<setpoint>               AnalogItemType, Double, read/write
            EngineeringUnits, EURange Properties; EURange is what the device accepts
          ns:status                   BaseObjectType
            ns:<status key>           String, Boolean or UInt32 (state, clamped, ...)

Browse names are the neutral names of `driver.MEASUREMENTS` / `driver.SETPOINTS`
(`p_w`, `soc_pct`, `power_w`, ...), so the OPC UA view of a device is the `Reading` the
driver returns. Values are derived from the same emulator objects the Modbus server uses
(the device's SunSpec map, refreshed from its physics, decoded like the Modbus driver
does), so both protocols read the same numbers. A setpoint write goes through
`EmulatedDevice.write_point` (the protocol-neutral write path with range checks); a
refused write answers `BadOutOfRange` (`BadTypeMismatch` for a non-number) and changes
nothing. Monitored items see the physics move: values are served by read callbacks, which
asyncua never samples, so the server writes changed values of monitored variables back
through its address space (which notifies) every `sample_s`.

The driver reads this model under any namespace URI, or a foreign server's own nodes
through a node map of the site file (`config.OpcUaDeviceConfig`: browse paths or NodeIds
per neutral name, with unit conversions in `nodemap`); it polls (one Read per `read()`)
or answers `read()` from a subscription's monitored items.

Security: endpoints are SignAndEncrypt with one policy (Basic256Sha256 by default;
Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss), sessions need a username and password,
and the server accepts only client certificates in its trust folder. A NoSecurity
endpoint exists only when the site allows it (`opcua: {allow_insecure: true}`);
otherwise a channel without security (which OPC UA keeps open for discovery) can do
nothing but GetEndpoints. `make_certificates` writes the folder the site points to::

    DIR/server/cert.der, key.pem      the emulators' application certificate
    DIR/client/cert.der, key.pem      the driver's application certificate
    DIR/trusted/clients/*.der         client certificates the emulators accept
    DIR/trusted/servers/*.der         server certificates the driver accepts (when any)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import Client, Server, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto import security_policies as sp
from asyncua.crypto.permission_rules import PermissionRuleset, User, UserRole
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.address_space import AttributeService
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .driver import (
    MEASUREMENTS,
    SETPOINTS,
    Device,
    DeviceError,
    DeviceKind,
    DeviceUnavailable,
    Reading,
    SetpointRejected,
)
from .emulator import EmulatedBattery, EmulatedDevice, EmulatedInverter, WriteRefused
from .modbus import NEUTRAL
from .nodemap import NAMESPACE_URI, Conversion, unit_of, within
from .sunspec import ModelValues, SunSpecError

log = logging.getLogger(__name__)

SERVER_URI = "urn:testbed:server"
CLIENT_URI = "urn:testbed:client"
DEVICES_FOLDER = "Devices"

POLICIES: dict[str, tuple[type[sp.SecurityPolicy], ua.SecurityPolicyType]] = {
    "Basic256Sha256": (sp.SecurityPolicyBasic256Sha256, ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt),
    "Aes128_Sha256_RsaOaep": (sp.SecurityPolicyAes128Sha256RsaOaep,
                              ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt),
    "Aes256_Sha256_RsaPss": (sp.SecurityPolicyAes256Sha256RsaPss,
                             ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt),
}
"""Security policy names of the site file, all with MessageSecurityMode SignAndEncrypt."""


class NodeMissing(DeviceError):
    """A namespace, browse path or NodeId the site file names is not on the server."""


class AccessDenied(DeviceError):
    """The server refused us: wrong username/password, an untrusted certificate, or a
    security mode it does not offer. Retrying will not help until the setup changes."""


# =========================================================================== certificates


CERTS_LAYOUT = {"server": "server", "client": "client", "trusted_clients": "trusted/clients",
                "trusted_servers": "trusted/servers"}


def make_certificate(directory: Path, uri: str, common_name: str, *, server: bool,
                     hosts: tuple[str, ...] = (), days: int = 3650) -> tuple[Path, Path]:
    """A self-signed RSA-2048 application certificate as OPC UA wants it (OPC 10000-6
    6.2.2), made by asyncua's own helpers (`asyncua.crypto.cert_gen`).

    The application URI goes into subjectAltName (asyncua and most stacks compare it
    with the ApplicationUri of the session), with DNS/IP names of `hosts`, localhost and
    this host. Writes `directory/cert.der` and `directory/key.pem` (PKCS#8, 0600).
    """
    key = cert_gen.generate_private_key()
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for h in dict.fromkeys((*hosts, "localhost", socket.gethostname(), "127.0.0.1")):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    use = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = cert_gen.generate_self_signed_app_certificate(
        key, common_name, {"organizationName": "testbed"}, alt, [use], days=days)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.der", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.touch(mode=0o600)
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


def make_certificates(directory: Path, *, hosts: tuple[str, ...] = (), force: bool = False) -> dict[str, Path]:
    """The folder a site's `opcua.certs` points to: server and client certificates, each
    trusted by the other side. Existing certificates are kept unless `force`."""
    directory = Path(directory)
    out: dict[str, Path] = {}
    for role, uri, cn, is_server, trust in (
            ("server", SERVER_URI, "testbed device emulator", True, CERTS_LAYOUT["trusted_servers"]),
            ("client", CLIENT_URI, "testbed driver", False, CERTS_LAYOUT["trusted_clients"])):
        folder = directory / CERTS_LAYOUT[role]
        if force or not (folder / "cert.der").exists() or not (folder / "key.pem").exists():
            make_certificate(folder, uri, cn, server=is_server, hosts=hosts)
        trusted = directory / trust / f"{role}.der"
        trusted.parent.mkdir(parents=True, exist_ok=True)
        trusted.write_bytes((folder / "cert.der").read_bytes())
        out[role] = folder
    return out


def add_trusted_client(directory: Path, name: str, uri: str, *, hosts: tuple[str, ...] = ()) -> Path:
    """One more client certificate (e.g. for a third-party tool), trusted by the emulators."""
    folder = Path(directory) / name
    make_certificate(folder, uri, name, server=False, hosts=hosts)
    trusted = Path(directory) / CERTS_LAYOUT["trusted_clients"] / f"{name}.der"
    trusted.parent.mkdir(parents=True, exist_ok=True)
    trusted.write_bytes((folder / "cert.der").read_bytes())
    return folder


def _load_cert(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)


def load_trusted(folder: Path) -> dict[bytes, x509.Certificate]:
    """SHA-256 fingerprint -> certificate, for every .der/.pem/.crt file in `folder`."""
    out: dict[bytes, x509.Certificate] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in (".der", ".pem", ".crt", ".cer"):
                try:
                    cert = _load_cert(p)
                except ValueError:
                    log.warning("%s: not a certificate, ignored", p)
                    continue
                out[cert.fingerprint(hashes.SHA256())] = cert
    return out


def _cert_uri(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _describe(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    fp = cert.fingerprint(hashes.SHA256()).hex(":")[:23]
    return f"'{cn[0].value if cn else cert.subject.rfc4514_string()}' (SHA-256 {fp}...)"


@dataclass(frozen=True)
class OpcUaSecurity:
    """What both sides need: the cert folder, the policy, accounts and the insecure switch.

    `username`/`password` are what the driver logs in with; `accounts` are what the
    emulators accept (default: the driver's own login).
    """

    certs: Path | None = None
    policy: str = "Basic256Sha256"
    username: str | None = None
    password: str | None = None
    accounts: Mapping[str, str] = field(default_factory=dict)
    allow_insecure: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> OpcUaSecurity:
        accounts = dict(cfg.users) or ({cfg.username: cfg.password} if cfg.username else {})
        return cls(cfg.certs, cfg.policy, cfg.username, cfg.password, accounts, cfg.allow_insecure)

    def path(self, role: str) -> Path:
        assert self.certs is not None
        return self.certs / CERTS_LAYOUT[role]

    def require(self, role: str) -> tuple[Path, Path]:
        """(cert, key) of `role` (server or client); a clear error when missing."""
        if self.certs is None:
            raise AccessDenied("no OPC UA certificate folder configured (opcua.certs)")
        folder = self.path(role)
        cert, key = folder / "cert.der", folder / "key.pem"
        for p in (cert, key):
            if not p.exists():
                raise AccessDenied(f"OPC UA {role} certificate {p} is missing; "
                                   f"make it with `testbed devices certs {self.certs}`")
        return cert, key


# =========================================================================== information model


def _unit_id(code: str) -> int:
    """OPC UA Part 8 UnitId of a UNECE common code: its characters, 8 bits each."""
    uid = 0
    for ch in code:
        uid = (uid << 8) | ord(ch)
    return uid


UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"
UNITS: dict[str, tuple[str, str, str]] = {  # neutral unit -> (UNECE code, symbol, description)
    "W": ("WTT", "W", "watt"), "var": ("D44", "var", "volt ampere reactive"),
    "Wh": ("WHR", "W·h", "watt hour"), "%": ("P1", "%", "percent"), "V": ("VLT", "V", "volt"),
    "Hz": ("HTZ", "Hz", "hertz"), "A": ("AMP", "A", "ampere"), "°C": ("CEL", "°C", "degree Celsius"),
    "1": ("C62", "1", "one (0 or 1)"),
}
def eu_information(unit: str) -> ua.EUInformation:
    code, symbol, description = UNITS[unit]
    return ua.EUInformation(NamespaceUri=UNECE, UnitId=_unit_id(code),
                            DisplayName=ua.LocalizedText(symbol), Description=ua.LocalizedText(description))


STATUS_TYPES: dict[str, ua.VariantType] = {
    "state": ua.VariantType.String, "charge_status": ua.VariantType.String,
    "clamped": ua.VariantType.Boolean, "clamp": ua.VariantType.String,
    "storctl_mod": ua.VariantType.UInt32, "events": ua.VariantType.UInt32,
}
STATUS_KEYS: dict[DeviceKind, tuple[str, ...]] = {
    DeviceKind.PV: ("state", "events"),
    DeviceKind.BATTERY: ("state", "charge_status", "clamped", "clamp", "storctl_mod"),
    DeviceKind.METER: ("events",),
}


def _setpoint_range(dev: EmulatedDevice, point: str) -> tuple[float, float]:
    if isinstance(dev, EmulatedBattery) and point == "power_w":
        return -float(dev.wchamax), float(dev.params.max_discharge_w)
    if isinstance(dev, EmulatedInverter) and point == "limit_pct":
        return 0.0, 100.0
    if isinstance(dev, EmulatedInverter) and point == "limit_enabled":
        return 0.0, 1.0
    raise WriteRefused(f"{dev.name} has no setpoint {point!r}")


def apply_setpoint(dev: EmulatedDevice, point: str, value: float) -> None:
    """Command an emulated device by neutral setpoint name, through `write_point` (and its
    checks). Raises WriteRefused, leaving the device unchanged, when out of range."""
    lo, hi = _setpoint_range(dev, point)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise WriteRefused(f"{point} {value:g} outside {lo:g}..{hi:g} {SETPOINTS[DeviceKind(dev.kind)][point].unit}")
    writes: list[tuple[int, str, float]]
    if point == "power_w":  # +W discharge: DISCHARGE + OutWRte; -W charge: CHARGE + InWRte
        if value > 0:
            writes = [(124, "OutWRte", value / hi * 100), (124, "InWRte", 0), (124, "StorCtl_Mod", 2)]
        elif value < 0:
            writes = [(124, "OutWRte", 0), (124, "InWRte", value / lo * 100), (124, "StorCtl_Mod", 1)]
        else:
            writes = [(124, "StorCtl_Mod", 0), (124, "OutWRte", 0), (124, "InWRte", 0)]
    elif point == "limit_pct":
        writes = [(123, "WMaxLimPct", value), (123, "WMaxLim_Ena", 1)]
    else:  # limit_enabled
        if value not in (0.0, 1.0):
            raise WriteRefused(f"limit_enabled must be 0 or 1, got {value:g}")
        writes = [(123, "WMaxLim_Ena", value)]
    for model_id, name, v in writes:
        dev.write_point(model_id, name, v)


class _DeviceView:
    """One emulated device's variables: values decoded from its SunSpec map, as DataValues,
    re-made only when the physics (or a write) changed it."""

    def __init__(self, dev: EmulatedDevice) -> None:
        self.dev = dev
        self.kind = DeviceKind(dev.kind)
        self.version = -1
        self.values: dict[str, ua.DataValue] = {}
        self.setpoints = tuple(SETPOINTS[self.kind])
        self.measurements = MEASUREMENTS[self.kind]
        self.status_keys = STATUS_KEYS[self.kind]

    def refresh(self) -> None:
        dev = self.dev
        if self.version == dev.prosumer.version:
            return
        dev.refresh()
        m = dev.map
        models = {inst.id: ModelValues.from_registers(
            inst.definition, m.registers[inst.address - m.base: inst.address - m.base + inst.length + 2])
            for inst in m.models}
        values, status = NEUTRAL[self.kind](models, models)
        if self.kind is DeviceKind.BATTERY:
            values["power_w"] = values["setpoint_w"]
        now = dt.datetime.now(dt.UTC)
        out: dict[str, ua.DataValue] = {}
        for name in (*self.measurements, *self.setpoints):
            v = values.get(name)
            out[name] = _dv(None if v is None else float(v), ua.VariantType.Double, now)
        for key in self.status_keys:
            vt = STATUS_TYPES[key]
            v = status.get(key)
            if vt is ua.VariantType.String:
                v = "" if v is None else str(v)
            elif vt is ua.VariantType.Boolean:
                v = bool(v)
            elif v is not None:
                v = int(v)
            out[f"status/{key}"] = _dv(v, vt, now)
        self.values = out
        self.version = dev.prosumer.version

    def read(self, name: str) -> ua.DataValue:
        self.refresh()
        return self.values[name]

    def eu_range(self, point: str) -> ua.DataValue:
        lo, hi = _setpoint_range(self.dev, point)
        return ua.DataValue(ua.Variant(ua.Range(Low=lo, High=hi), ua.VariantType.ExtensionObject))

    def write(self, point: str, dv: ua.DataValue) -> ua.StatusCode:
        v = dv.Value.Value if dv.Value is not None else None
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, int | float):
            return ua.StatusCode(ua.StatusCodes.BadTypeMismatch)
        try:
            apply_setpoint(self.dev, point, float(v))
        except (WriteRefused, SunSpecError) as exc:
            log.warning("%s: OPC UA write %s=%s refused: %s", self.dev.name, point, v, exc)
            return ua.StatusCode(ua.StatusCodes.BadOutOfRange)
        self.version = -1
        return ua.StatusCode(ua.StatusCodes.Good)


def _dv(value: Any, vt: ua.VariantType, now: dt.datetime) -> ua.DataValue:
    if value is None:
        return ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadNoData), SourceTimestamp=now,
                            ServerTimestamp=now)
    return ua.DataValue(ua.Variant(value, vt), SourceTimestamp=now, ServerTimestamp=now)


_ADMIN = User(role=UserRole.Admin)


class _DeviceAttributes(AttributeService):
    """The server's attribute service, with setpoint writes answered by the devices."""

    def __init__(self, aspace: Any, setpoints: dict[ua.NodeId, Callable[[ua.DataValue], ua.StatusCode]]) -> None:
        super().__init__(aspace)
        self.setpoints = setpoints

    async def write(self, params: ua.WriteParameters, user: User = _ADMIN) -> list[ua.StatusCode]:
        out: list[ua.StatusCode] = []
        for wv in params.NodesToWrite:
            handler = self.setpoints.get(wv.NodeId)
            if handler is None:
                out += await super().write(ua.WriteParameters(NodesToWrite=[wv]), user)
            elif wv.AttributeId != ua.AttributeIds.Value:
                out.append(ua.StatusCode(ua.StatusCodes.BadNotWritable))
            else:
                out.append(handler(wv.Value))
        return out


class _DenyAll(PermissionRuleset):
    """For channels that must not be used: anything but discovery and session set-up fails."""

    def check_validity(self, user: Any, action_type: Any, body: Any) -> bool:
        return False


class _TrustingFactory(sp.SecurityPolicyFactory):
    """A secure policy whose channels are usable only with a trusted client certificate
    (asyncua checks the certificate at CreateSession only, and only when one is sent)."""

    def __init__(self, inner: sp.SecurityPolicyFactory, trusted: Callable[[x509.Certificate], bool]) -> None:
        super().__init__(inner.cls, inner.mode, inner.certificate, inner.private_key,
                         inner.permission_ruleset, inner.certificate_chain)
        self.trusted = trusted

    def create(self, peer_certificate: Any) -> sp.SecurityPolicy:
        policy = super().create(peer_certificate)
        try:
            ok = peer_certificate is not None and self.trusted(x509.load_der_x509_certificate(peer_certificate))
        except ValueError:
            ok = False
        if not ok:
            policy.permissions = _DenyAll()
        return policy


class _Accounts:
    """asyncua user manager: username/password sessions only."""

    def __init__(self, accounts: Mapping[str, str]) -> None:
        self.accounts = dict(accounts)

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        expected = self.accounts.get(username or "")
        if username is None or expected is None or not hmac.compare_digest(
                expected.encode(), (password or "").encode()):
            log.warning("OPC UA login refused for user %r", username)
            return None
        return User(role=UserRole.User, name=username)


class OpcUaEmulatorServer:
    """An OPC UA server on one (host, port) presenting emulated devices by name."""

    def __init__(self, host: str, port: int, devices: Mapping[str, EmulatedDevice],
                 security: OpcUaSecurity, *, namespace: str = NAMESPACE_URI,
                 sample_s: float = 0.1) -> None:
        if not devices:
            raise ValueError("a server needs at least one device")
        self.host = host
        self.requested_port = port
        self.devices = dict(devices)
        self.security = security
        self.namespace = namespace
        self.sample_s = sample_s
        self.port: int | None = None
        self.views: dict[str, _DeviceView] = {}
        self._server: Server | None = None
        self._trusted: dict[bytes, x509.Certificate] = {}
        self._sources: dict[ua.NodeId, tuple[_DeviceView, str]] = {}
        self._watched: dict[_DeviceView, dict[ua.NodeId, int]] = {}
        """Monitored variables by device: NodeId -> number of monitored items on it."""
        self._handles: dict[int, ua.NodeId] = {}
        self._pushed: dict[ua.NodeId, ua.DataValue] = {}
        self._pushed_version: dict[_DeviceView, int] = {}
        self._pump: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port if self.port is not None else self.requested_port}/"

    def _is_trusted(self, cert: x509.Certificate) -> bool:
        fp = cert.fingerprint(hashes.SHA256())
        if fp not in self._trusted and self.security.certs is not None:  # added while running?
            self._trusted = load_trusted(self.security.path("trusted_clients"))
        return fp in self._trusted

    async def _validate(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        await CertificateValidator(CertificateValidatorOptions.BASIC_VALIDATION)(cert, app)
        if not self._is_trusted(cert):
            log.warning("%s: client certificate %s of %s is not in %s", self.url, _describe(cert),
                        app.ApplicationUri, self.security.path("trusted_clients"))
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    async def start(self) -> int:
        sec = self.security
        if not sec.accounts:
            raise ValueError("an OPC UA emulator needs at least one account (opcua.username/password)")
        server = Server(user_manager=_Accounts(sec.accounts))
        await server.init()
        server.set_server_name("testbed device emulator")
        await server.set_application_uri(SERVER_URI)
        server.set_endpoint(f"opc.tcp://{self.host}:{self.requested_port}/")
        policies: list[ua.SecurityPolicyType] = []
        if sec.certs is not None:
            cert, key = sec.require("server")
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
            self._trusted = load_trusted(sec.path("trusted_clients"))
            policies.append(POLICIES[sec.policy][1])
            server.set_certificate_validator(self._validate)
        if sec.allow_insecure:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        if not policies:
            raise ValueError("no OPC UA endpoint: set opcua.certs (or opcua.allow_insecure)")
        server.set_security_policy(policies)
        server.set_identity_tokens([ua.UserNameIdentityToken])
        idx = await server.register_namespace(self.namespace)
        await self._build(server, idx)
        self._watch(server)
        try:
            await server.start()
        except OSError as exc:
            with contextlib.suppress(Exception):
                await server.iserver.stop()
            raise OSError(f"cannot listen on {self.host}:{self.requested_port}: "
                          f"{exc.strerror or exc}") from None
        # Channels whose policy no endpoint offers, or whose certificate is not trusted,
        # may only discover (the factories list is shared with every new connection).
        factories = server._policies  # asyncua keeps them here, shared by reference with connections
        factories[:] = [_TrustingFactory(f, self._is_trusted) if f.cls is not sp.SecurityPolicyNone else f
                        for f in factories]
        if not sec.allow_insecure:
            factories.append(sp.SecurityPolicyFactory(sp.SecurityPolicyNone, ua.MessageSecurityMode.None_,
                                                      permission_ruleset=_DenyAll()))
        assert server.bserver is not None
        self.port = server.bserver.port
        self._server = server
        self._pump = asyncio.create_task(self._push_changes(server), name=f"opcua-pump-{self.port}")
        return self.port

    def _watch(self, server: Server) -> None:
        """Track which device variables have monitored items (asyncua registers a datachange
        callback per monitored item and removes it with the item)."""
        aspace = server.iserver.aspace
        add, delete = aspace.add_datachange_callback, aspace.delete_datachange_callback

        def added(nodeid: ua.NodeId, attr: ua.AttributeIds, callback: Callable[..., Any]) -> Any:
            status, handle = add(nodeid, attr, callback)
            if status.is_good() and attr == ua.AttributeIds.Value and nodeid in self._sources:
                view, point = self._sources[nodeid]
                nodes = self._watched.setdefault(view, {})
                nodes[nodeid] = nodes.get(nodeid, 0) + 1
                self._handles[handle] = nodeid
                # asyncua sends the current value as the item's first notification
                self._pushed.setdefault(nodeid, view.read(point))
            return status, handle

        def deleted(handle: int) -> None:
            delete(handle)
            nodeid = self._handles.pop(handle, None)
            if nodeid is None:
                return
            view = self._sources[nodeid][0]
            nodes = self._watched[view]
            nodes[nodeid] -= 1
            if not nodes[nodeid]:
                del nodes[nodeid]
                self._pushed.pop(nodeid, None)
            if not nodes:
                del self._watched[view]
                self._pushed_version.pop(view, None)

        aspace.add_datachange_callback = added
        aspace.delete_datachange_callback = deleted

    async def _push_changes(self, server: Server) -> None:
        """Values come from read callbacks, which asyncua never samples for monitored items
        (it notifies only on writes to the address space). So every `sample_s`, the watched
        variables whose value changed are written back through the address space, which
        runs the datachange callbacks; the no-op setter keeps the read callback in place.
        Devices whose physics did not step are skipped whole; unchanged values are not
        written (so the cost follows what changes, not what is watched)."""
        aspace = server.iserver.aspace
        while True:
            await asyncio.sleep(self.sample_s)
            for i, (view, nodes) in enumerate(list(self._watched.items())):
                if view.version == view.dev.prosumer.version and \
                        self._pushed_version.get(view) == view.version:
                    continue
                if i % 16 == 15:
                    await asyncio.sleep(0)  # let requests in between: a pass is not one block
                view.refresh()
                self._pushed_version[view] = view.version
                for nodeid in list(nodes):
                    dv = view.values[self._sources[nodeid][1]]
                    old = self._pushed.get(nodeid)
                    if old is not None and old.Value == dv.Value and old.StatusCode == dv.StatusCode:
                        continue
                    self._pushed[nodeid] = dv
                    try:
                        await aspace.write_attribute_value(nodeid, ua.AttributeIds.Value, dv)
                    except Exception:  # a subscriber's callback failing must not stop the pump
                        log.exception("%s: change notification for %s failed", self.url, nodeid)

    async def _build(self, server: Server, idx: int) -> None:
        """All device nodes in one add_nodes call; values come from callbacks."""
        items: list[ua.AddNodesItem] = []
        callbacks: list[tuple[ua.NodeId, Callable[..., ua.DataValue]]] = []
        setpoints: dict[ua.NodeId, Callable[[ua.DataValue], ua.StatusCode]] = {}
        folder = ua.NodeId(DEVICES_FOLDER, idx)
        items.append(_object(folder, ua.NodeId(ua.ObjectIds.ObjectsFolder), idx, DEVICES_FOLDER,
                             ua.ObjectIds.FolderType, ua.ObjectIds.Organizes))
        for name, dev in self.devices.items():
            view = self.views[name] = _DeviceView(dev)
            view.refresh()
            obj = ua.NodeId(name, idx)
            items.append(_object(obj, folder, idx, name, ua.ObjectIds.BaseObjectType, ua.ObjectIds.Organizes,
                                 f"{view.kind.value} {dev.model_name} {dev.serial}"))
            items.append(_property(ua.NodeId(f"{name}/kind", idx), obj, idx, "kind",
                                   ua.Variant(view.kind.value, ua.VariantType.String)))
            items.append(_property(ua.NodeId(f"{name}/serial", idx), obj, idx, "serial",
                                   ua.Variant(dev.serial, ua.VariantType.String)))
            for point in dict.fromkeys((*view.measurements, *view.setpoints)):
                nid = ua.NodeId(f"{name}/{point}", idx)
                writable = point in view.setpoints
                items.append(_variable(nid, obj, idx, point, ua.Variant(0.0, ua.VariantType.Double),
                                       ua.ObjectIds.Double,
                                       ua.ObjectIds.AnalogItemType if writable else ua.ObjectIds.BaseAnalogType,
                                       writable))
                items.append(_property(ua.NodeId(f"{name}/{point}/EngineeringUnits", idx), nid, 0,
                                       "EngineeringUnits", ua.Variant(eu_information(unit_of(point)))))
                callbacks.append((nid, lambda n, a, v=view, p=point: v.read(p)))
                self._sources[nid] = (view, point)
                if writable:
                    rid = ua.NodeId(f"{name}/{point}/EURange", idx)
                    items.append(_property(rid, nid, 0, "EURange", view.eu_range(point).Value))
                    callbacks.append((rid, lambda n, a, v=view, p=point: v.eu_range(p)))
                    setpoints[nid] = lambda dv, v=view, p=point: v.write(p, dv)
            status = ua.NodeId(f"{name}/status", idx)
            items.append(_object(status, obj, idx, "status", ua.ObjectIds.BaseObjectType, ua.ObjectIds.HasComponent))
            for key in view.status_keys:
                nid = ua.NodeId(f"{name}/status/{key}", idx)
                vt = STATUS_TYPES[key]
                items.append(_variable(nid, status, idx, key, view.values[f"status/{key}"].Value
                                       or ua.Variant(None, vt), _DATATYPES[vt],
                                       ua.ObjectIds.BaseDataVariableType, False))
                callbacks.append((nid, lambda n, a, v=view, k=key: v.read(f"status/{k}")))
                self._sources[nid] = (view, f"status/{key}")
        results = await server.iserver.isession.add_nodes(items)
        for item, res in zip(items, results, strict=True):
            if not res.StatusCode.is_good():
                raise RuntimeError(f"cannot add node {item.BrowseName}: {res.StatusCode.name}")
        aspace = server.iserver.aspace
        for nid, cb in callbacks:
            aspace.set_attribute_value_callback(nid, ua.AttributeIds.Value, cb).check()
            if nid in self._sources:
                aspace.set_attribute_value_setter(nid, ua.AttributeIds.Value, _keep_callback).check()
        iserver = server.iserver
        iserver.attribute_service = _DeviceAttributes(iserver.aspace, setpoints)

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        if self._server is not None:
            await self._server.stop()
            self._server = None
        self._watched.clear()
        self._handles.clear()
        self._pushed.clear()
        self._pushed_version.clear()

    async def __aenter__(self) -> OpcUaEmulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _keep_callback(node: Any, attr: ua.AttributeIds, value: ua.DataValue) -> None:
    """Value setter of device variables: their value stays with the read callback."""


_DATATYPES = {ua.VariantType.String: ua.ObjectIds.String, ua.VariantType.Boolean: ua.ObjectIds.Boolean,
              ua.VariantType.UInt32: ua.ObjectIds.UInt32, ua.VariantType.Double: ua.ObjectIds.Double}


def _object(nid: ua.NodeId, parent: ua.NodeId, idx: int, name: str, typedef: int, ref: int,
            description: str = "") -> ua.AddNodesItem:
    attrs = ua.ObjectAttributes(DisplayName=ua.LocalizedText(name),
                                Description=ua.LocalizedText(description or name), EventNotifier=0)
    return ua.AddNodesItem(ParentNodeId=parent, ReferenceTypeId=ua.NodeId(ref), RequestedNewNodeId=nid,
                           BrowseName=ua.QualifiedName(name, idx), NodeClass=ua.NodeClass.Object,
                           NodeAttributes=attrs, TypeDefinition=ua.NodeId(typedef))


def _variable(nid: ua.NodeId, parent: ua.NodeId, idx: int, name: str, value: ua.Variant, datatype: int,
              typedef: int, writable: bool, *, prop: bool = False) -> ua.AddNodesItem:
    access = ua.AccessLevel.CurrentRead.mask | (ua.AccessLevel.CurrentWrite.mask if writable else 0)
    attrs = ua.VariableAttributes(DisplayName=ua.LocalizedText(name), Description=ua.LocalizedText(name),
                                  Value=value, DataType=ua.NodeId(datatype), ValueRank=ua.ValueRank.Scalar,
                                  AccessLevel=access, UserAccessLevel=access)
    return ua.AddNodesItem(ParentNodeId=parent,
                           ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasProperty if prop else ua.ObjectIds.HasComponent),
                           RequestedNewNodeId=nid, BrowseName=ua.QualifiedName(name, idx),
                           NodeClass=ua.NodeClass.Variable, NodeAttributes=attrs,
                           TypeDefinition=ua.NodeId(typedef))


def _property(nid: ua.NodeId, parent: ua.NodeId, idx: int, name: str, value: ua.Variant) -> ua.AddNodesItem:
    datatype = {ua.VariantType.String: ua.ObjectIds.String}.get(value.VariantType)
    if datatype is None:
        datatype = ua.ObjectIds.EUInformation if isinstance(value.Value, ua.EUInformation) else ua.ObjectIds.Range
    return _variable(nid, parent, idx, name, value, datatype, ua.ObjectIds.PropertyType, False, prop=True)


# =========================================================================== client


_ACCESS_ERRORS = {
    "BadUserAccessDenied": "wrong username or password",
    "BadIdentityTokenRejected": "the server does not accept this kind of login",
    "BadIdentityTokenInvalid": "the server does not accept this kind of login",
    "BadCertificateUntrusted": "the server does not trust our client certificate",
    "BadCertificateUriInvalid": "our client certificate's application URI does not match",
    "BadCertificateTimeInvalid": "a certificate is expired or not yet valid",
    "BadSecurityChecksFailed": "security checks failed (certificate or key mismatch)",
    "BadSecurityPolicyRejected": "the security policy was rejected",
}


def _policy_name(uri: str) -> str:
    return uri.rsplit("#", 1)[-1]


class OpcUaLink:
    """One OPC UA session to an endpoint, shared by the devices behind it.

    Like `ModbusLink`: a failed request drops the session; the next request reconnects
    once the backoff (doubling from `backoff_s` to `backoff_max_s`) has passed and fails
    fast before that. `generation` is bumped on every new session.
    """

    def __init__(self, host: str, port: int, security: OpcUaSecurity, *, timeout_s: float = 1.0,
                 backoff_s: float = 0.5, backoff_max_s: float = 10.0) -> None:
        self.host, self.port, self.security, self.timeout_s = host, port, security, timeout_s
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._delay = 0.0
        self._retry_at = 0.0
        self._connect_lock = asyncio.Lock()
        self.generation = 0
        self.last_error: str | None = None
        self.namespaces: list[str] = []
        """The server's NamespaceArray (read once per session)."""
        self._feeds: dict[float, _Feed] = {}

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/"

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        c = self._client
        return c is not None and c.uaclient.state is UaClientState.CONNECTED

    def _on_own_loop(self) -> bool:
        """Running on the event loop the session was made on."""
        try:
            return self._loop is asyncio.get_running_loop()
        except RuntimeError:
            return False

    def _usable(self) -> bool:
        return self.connected and self._loop is asyncio.get_running_loop()

    async def ensure(self) -> Client:
        if self._usable():
            return self._client  # type: ignore[return-value]
        if self._client is not None:  # lost, or made on another loop: shut it down
            client, self._client = self._client, None
            _shutdown(client, same_loop=self._on_own_loop())
        async with self._connect_lock:
            if self._usable():
                return self._client  # type: ignore[return-value]
            now = time.monotonic()
            if now < self._retry_at:
                raise DeviceUnavailable(f"{self.endpoint}: not connected ({self.last_error}); "
                                        f"next attempt in {self._retry_at - now:.1f} s")
            client = Client(self.url, timeout=self.timeout_s, watchdog_intervall=max(1.0, self.timeout_s))
            client.session_timeout = 60_000  # ms: a session we lost is dropped by the server after 1 min
            try:
                await asyncio.wait_for(self._connect(client), self.timeout_s * 4 + 1.0)
            except AccessDenied as exc:
                self._failed_connect(client, str(exc))
                raise
            except ua.UaStatusCodeError as exc:
                name = ua.StatusCode(exc.code).name
                why = _ACCESS_ERRORS.get(name)
                self._failed_connect(client, name)
                if why is None:
                    raise DeviceUnavailable(f"{self.endpoint}: connection refused ({name})") from None
                raise AccessDenied(self._access_message(name, why)) from None
            except (TimeoutError, OSError, ua.UaError) as exc:
                reason = str(exc) or type(exc).__name__
                self._failed_connect(client, reason)
                raise DeviceUnavailable(f"{self.endpoint}: cannot connect ({reason})") from None
            self._client = client
            self._loop = asyncio.get_running_loop()
            self._delay = 0.0
            self.last_error = None
            self.generation += 1
            return client

    def _access_message(self, status: str, why: str) -> str:
        sec = self.security
        msg = f"{self.endpoint}: refused ({status}): {why}"
        if status in ("BadUserAccessDenied", "BadIdentityTokenRejected"):
            msg += f" (user {sec.username!r}; see opcua.username/password)" if sec.username \
                else " (no username configured: set opcua.username/password)"
        elif status == "BadCertificateUntrusted" and sec.certs is not None:
            msg += f" {sec.path('client') / 'cert.der'}; put a copy in the server's trusted client folder"
        return msg

    async def _connect(self, client: Client) -> None:
        sec = self.security
        try:
            endpoints = await client.connect_and_get_server_endpoints()
        except (OSError, TimeoutError) as exc:
            raise DeviceUnavailable(f"{self.endpoint}: cannot connect ({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc or type(exc).__name__})") from None
        offered = sorted({f"{_policy_name(e.SecurityPolicyUri)} {e.SecurityMode.name.rstrip('_')}" for e in endpoints})
        if sec.certs is not None:
            policy_cls = POLICIES[sec.policy][0]
            mode = ua.MessageSecurityMode.SignAndEncrypt
            want = f"{sec.policy} SignAndEncrypt"
        else:
            policy_cls, mode, want = sp.SecurityPolicyNone, ua.MessageSecurityMode.None_, "None (insecure)"
        match = [e for e in endpoints if e.SecurityPolicyUri == policy_cls.URI and e.SecurityMode == mode]
        if not match:
            hint = ("; the server does not allow insecure connections: set opcua.certs"
                    if sec.certs is None else "; set opcua.policy to one it offers")
            raise AccessDenied(f"{self.endpoint}: no {want} endpoint (the server offers: "
                               f"{', '.join(offered) or 'nothing'}){hint}")
        if sec.certs is not None:
            cert, key = sec.require("client")
            client.application_uri = _cert_uri(_load_cert(cert)) or CLIENT_URI
            await client.set_security(policy_cls, str(cert), str(key),
                                      server_certificate=match[0].ServerCertificate, mode=mode)
            trusted = load_trusted(sec.path("trusted_servers"))
            if trusted:
                client.certificate_validator = self._server_validator(trusted)
        client.name = client.description = "testbed driver"
        if sec.username:
            client.set_user(sec.username)
            client.set_password(sec.password or "")
        try:
            await client.connect()
        except BaseException:
            client.disconnect_socket()
            raise
        self.namespaces = list(await client.get_namespace_array())

    def _server_validator(self, trusted: Mapping[bytes, x509.Certificate]) -> Callable[..., Any]:
        folder = self.security.path("trusted_servers")

        async def validate(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
            if cert.fingerprint(hashes.SHA256()) not in trusted:
                raise AccessDenied(f"{self.endpoint}: the server's certificate {_describe(cert)} is not "
                                   f"in {folder}; copy it there to trust this server")
        return validate

    def _failed_connect(self, client: Client, reason: str) -> None:
        with contextlib.suppress(Exception):
            client.disconnect_socket()
        self.last_error = reason
        self._fail()

    def _fail(self) -> None:
        self._delay = min(self.backoff_max_s, max(self.backoff_s, self._delay * 2))
        self._retry_at = time.monotonic() + self._delay

    def drop(self, reason: str) -> None:
        """Forget the session after a failure; the next request waits for the backoff."""
        self.last_error = reason
        if self._client is not None:
            client, self._client = self._client, None
            _shutdown(client, same_loop=self._on_own_loop())
        self._fail()

    async def _call(self, what: str, request: Callable[[Client], Any]) -> Any:
        client = self._client if self._usable() else await self.ensure()
        try:
            return await request(client)
        except TimeoutError:
            if self.connected:
                raise DeviceUnavailable(f"{self.endpoint}: no response to {what} within {self.timeout_s:g} s") from None
            self.drop("timeout")
            raise DeviceUnavailable(f"{self.endpoint}: connection lost during {what}") from None
        except ua.UaStatusCodeError as exc:
            name = ua.StatusCode(exc.code).name
            if name in ("BadSessionIdInvalid", "BadSessionClosed", "BadSecureChannelIdInvalid",
                        "BadUserAccessDenied", "BadConnectionClosed", "BadServerHalted"):
                self.drop(name)
                raise DeviceUnavailable(f"{self.endpoint}: session lost during {what} ({name})") from None
            raise DeviceError(f"{self.endpoint}: {what} failed ({name})") from None
        except (ConnectionError, OSError, ua.UaError) as exc:
            self.drop(str(exc) or type(exc).__name__)
            raise DeviceUnavailable(f"{self.endpoint}: connection lost during {what} ({exc})") from None

    async def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        """One Read request."""
        return await self._call("read", lambda c: c.uaclient.read(params))

    async def write(self, params: ua.WriteParameters) -> list[ua.StatusCode]:
        """One Write request (any number of values)."""
        return await self._call("write", lambda c: c.uaclient.write(params))

    def namespace_index(self, uri: str) -> int:
        """Index of a namespace URI on this server; NodeMissing (listing them) if absent."""
        try:
            return self.namespaces.index(uri)
        except ValueError:
            raise NodeMissing(f"{self.endpoint}: namespace {uri!r} is not on this server "
                              f"(it has: {', '.join(self.namespaces[1:]) or 'none'})") from None

    async def translate(self, start: ua.NodeId | list[ua.NodeId], paths: list[list[ua.QualifiedName]]
                        ) -> list[ua.NodeId | None]:
        """Browse paths (hierarchical references) from `start` (one node, or one per path)
        in one request; None where a path leads nowhere."""
        if not paths:
            return []
        starts = start if isinstance(start, list) else [start] * len(paths)
        bps = [ua.BrowsePath(StartingNode=st, RelativePath=ua.RelativePath(Elements=[
            ua.RelativePathElement(ReferenceTypeId=ua.NodeId(ua.ObjectIds.HierarchicalReferences), IsInverse=False,
                                   IncludeSubtypes=True, TargetName=q) for q in path]))
               for st, path in zip(starts, paths, strict=True)]
        results = await self._call("translate browse paths",
                                   lambda c: c.uaclient.translate_browsepaths_to_nodeids(bps))
        out: list[ua.NodeId | None] = []
        for r in results:
            out.append(r.Targets[0].TargetId if r.StatusCode.is_good() and r.Targets else None)
        return [ua.NodeId(t.Identifier, t.NamespaceIndex) if t is not None else None for t in out]

    async def read_attribute(self, nodes: list[ua.NodeId], attr: ua.AttributeIds) -> list[ua.DataValue]:
        """One attribute of many nodes in one Read."""
        if not nodes:
            return []
        return await self.read(ua.ReadParameters(NodesToRead=[
            ua.ReadValueId(NodeId=n, AttributeId=attr) for n in nodes]))

    async def feed(self, interval_s: float) -> _Feed:
        """The session's subscription at this publishing interval (made on first use; a new
        session starts with none)."""
        feed = self._feeds.get(interval_s)
        if feed is not None and feed.generation == self.generation and not feed.dead \
                and self._usable():
            return feed
        client = await self.ensure()
        feed = _Feed(self.generation)
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval_s * 1000, RequestedLifetimeCount=10_000,
            RequestedMaxKeepAliveCount=max(3, int(10 / interval_s)), MaxNotificationsPerPublish=0,
            PublishingEnabled=True, Priority=0)
        feed.subscription = await self._call("create subscription",
                                             lambda c: c.create_subscription(params, feed))
        self._feeds[interval_s] = feed
        assert client is self._client
        return feed

    async def monitor(self, feed: _Feed, nodes: list[ua.NodeId]) -> None:
        """Monitored items for the nodes `feed` does not watch yet (one request)."""
        new = [n for n in dict.fromkeys(nodes) if n not in feed.watched]
        if not new:
            return
        results = await self._call("create monitored items", lambda c: feed.subscription.subscribe_data_change(
            [c.get_node(n) for n in new], queuesize=1, sampling_interval=0.0))
        for n, r in zip(new, results if isinstance(results, list) else [results], strict=True):
            if isinstance(r, ua.StatusCode):
                raise DeviceError(f"{self.endpoint}: cannot monitor {n.to_string()} ({r.name})")
            feed.watched.add(n)

    async def browse_children(self, node: ua.NodeId) -> dict[str, ua.NodeId]:
        """Browse name -> NodeId of a node's forward hierarchical children (one Browse)."""
        desc = ua.BrowseDescription(NodeId=node, BrowseDirection=ua.BrowseDirection.Forward,
                                    ReferenceTypeId=ua.NodeId(ua.ObjectIds.HierarchicalReferences),
                                    IncludeSubtypes=True, ResultMask=ua.BrowseResultMask.BrowseName)
        params = ua.BrowseParameters(NodesToBrowse=[desc])
        results = await self._call("browse", lambda c: c.uaclient.browse(params))
        res = results[0]
        if not res.StatusCode.is_good():
            raise DeviceError(f"{self.endpoint}: browse of {node.to_string()} failed ({res.StatusCode.name})")
        return {r.BrowseName.Name: r.NodeId for r in res.References}

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                client.disconnect_socket()
                return
            asyncio.get_running_loop().create_task(_quiet_disconnect(client))

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await _quiet_disconnect(client)


def _shutdown(client: Client, *, same_loop: bool) -> None:
    """Close a session we gave up on, at once, with everything it runs. asyncua cancels the
    publish loop of a subscription only when the session closes over a live socket; a
    lost one would retry its Publish every second for ever."""
    with contextlib.suppress(Exception):
        task = client.uaclient._publish_task
        if task is not None and not task.done() and same_loop:
            task.cancel()
    with contextlib.suppress(Exception):
        client.disconnect_socket()
    if same_loop:
        asyncio.get_running_loop().create_task(_quiet_disconnect(client))


async def _quiet_disconnect(client: Client) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), 2.0)
    client.disconnect_socket()


class _Feed:
    """One subscription of a session: the latest DataValue of each monitored node, as
    asyncua's subscription calls `datachange_notification` with it."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.subscription: Any = None
        self.watched: set[ua.NodeId] = set()
        self.values: dict[ua.NodeId, ua.DataValue] = {}
        self.notifications = 0
        self.dead: str | None = None
        """Why the server ended the subscription (its StatusChangeNotification), if it did."""

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.values[node.nodeid] = data.monitored_item.Value
        self.notifications += 1

    def status_change_notification(self, status: Any) -> None:
        """The server ended the subscription (e.g. BadTimeout): stop answering from it."""
        code = getattr(status, "Status", status)
        code = code if isinstance(code, ua.StatusCode) else ua.StatusCode(int(code))
        if not code.is_good():
            self.dead = code.name
            self.values.clear()


_INTEGER_TYPES = {ua.VariantType.SByte, ua.VariantType.Byte, ua.VariantType.Int16, ua.VariantType.UInt16,
                  ua.VariantType.Int32, ua.VariantType.UInt32, ua.VariantType.Int64, ua.VariantType.UInt64}
_NUMBER_TYPES = {ua.VariantType.Boolean, ua.VariantType.Float, ua.VariantType.Double, *_INTEGER_TYPES}
_DEFAULT_RANGES = {"limit_pct": (0.0, 100.0), "limit_enabled": (0.0, 1.0)}
"""Setpoints whose range is in their meaning, for servers that publish none."""


@dataclass(frozen=True)
class _Point:
    name: str
    node: ua.NodeId
    status: bool = False
    conv: Conversion = Conversion()


def _segments(path: str, ns: int) -> list[ua.QualifiedName]:
    """'Plant/Inverter01/P' -> browse names in namespace `ns`; 'N:Name' names namespace N."""
    out = []
    for seg in (s for s in path.strip("/").split("/") if s):
        idx, sep, name = seg.partition(":")
        out.append(ua.QualifiedName(name, int(idx)) if sep and idx.isdigit() else ua.QualifiedName(seg, ns))
    return out


class OpcUaDevice(Device):
    """An OPC UA device: our information model (`urn:testbed:devices`, or the same layout
    under another namespace URI), or a foreign server's nodes through a node map.

    `connect()` resolves every point's node (one TranslateBrowsePaths request) and reads
    the setpoints' EURange; `read()` is one Read request for all of the device's
    variables, or (mode `subscribe`) the latest values its monitored items delivered;
    `write()` one Write request. Values convert to neutral units as the map says.
    """

    def __init__(self, name: str, link: OpcUaLink, kind: DeviceKind | str | None = None,
                 browse_name: str | None = None, *, config: Any = None) -> None:
        self.name = name
        self.link = link
        self.config = config
        """An `OpcUaDeviceConfig` of the site file (None: our model, polled)."""
        self.namespace: str = config.namespace if config is not None else NAMESPACE_URI
        self.browse_name = browse_name or (config.device if config is not None else None) or name
        self.mapped = bool(config is not None and config.mapped)
        self.mode: str = config.mode if config is not None else "poll"
        self.publishing_interval_s: float = config.publishing_interval_s if config is not None else 1.0
        self.kind = DeviceKind(kind) if kind else None  # type: ignore[assignment]
        self.nodes: dict[str, ua.NodeId] = {}
        self.conversions: dict[str, Conversion] = {}
        self.ranges: dict[str, tuple[float, float]] = {}
        self.range_source: dict[str, str] = {}
        self._vtypes: dict[str, ua.VariantType] = {}
        self._points: list[_Point] = []
        self._params = ua.ReadParameters()
        self._feed: _Feed | None = None
        self._generation = -1

    @property
    def endpoint(self) -> str:
        if self.mapped:
            return f"{self.link.endpoint} {self.config.root or 'Objects'}"
        return f"{self.link.endpoint} {DEVICES_FOLDER}/{self.browse_name}"

    def _named(self, exc: DeviceError) -> DeviceError:
        if self.name in str(exc):
            return exc
        return type(exc)(self._err(str(exc).removeprefix(f"{self.link.endpoint}: ")))

    async def connect(self) -> None:
        try:
            await self.link.ensure()
            await self._discover()
        except DeviceError as exc:
            raise self._named(exc) from exc

    async def _discover(self) -> None:
        ns = self.link.namespace_index(self.namespace)
        if self.mapped:
            await self._discover_mapped(ns)
        else:
            await self._discover_model(ns)
        self.nodes = {p.name: p.node for p in self._points if not p.status}
        self.conversions = {p.name: p.conv for p in self._points if not p.status}
        assert self.kind is not None
        self._points = [p for p in self._points if p.status or p.name in MEASUREMENTS[self.kind]]
        self._params = ua.ReadParameters(NodesToRead=[
            ua.ReadValueId(NodeId=p.node, AttributeId=ua.AttributeIds.Value) for p in self._points])
        await self._read_ranges()
        self._feed = None
        if self.mode == "subscribe":
            feed = await self.link.feed(self.publishing_interval_s)
            await self.link.monitor(feed, [p.node for p in self._points])
            self._feed = feed
        self._generation = self.link.generation

    async def _missing(self, start: ua.NodeId, start_label: str, path: list[ua.QualifiedName],
                       what: str) -> NodeMissing:
        """Which segment of a browse path is missing, and what its parent has instead."""
        node, label = start, start_label
        for i, seg in enumerate(path):
            (found,) = await self.link.translate(start, [path[:i + 1]])
            if found is None:
                children = await self.link.browse_children(node)
                full = "/".join([start_label, *(q.Name for q in path)])
                return NodeMissing(self._err(
                    f"no node {full} for {what} in namespace {self.namespace}: {label} has no "
                    f"{seg.Name!r} (it has: {', '.join(sorted(children)) or 'nothing'})"))
            node, label = found, f"{label}/{seg.Name}"
        return NodeMissing(self._err(f"no node {label} for {what}"))

    async def _discover_model(self, ns: int) -> None:
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        path = _segments(f"{DEVICES_FOLDER}/{self.browse_name}", ns)
        (node,) = await self.link.translate(objects, [path])
        if node is None:
            raise await self._missing(objects, "Objects", path, f"device {self.browse_name!r}")
        children = await self.link.browse_children(node)
        status = await self.link.browse_children(children["status"]) if "status" in children else {}
        kind_node = children.get("kind")
        dvs = await self.link.read_attribute([kind_node], ua.AttributeIds.Value) if kind_node else []
        served = dvs[0].Value.Value if dvs and dvs[0].Value is not None else None
        if self.kind is None:
            if served not in {k.value for k in DeviceKind}:
                raise DeviceError(self._err(f"cannot tell the device kind (kind = {served!r})"))
            self.kind = DeviceKind(served)
        elif served is not None and served != self.kind.value:
            raise DeviceError(self._err(f"configured as {self.kind.value} but the server says {served}"))
        missing = [n for n in MEASUREMENTS[self.kind] if n not in children]
        if missing:
            log.info("%s: server lacks %s", self.name, missing)
        names = dict.fromkeys((*MEASUREMENTS[self.kind], *SETPOINTS[self.kind]))
        self._points = [_Point(n, children[n]) for n in names if n in children]
        self._points += [_Point(k, v, status=True) for k, v in status.items()]
        self._vtypes = {}

    async def _discover_mapped(self, ns: int) -> None:
        cfg = self.config
        if self.kind is None:
            raise DeviceError(self._err("a node-mapped device needs its kind in the site file"))
        root = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        root_label = "Objects"
        if cfg.root:
            path = _segments(cfg.root, ns)
            (found,) = await self.link.translate(root, [path])
            if found is None:
                raise await self._missing(root, "Objects", path, "the device root")
            root, root_label = found, f"Objects/{cfg.root.strip('/')}"
        entries = [(n, pm, False) for n, pm in cfg.points.items()]
        entries += [(n, pm, True) for n, pm in cfg.status.items()]
        by_path = [(n, pm, st) for n, pm, st in entries if pm.path is not None]
        found_nodes = await self.link.translate(root, [_segments(pm.path, ns) for _, pm, _ in by_path])
        points: list[_Point] = []
        for (n, pm, st), node in zip(by_path, found_nodes, strict=True):
            if node is None:
                raise await self._missing(root, root_label, _segments(pm.path, ns), n)
            points.append(_Point(n, node, st, Conversion.of(pm.scale, pm.offset, pm.unit)))
        for n, pm, st in entries:
            if pm.node is None:
                continue
            try:
                nid = ua.NodeId.from_string(pm.node)
            except (ValueError, KeyError, IndexError, ua.UaError) as exc:
                raise NodeMissing(self._err(f"{n}: {pm.node!r} is not a NodeId ({exc})")) from None
            uri = getattr(nid, "NamespaceUri", None)
            if uri:
                nid = ua.NodeId(nid.Identifier, self.link.namespace_index(uri), nid.NodeIdType)
            points.append(_Point(n, nid, st, Conversion.of(pm.scale, pm.offset, pm.unit)))
        order = {n: i for i, (n, _, _) in enumerate(entries)}
        points.sort(key=lambda p: order[p.name])
        # every node exists, and the data type a write must carry
        types = await self.link.read_attribute([p.node for p in points], ua.AttributeIds.DataType)
        self._vtypes = {}
        for p, dv in zip(points, types, strict=True):
            if dv.StatusCode is not None and not dv.StatusCode.is_good():
                where = cfg.points.get(p.name) or cfg.status.get(p.name)
                raise NodeMissing(self._err(f"no node {where.node or where.path} for {p.name} "
                                            f"({p.node.to_string()}: {dv.StatusCode.name})"))
            dt_id = dv.Value.Value if dv.Value is not None else None
            if isinstance(dt_id, ua.NodeId) and dt_id.NamespaceIndex == 0 and isinstance(dt_id.Identifier, int):
                with contextlib.suppress(ValueError):
                    self._vtypes[p.name] = ua.VariantType(dt_id.Identifier)
        self._points = points

    async def _read_ranges(self) -> None:
        """Setpoint ranges in neutral units: the server's EURange, else the site file's range,
        else what the setpoint's meaning allows (limit_pct 0..100)."""
        assert self.kind is not None
        self.ranges, self.range_source = {}, {}
        sps = [n for n in SETPOINTS[self.kind] if n in self.nodes]
        eus = await self.link.translate([self.nodes[n] for n in sps],
                                        [[ua.QualifiedName("EURange", 0)]] * len(sps))
        found = [(n, nid) for n, nid in zip(sps, eus, strict=True) if nid is not None]
        if found:
            dvs = await self.link.read_attribute([nid for _, nid in found], ua.AttributeIds.Value)
            for (n, _), dv in zip(found, dvs, strict=True):
                r = dv.Value.Value if dv.Value is not None else None
                if isinstance(r, ua.Range):
                    self.ranges[n] = self.conversions[n].range_to_neutral(r.Low, r.High)
                    self.range_source[n] = "the server's EURange"
        for n in sps:
            pm = self.config.points.get(n) if self.mapped else None
            if n in self.ranges:
                continue
            if pm is not None and pm.range is not None:
                self.ranges[n], self.range_source[n] = pm.range, "the site file"
            elif n in _DEFAULT_RANGES:
                self.ranges[n], self.range_source[n] = _DEFAULT_RANGES[n], "its meaning"

    async def _ready(self) -> None:
        if not self.link._usable() or self._generation != self.link.generation:
            await self.link.ensure()
            if self._generation != self.link.generation:
                await self._discover()

    async def _values(self) -> list[ua.DataValue]:
        feed = self._feed
        if feed is not None and feed.dead:  # the server ended it: subscribe again
            log.warning("%s: subscription ended by the server (%s); subscribing again", self.name, feed.dead)
            self._feed = None
            feed = await self.link.feed(self.publishing_interval_s)
            await self.link.monitor(feed, [p.node for p in self._points])
            self._feed = feed
        if feed is not None and feed.generation == self.link.generation:
            vals = feed.values
            try:
                out = [vals[p.node] for p in self._points]
            except KeyError:  # not every item has delivered its first value yet
                pass
            else:
                await asyncio.sleep(0)  # a read is a turn of the loop, as a request would be
                return out
        return await self.link.read(self._params)

    async def read(self) -> Reading:
        try:
            await self._ready()
            dvs = await self._values()
        except DeviceError as exc:
            raise self._named(exc) from exc
        values: dict[str, Any] = {}
        status: dict[str, Any] = {}
        for p, dv in zip(self._points, dvs, strict=True):
            v = dv.Value.Value if dv.Value is not None and (dv.StatusCode is None or dv.StatusCode.is_good()) else None
            if p.status:
                status[p.name] = (v or None) if p.name == "clamp" else v
            elif isinstance(v, bool | int | float) and not p.conv.identity:
                values[p.name] = p.conv.to_neutral(float(v))
            else:
                values[p.name] = float(v) if isinstance(v, bool | int) else v
        assert self.kind is not None
        return Reading(self.name, self.kind, time.time(), values, status)

    async def write(self, point: str, value: float) -> None:
        await self.write_many({point: value})

    def _write_value(self, point: str, value: float) -> ua.WriteValue:
        raw = self.conversions[point].to_raw(float(value))
        vt = self._vtypes.get(point, ua.VariantType.Double)
        if vt not in _NUMBER_TYPES:
            vt = ua.VariantType.Double
        v: Any = bool(round(raw)) if vt is ua.VariantType.Boolean else \
            int(round(raw)) if vt in _INTEGER_TYPES else float(raw)
        return ua.WriteValue(NodeId=self.nodes[point], AttributeId=ua.AttributeIds.Value,
                             Value=ua.DataValue(ua.Variant(v, vt)))

    async def write_many(self, setpoints: Mapping[str, float]) -> None:
        """Several setpoints of this device in one Write request. Values outside a
        setpoint's range are refused before anything is sent; writing `limit_pct` also
        enables the limit (as on Modbus)."""
        try:
            await self._ready()
        except DeviceError as exc:
            raise self._named(exc) from exc
        assert self.kind is not None
        setpoints = dict(setpoints)
        if "limit_pct" in setpoints and "limit_enabled" in self.nodes:
            setpoints.setdefault("limit_enabled", 1.0)
        items = []
        for point, value in setpoints.items():
            if point not in SETPOINTS[self.kind] or point not in self.nodes:
                known = [n for n in SETPOINTS[self.kind] if n in self.nodes]
                raise SetpointRejected(self._err(f"{point!r} is not a setpoint of a {self.kind.value} "
                                                 f"(setpoints: {', '.join(known) or 'none'})"))
            unit = SETPOINTS[self.kind][point].unit
            rng = self.ranges.get(point)
            if rng is not None and not within(float(value), *rng):
                raise SetpointRejected(self._err(
                    f"{point} {float(value):g} {unit} is outside {rng[0]:g}..{rng[1]:g} {unit} "
                    f"(range from {self.range_source[point]}); nothing written"))
            if point == "limit_enabled" and float(value) not in (0.0, 1.0):
                raise SetpointRejected(self._err(f"limit_enabled must be 0 or 1, got {float(value):g}"))
            items.append((point, value, self._write_value(point, value)))
        try:
            results = await self.link.write(ua.WriteParameters(NodesToWrite=[w for _, _, w in items]))
        except DeviceError as exc:
            raise self._named(exc) from exc
        refused = []
        for (point, value, _), status in zip(items, results, strict=True):
            if not status.is_good():
                unit = SETPOINTS[self.kind][point].unit
                rng = self.ranges.get(point)
                allowed = f"; allowed {rng[0]:g}..{rng[1]:g} {unit}" if rng else ""
                refused.append(f"{point}={float(value):g} {unit} refused ({status.name}{allowed})")
        if refused:
            raise SetpointRejected(self._err("; ".join(refused)))

    async def close(self) -> None:
        await self.link.aclose()
