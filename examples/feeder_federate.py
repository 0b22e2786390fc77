"""A minimal grid federate: what a GridLAB-D, OpenDSS or PSS/E bridge implements to take
the place of testbed's bundled pandapower feeder (`testbed run ... --feeder-federate`).

The model here is deliberately crude: each prosumer's bus voltage rises linearly with its
own export, V = 1 + k * P (p.u.), k = SENSITIVITY_PU_PER_KW / 1000. Replace `power_flow`
with a call into your simulator.

Run (the broker counts the run, the shards and this federate):
    helics_broker --coretype tcpss -f 4 --port 23404 &
    testbed devices serve SITE --shard 1/2 --helics 127.0.0.1:23404 --free-ports &
    testbed devices serve SITE --shard 2/2 --helics 127.0.0.1:23404 --free-ports &
    python examples/feeder_federate.py SITE_NAME house-1 house-2 ... --helics 127.0.0.1:23404 &
    testbed run SCENARIO --helics 127.0.0.1:23404 --feeder-federate

The interface (testbed/cosim/names.py): subscribe to `testbed/<site>/<prosumer>/p_inj_w`
and `q_inj_var` (the run publishes each prosumer's measured injection, + = export, at
t1 + dt/10 of every step), be granted that time (an interruptible federate asking for
the end of time is), power-flow, publish `testbed/<site>/<prosumer>/vm_pu` (NaN: not
converged) and `testbed/<site>/feeder/check` (JSON: converged, light green/amber/red,
vm_min_pu, vm_max_pu, max_line_pct, max_trafo_pct, losses_w, import_w; null when unknown).
The run reads them at t1 + dt/5 and feeds the voltages to the emulated devices' next step.
"""

from __future__ import annotations

import argparse
import json
import math

import helics as h

SENSITIVITY_PU_PER_KW = 0.002


def power_flow(p_inj_w: dict[str, float]) -> dict[str, float]:
    """Bus voltage (p.u.) per prosumer: your simulator goes here."""
    return {n: 1.0 + SENSITIVITY_PU_PER_KW * p / 1000.0 for n, p in p_inj_w.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("site")
    ap.add_argument("prosumers", nargs="+")
    ap.add_argument("--helics", required=True, help="HOST:PORT of the helics_broker")
    args = ap.parse_args()
    fi = h.helicsCreateFederateInfo()
    h.helicsFederateInfoSetCoreTypeFromString(fi, "tcpss")
    h.helicsFederateInfoSetCoreInitString(fi, f"--federates=1 --broker_address=tcp://{args.helics}")
    fed = h.helicsCreateValueFederate("example-feeder", fi)
    key = f"testbed/{args.site}"
    subs = {p: h.helicsFederateRegisterSubscription(fed, f"{key}/{p}/p_inj_w", "")
            for p in args.prosumers}
    pubs = {p: h.helicsFederateRegisterGlobalPublication(fed, f"{key}/{p}/vm_pu",
                                                          h.HELICS_DATA_TYPE_DOUBLE, "")
            for p in args.prosumers}
    check = h.helicsFederateRegisterGlobalPublication(fed, f"{key}/feeder/check",
                                                      h.HELICS_DATA_TYPE_STRING, "")
    h.helicsFederateEnterExecutingMode(fed)
    steps = 0
    while h.helicsFederateRequestTime(fed, h.HELICS_TIME_MAXTIME) < h.HELICS_TIME_MAXTIME:
        p_inj = {p: h.helicsInputGetDouble(s) for p, s in subs.items()}
        vm = power_flow({p: w for p, w in p_inj.items() if math.isfinite(w)})
        for p, pub in pubs.items():
            h.helicsPublicationPublishDouble(pub, vm.get(p, math.nan))
        h.helicsPublicationPublishString(check, json.dumps({
            "converged": True, "light": "green", "vm_min_pu": min(vm.values()),
            "vm_max_pu": max(vm.values()), "max_line_pct": None, "max_trafo_pct": None,
            "losses_w": 0.0, "import_w": -sum(p_inj.values())}))
        steps += 1
    h.helicsFederateDisconnect(fed)
    h.helicsFederateFree(fed)
    print(f"example feeder: {steps} steps")


if __name__ == "__main__":
    main()
