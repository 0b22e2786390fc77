"""Proof-of-Energy proposer election (paper eq. 9).

CPF = exp(-|P - C|) over a validator's latest `cpf_window` certified readings (P: local
production, C: consumption including storage, kWh). The validator whose CPF is closest to
1 proposes the next block. Ranking uses |P - C| rounded to 1 µWh, an integer, so every
node orders exactly alike whatever its libm; ties (and validators without readings, which
come last) break by sha256(previous block hash | address), which nobody can choose.
Round r of a height belongs to the (r mod n)-th validator in that order: when the elected
proposer is silent past the round timeout, the next one takes over.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from testbed.ledger.state import LedgerState, Reading

NO_READINGS = 2**62


@dataclass(frozen=True)
class Standing:
    address: str
    cpf: float
    production_kwh: float
    consumption_kwh: float
    readings: tuple[str, ...]
    """Ids of the certified readings the CPF was computed from (the evidence)."""

    def evidence(self) -> dict[str, Any]:
        return {"cpf": self.cpf, "readings": list(self.readings)}


def cpf(production_kwh: float, consumption_kwh: float) -> float:
    return math.exp(-abs(production_kwh - consumption_kwh))


def standing(state: LedgerState, address: str) -> Standing:
    rs: tuple[Reading, ...] = state.readings.get(address, ())[-state.params.cpf_window:]
    if not rs:
        return Standing(address, 0.0, 0.0, 0.0, ())
    p = math.fsum(r.production_kwh for r in rs)
    c = math.fsum(r.consumption_kwh for r in rs)
    return Standing(address, cpf(p, c), p, c, tuple(r.tx for r in rs))


def _key(state: LedgerState, s: Standing) -> tuple[int, str]:
    gap = NO_READINGS if not s.readings else round(abs(s.production_kwh - s.consumption_kwh)
                                                   * 1e9)
    tie = hashlib.sha256(f"{state.head}|{s.address}".encode()).hexdigest()
    return gap, tie


def ranking(state: LedgerState) -> list[Standing]:
    """Validators from best (CPF closest to 1) to worst, for the block after `state.head`."""
    standings = [standing(state, a) for a in state.validators()]
    return sorted(standings, key=lambda s: _key(state, s))


def proposer(state: LedgerState, round_: int = 0) -> Standing:
    order = ranking(state)
    return order[round_ % len(order)]
