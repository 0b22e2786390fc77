"""A minimal grid federate: what a GridLAB-D, OpenDSS or PSS/E bridge implements to take
the place of testbed's bundled pandapower feeder (`testbed run ... --feeder-federate`).

The model here is deliberately crude: each prosumer's bus voltage rises linearly with its
own export, V = 1 + k * P (p.u.), k = SENSITIVITY_PU_PER_KW / 1000. Replace `power_flow`
with a call into your simulator.

Run (the broker counts the run, the shards and this federate):
    helics_broker --coretype zmqss -f 4 --port 23404 &
    testbed devices serve SITE --shard 1/2 --helics 127.0.0.1:23404 --free-ports &
    testbed devices serve SITE --shard 2/2 --helics 127.0.0.1:23404 --free-ports &
    python examples/feeder_federate.py SITE_NAME --helics 127.0.0.1:23404 &
    testbed run SCENARIO --helics 127.0.0.1:23404 --feeder-federate

The interface (testbed/cosim/names.py): subscribe to `testbed/<site>/feeder/injections`
(JSON the run publishes at t1 + dt/10 of every step: {"t": t1, "prosumers": {<prosumer>:
[P W, + = export, or null when unread; Q var]}}), be granted that time (an interruptible
federate asking for the end of time is), power-flow, publish `testbed/<site>/feeder/check`
(JSON: converged, light green/amber/red, vm_min_pu, vm_max_pu, max_line_pct,
max_trafo_pct, losses_w, import_w, null when unknown, and vm_pu: {<prosumer>: p.u. or
null}). The run reads it at t1 + dt/5 and feeds the voltages to the emulated devices' next
step. When the run leaves it publishes {"end": true} as the injections.
"""

from __future__ import annotations

import argparse
import json

import helics as h

SENSITIVITY_PU_PER_KW = 0.002


def power_flow(p_inj_w: dict[str, float]) -> dict[str, float]:
    """Bus voltage (p.u.) per prosumer: your simulator goes here."""
    return {n: 1.0 + SENSITIVITY_PU_PER_KW * p / 1000.0 for n, p in p_inj_w.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("site")
    ap.add_argument("--helics", required=True, help="HOST:PORT of the helics_broker")
    args = ap.parse_args()
    fi = h.helicsCreateFederateInfo()
    h.helicsFederateInfoSetCoreTypeFromString(fi, "zmqss")
    h.helicsFederateInfoSetCoreInitString(fi, f"--federates=1 --broker_address=tcp://{args.helics}")
    fed = h.helicsCreateValueFederate("example-feeder", fi)
    key = f"testbed/{args.site}/feeder"
    sub = h.helicsFederateRegisterSubscription(fed, f"{key}/injections", "")
    check = h.helicsFederateRegisterGlobalPublication(fed, f"{key}/check",
                                                      h.HELICS_DATA_TYPE_STRING, "")
    h.helicsFederateEnterExecutingMode(fed)
    steps = 0
    while h.helicsFederateRequestTime(fed, h.HELICS_TIME_MAXTIME) < h.HELICS_TIME_MAXTIME:
        if not h.helicsInputIsUpdated(sub):
            continue
        given = json.loads(h.helicsInputGetString(sub))
        if given.get("end"):
            break
        p_inj = {p: w for p, (w, _q) in given["prosumers"].items() if w is not None}
        vm = power_flow(p_inj)
        h.helicsPublicationPublishString(check, json.dumps({
            "converged": True, "light": "green", "vm_min_pu": min(vm.values()),
            "vm_max_pu": max(vm.values()), "max_line_pct": None, "max_trafo_pct": None,
            "losses_w": 0.0, "import_w": -sum(p_inj.values()), "vm_pu": vm}))
        steps += 1
    h.helicsFederateDisconnect(fed)
    h.helicsFederateFree(fed)
    print(f"example feeder: {steps} steps")


if __name__ == "__main__":
    main()
