"""The federation's naming scheme (the interface another federate implements).

Every key is `testbed/<site>/<object>/<quantity>`, a HELICS global publication:

inputs of the emulator shards (published by the run, subscribed by the shards)
    testbed/<site>/dt_s                     double, s, the step to advance by
    testbed/<site>/irradiance_w_m2          double, W/m2, plane of array, the whole site
    testbed/<site>/<prosumer>/load_w        double, W, household load of the prosumer
    testbed/<site>/<prosumer>/v_v           double, V, terminal voltage (NaN: nominal)
    testbed/<site>/<prosumer>/external_w    double, W, real devices behind its meter
    testbed/<site>/<device>/state           string: online | offline | silent
outputs of the emulator shards
    testbed/<site>/<device>/p_w             double, W (+ generation/discharge; meter: + import)
    testbed/<site>/<device>/q_var           double, var
    testbed/<site>/<device>/endpoint        string (JSON): where the device answers
the feeder federate (subscribes to the run's measured injections, publishes voltages)
    testbed/<site>/<prosumer>/p_inj_w       double, W, measured injection (+ export)
    testbed/<site>/<prosumer>/q_inj_var     double, var
    testbed/<site>/<prosumer>/vm_pu         double, p.u., voltage at its bus (feeder)
    testbed/<site>/feeder/check             string (JSON), the power flow's check (feeder)
"""

from __future__ import annotations


def key(site: str, *parts: str) -> str:
    return "/".join(("testbed", site, *parts))


def irradiance(site: str) -> str:
    return key(site, "irradiance_w_m2")


def load_w(site: str, prosumer: str) -> str:
    return key(site, prosumer, "load_w")


def v_v(site: str, prosumer: str) -> str:
    return key(site, prosumer, "v_v")


def external_w(site: str, prosumer: str) -> str:
    return key(site, prosumer, "external_w")


def state(site: str, device: str) -> str:
    return key(site, device, "state")


def p_w(site: str, device: str) -> str:
    return key(site, device, "p_w")


def q_var(site: str, device: str) -> str:
    return key(site, device, "q_var")


def endpoint(site: str, device: str) -> str:
    return key(site, device, "endpoint")


def dt_s(site: str) -> str:
    """double, s: the step the shards advance by (published with the inputs)."""
    return key(site, "dt_s")


# the feeder federate's interface (the bundled pandapower feeder, or a user's simulator)
def p_inj_w(site: str, prosumer: str) -> str:
    """double, W: the prosumer's measured injection into the grid (+ = export), from the
    run each step at t1 + dt/10; NaN when the run has no reading."""
    return key(site, prosumer, "p_inj_w")


def q_inj_var(site: str, prosumer: str) -> str:
    """double, var: its reactive injection."""
    return key(site, prosumer, "q_inj_var")


def vm_pu(site: str, prosumer: str) -> str:
    """double, p.u.: the voltage at the prosumer's bus from the feeder's power flow
    (NaN when the flow did not converge), published before t1 + dt/5."""
    return key(site, prosumer, "vm_pu")


def feeder_check(site: str) -> str:
    """string (JSON): the step's check: converged, light (green/amber/red), vm_min_pu,
    vm_max_pu, max_line_pct, max_trafo_pct, losses_w, import_w."""
    return key(site, "feeder", "check")
