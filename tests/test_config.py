"""Site files: the bundled demo loads; bad files name file, line, field and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.config import ConfigError, load_site


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(text)
    return p


GOOD = """\
name: lab
prosumers:
  - name: h1
    devices:
      - {name: h1-pv, kind: pv, port: 1502, unit: 1}
      - name: h1-bat
        kind: battery
        port: 1502
        unit: 2
        params:
          capacity_wh: 5000
          soc_min: 0.2
"""


def test_demo_site_has_three_full_prosumers():
    site = load_site("demo")
    assert len(site.prosumers) >= 3
    for p in site.prosumers:
        assert {d.kind.value for d in p.devices} == {"pv", "battery", "meter"}


def test_good_file_loads_with_typed_params(tmp_path):
    site = load_site(write(tmp_path, GOOD))
    _, bat = site.find("h1-bat")
    assert bat.params.capacity_wh == 5000 and bat.params.soc_min == 0.2
    assert site.prosumers[0].physics(0).battery.capacity_wh == 5000


@pytest.mark.parametrize("edit, expected", [
    (("soc_min: 0.2", "soc_min: 1.5"),
     r"site.yaml:12: prosumers\[0\].devices\[1\].params.soc_min: Input should be less than or equal to 1 \(got 1.5\)"),
    (("kind: battery", "kind: flywheel"),
     r"site.yaml:7: prosumers\[0\].devices\[1\].kind: expected one of battery, meter, pv \(got 'flywheel'\)"),
    (("capacity_wh: 5000", "capacity_wh: lots"),
     r"site.yaml:11: prosumers\[0\].devices\[1\].params.capacity_wh: Input should be a valid number"),
    (("unit: 2", "unit: 300"),
     r"site.yaml:9: prosumers\[0\].devices\[1\].unit: Input should be less than or equal to 247 \(got 300\)"),
    (("unit: 2", "unit: 2\n        colour: red"),
     r"site.yaml:10: prosumers\[0\].devices\[1\].colour: Extra inputs are not permitted"),
    (("name: h1-bat", "name: h1-pv"), r"name 'h1-pv' is used twice"),
    (("unit: 2", "unit: 1"), r"devices 'h1-pv' and 'h1-bat' share 127.0.0.1:1502 unit 1"),
    (("soc_min: 0.2", "soc_min: 0.99"), r"soc_min \(0.99\) must be below soc_max"),
])
def test_bad_site_files_say_where_and_what(tmp_path, edit, expected):
    with pytest.raises(ConfigError, match=expected):
        load_site(write(tmp_path, GOOD.replace(*edit)))


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"site.yaml:4: not valid YAML"):
        load_site(write(tmp_path, "name: x\nprosumers:\n  - {name: [\n"))


def test_missing_file_and_wrong_top_level(tmp_path):
    with pytest.raises(ConfigError, match="no such site file"):
        load_site(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_site(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"site.yaml:1: prosumers: Field required"):
        load_site(write(tmp_path, "name: lab\n"))


def test_port_zero_only_for_emulated(tmp_path):
    text = GOOD.replace("{name: h1-pv, kind: pv, port: 1502, unit: 1}",
                        "{name: h1-pv, kind: pv, port: 0, unit: 1, emulated: false}")
    with pytest.raises(ConfigError, match="port 0 .* only meaningful for emulated"):
        load_site(write(tmp_path, text))
