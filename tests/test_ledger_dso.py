"""The DSO as an identity: its key is in genesis, it signs the grid check of a dispatch,
and the ledger takes an award's caps only from that signed check (re-executed by every
validator against pandapower's verdict as recorded)."""

from __future__ import annotations

import pytest
from conftest import make_site
from ledger_net import make_net

from testbed.grid.check import GridChecker, Light
from testbed.grid.network import load_network, map_prosumers
from testbed.grid.reclear import reclear
from testbed.ledger.chain import verify_store
from testbed.ledger.errors import Reason
from testbed.ledger.setup import init_ledger
from testbed.market.auction import CONTRACT
from testbed.market.orders import Order, Side

FAR = {"far-1": "Bus C20", "far-2": "Bus C19"}


def test_init_ledger_registers_the_dso_with_its_own_key(tmp_path):
    layout = init_ledger(make_site(), tmp_path / "ledger", seed=1)
    dso = layout.key("dso")
    assert (layout.key_path("dso").stat().st_mode & 0o777) == 0o600
    entries = {e["name"]: e for e in layout.genesis().header["registry"]}
    assert entries["dso"]["roles"] == ["dso"]
    assert entries["dso"]["public_key"] == dso.public.hex()


def test_a_grid_checked_dispatch_commits_with_the_dsos_signature(tmp_path):
    """The re-clear's caps come from a real power flow; the DSO signs them, the award
    re-executes with them on every validator, and `verify` re-checks it all from disk."""
    net = make_net(2, stores=[str(tmp_path / "a.db"), str(tmp_path / "b.db")])
    gate = int(net.time) + 10
    req = net.auction(CONTRACT, energy=60.0, price=0.5, interval=7, gate=gate)
    net.commit([req])
    offers = [net.order(k, req.id, energy=25.0, price=p)
              for k, p in zip(net.validators, (0.10, 0.11), strict=True)]
    net.commit(offers)
    net.time = gate + 1
    grid = load_network("cigre-lv")
    checker = GridChecker(grid, map_prosumers(grid, list(FAR), FAR))
    orders = [Order(o.id, o.client_id, Side.SELL, 25.0, p, 7)
              for o, p in zip(offers, (0.10, 0.11), strict=True)]
    res = reclear(Order(req.id, net.aggregator.address, Side.BUY, 60.0, 0.5, 7), orders,
                  checker=checker, locate=dict(zip([o.id for o in offers], FAR, strict=True)),
                  base_w={}, background=0.0)
    assert res.passed and res.clearing.caps and res.rounds[0].report.light is Light.RED
    check = res.grid_check(net.dso, req.id, at=net.time)
    assert check.client_id == net.dso.address and check.parameters["light"] == str(
        res.report.light) and check.parameters["rounds"] == len(res.rounds)
    award = net.award(req.id, CONTRACT, [o.id for o in offers], res.clearing.to_dict(),
                      caps=dict(res.clearing.caps))
    # without the DSO's check the aggregator's caps are only a claim
    assert net.propose([award]).dropped[0][1].reason == Reason.NOT_AUTHORISED
    p = net.commit([award, check])  # arrival order does not matter: the check goes first
    assert not p.dropped and [m.operation for m in p.txs] == ["grid-check", "award"]
    g = net.chain.state.grid_checks[req.id]
    assert g.caps == pytest.approx(res.clearing.caps) and g.passed
    for c in net.chains:
        c.store.close()
    report = verify_store(tmp_path / "a.db", genesis=net.genesis)
    assert report.ok and report.height == net.chain.height
