"""`testbed ledger init`: keys, registry and genesis for a site's prosumers.

Layout of the ledger folder:

    genesis.json          the signed genesis block (share it; it is the chain id)
    keys/admin.key        registry administrator (keep offline)
    keys/audit.key        32-byte key that maps pseudonyms back to identities (auditor)
    keys/aggregator.key   the VPP aggregator
    keys/dso.key          the DSO: signs the grid check of every dispatch (caps, light)
    keys/<prosumer>.key   each prosumer's HEM / certified meter key (validator + meter)
    keys/validator-<k>.key  operator validators beyond the prosumers (no meter), if asked
    nodes/<name>.db       each validator's SQLite store, holding genesis
    nodes/<name>.db.votes what the validator signed in consensus (fsync'd, never sign twice)
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from testbed.config import SiteConfig
from testbed.ledger import transactions as T
from testbed.ledger.blocks import Block
from testbed.ledger.chain import Chain, make_genesis
from testbed.ledger.identity import KeyPair
from testbed.ledger.state import MICRO, POOL, Params
from testbed.market.orders import MarketRules


@dataclass(frozen=True)
class LedgerLayout:
    root: Path

    @property
    def genesis_path(self) -> Path:
        return self.root / "genesis.json"

    def key_path(self, name: str) -> Path:
        return self.root / "keys" / f"{name}.key"

    def db_path(self, name: str) -> Path:
        return self.root / "nodes" / f"{name}.db"

    def genesis(self) -> Block:
        try:
            raw = self.genesis_path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{self.genesis_path}: cannot read genesis ({exc.strerror}); "
                             "run `testbed ledger init` first") from None
        return Block.parse(raw.strip(), genesis=True)

    def key(self, name: str) -> KeyPair:
        return KeyPair.load(self.key_path(name))

    def audit_key(self) -> bytes:
        """The auditor's key: maps pseudonyms back to identities (`ledger reveal`)."""
        from testbed.ledger.pseudonyms import load_audit_key
        return load_audit_key(self.key_path("audit"))

    def validators(self) -> list[str]:
        g = self.genesis()
        return [e["name"] for e in g.header["registry"] if "validator" in e["roles"]]


def init_ledger(site: SiteConfig, root: Path, *, params: Params | None = None,
                aggregator_funds_eur: float = 10_000.0, pool_eur: float = 100.0,
                prosumer_funds_eur: float = 0.0, validators: int | None = None,
                modes: dict[str, str] | None = None, time: float | None = None,
                seed: int | None = None, force: bool = False,
                rules: MarketRules | None = None) -> LedgerLayout:
    """Generate keys and a genesis registering every prosumer's meter/HEM; the first
    `validators` prosumers (default: all) also validate, and when `validators` exceeds the
    prosumers, operator nodes `validator-<k>` (no meter) make up the rest. With `seed`, keys are derived
    from it (reproducible scenario runs; never for a real deployment). `rules` (default:
    `params.market`) are the market rules the chain's auction contract clears under."""
    if rules is not None:
        params = replace(params or Params(), market=rules.to_dict())
    layout = LedgerLayout(Path(root))
    if layout.genesis_path.exists() and not force:
        raise FileExistsError(f"{layout.genesis_path} exists; pass force to start a new chain")

    def new_key(name: str) -> KeyPair:
        if seed is None:
            return KeyPair.generate()
        return KeyPair.from_seed(f"testbed-scenario/{seed}/{site.name}/{name}".encode())

    admin, aggregator, dso = new_key("admin"), new_key("aggregator"), new_key("dso")
    admin.save(layout.key_path("admin"))
    aggregator.save(layout.key_path("aggregator"))
    dso.save(layout.key_path("dso"))
    audit = layout.key_path("audit")
    fd = os.open(audit, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write((secrets.token_hex(32) if seed is None else new_key("audit").public.hex())
                 + "\n")
    registry = [T.entry_dict("aggregator", aggregator.public, meter_type="none",
                             roles=["aggregator"]),
                T.entry_dict("dso", dso.public, meter_type="none", serial=site.name,
                             roles=["dso"])]
    n_validators = len(site.prosumers) if validators is None else validators
    funds = {}
    for i, p in enumerate(site.prosumers):
        key = new_key(p.name)
        key.save(layout.key_path(p.name))
        if prosumer_funds_eur:
            funds[key.address] = int(prosumer_funds_eur * MICRO)
        meter = next((d for d in p.devices if d.kind.value == "meter"), None)
        serial = f"{site.name}/{meter.name}" if meter else f"{site.name}/{p.name}"
        registry.append(T.entry_dict(p.name, key.public, meter_type="SunSpec 203 (emulated)",
                                     serial=serial,
                                     roles=["validator", "meter"] if i < n_validators
                                     else ["meter"],
                                     mode=(modes or {}).get(p.name, "RE+TE")))
    # validators beyond the prosumers: operator nodes that validate but meter nothing (a
    # BFT chain needs n >= 4 to tolerate one fault; small sites still get that)
    extra = [f"validator-{len(site.prosumers) + i + 1}"
             for i in range(max(0, n_validators - len(site.prosumers)))]
    for name in extra:
        key = new_key(name)
        key.save(layout.key_path(name))
        registry.append(T.entry_dict(name, key.public, meter_type="none", roles=["validator"],
                                     mode="TE"))
    genesis = make_genesis(admin, registry, params=params, time=time, name=site.name,
                           allocations={aggregator.address: int(aggregator_funds_eur * MICRO),
                                        POOL: int(pool_eur * MICRO), **funds})
    layout.genesis_path.write_bytes(genesis.raw + b"\n")
    for name in [p.name for p in site.prosumers[:n_validators]] + extra:
        db = layout.db_path(name)
        if db.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        chain = Chain.open(db, genesis=genesis)
        assert chain.store is not None
        chain.store.close()
    return layout
