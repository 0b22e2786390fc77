"""Energy and money quanta of the market: the one place where floats become integers.

Auctions, settlement and the ledger must agree to the last digit (validators compare
canonical bytes), and sums of floats drift. So quantities are counted in integers:

- energy in **mWh** (1e-6 kWh): a meter's resolution is 1 Wh, so nothing real is lost,
  and an auction that counts in mWh can never award a float ulp more than was asked;
- money in **micro-euros** (1e-6 EUR), as `int`.

`amount_ueur` is THE rounding function for money: every payment, award amount and
penalty goes through it, so the same energy at the same price always costs the same.
"""

from __future__ import annotations

import math

MWH_PER_KWH = 1_000_000
"""Energy quanta (mWh) per kWh."""
UEUR_PER_EUR = 1_000_000
"""Micro-euros per euro."""


def to_mwh(energy_kwh: float) -> int:
    """kWh -> whole mWh, round half to even (Python `round`, IEEE-754: same on every host)."""
    return round(energy_kwh * MWH_PER_KWH)


def floor_mwh(energy_kwh: float) -> int:
    """kWh -> whole mWh rounded down: for limits that must never be exceeded (battery room)."""
    return math.floor(energy_kwh * MWH_PER_KWH + 1e-6)  # forgive float noise, not energy


def to_kwh(energy_mwh: int) -> float:
    return energy_mwh / MWH_PER_KWH


def amount_ueur(energy_kwh: float, price_eur_per_kwh: float) -> int:
    """Money for `energy_kwh` at `price_eur_per_kwh`, in micro-euros.

    The energy is first quantised to mWh (`to_mwh`); then mWh x EUR/kWh is exactly
    micro-euros, rounded half to even once. One rounding, one function, everywhere.
    """
    return round(to_mwh(energy_kwh) * price_eur_per_kwh)


def eur_to_ueur(amount_eur: float) -> int:
    """Back from a stored euro amount (an `amount_ueur` / 1e6) to its exact micro-euros."""
    return round(amount_eur * UEUR_PER_EUR)


def ueur_to_eur(amount: int) -> float:
    return amount / UEUR_PER_EUR
