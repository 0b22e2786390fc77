"""The federation's naming scheme (the interface another federate implements).

Every key is `testbed/<site>/...`: HELICS global publications and endpoints. Per step,
the run and the emulator shards exchange one value and one message per shard (not one
per device quantity: HELICS's cost is per publication, and a 50-prosumer site had ~450):

inputs of the emulator shards (published by the run, subscribed by every shard)
    testbed/<site>/inputs                   string (JSON), once per step:
        {"t0": s, "dt": s, "irradiance_w_m2": W/m2 (plane of array, the whole site),
         "prosumers": {<prosumer>: [load_w, v_v or null (nominal), external_w]},
         "states": {<device>: "offline" | "silent"}}   (devices not listed: online)
outputs of the emulator shards (a message from each shard's endpoint to the run's)
    testbed/<site>/shard/<K>of<N>           endpoint of shard K of N, sends each step
    testbed/<site>/run                      endpoint of the run, receives
        {"t": t1, "pq": {<device>: [P W (+ generation/discharge; meter: + import), Q var]}}
    testbed/<site>/<device>/endpoint        string (JSON), once before executing mode:
                                            where the device answers
the feeder federate (subscribes to the run's measured injections, publishes voltages)
    testbed/<site>/feeder/injections        string (JSON), from the run:
        {"t": t1, "prosumers": {<prosumer>: [P W (+ export) or null, Q var]}}
    testbed/<site>/feeder/check             string (JSON), from the feeder: the power
        flow's check and {"vm_pu": {<prosumer>: p.u. at its bus or null}}
"""

from __future__ import annotations


def key(site: str, *parts: str) -> str:
    return "/".join(("testbed", site, *parts))


def inputs(site: str) -> str:
    """string (JSON): the step's inputs of every shard (see the module's docstring)."""
    return key(site, "inputs")


def run_endpoint(site: str) -> str:
    """The run's endpoint: each shard sends it its devices' P and Q every step."""
    return key(site, "run")


def shard_endpoint(site: str, k: int, n: int) -> str:
    return key(site, "shard", f"{k}of{n}")


def endpoint(site: str, device: str) -> str:
    return key(site, device, "endpoint")


# the feeder federate's interface (the bundled pandapower feeder, or a user's simulator)
def injections(site: str) -> str:
    """string (JSON), from the run each step at t1 + dt/10: {"t": t1, "prosumers":
    {<prosumer>: [P W (+ export; null when the run has no reading), Q var]}};
    {"end": true} when the run leaves."""
    return key(site, "feeder", "injections")


def feeder_check(site: str) -> str:
    """string (JSON), published before t1 + dt/5: the step's check: converged, light
    (green/amber/red), vm_min_pu, vm_max_pu, max_line_pct, max_trafo_pct, losses_w,
    import_w (null when unknown) and vm_pu: {<prosumer>: p.u. at its bus, or null}."""
    return key(site, "feeder", "check")
