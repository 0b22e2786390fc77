"""The feeder cache (`grid.cache`): a warm start gives the same checker without pandapower,
anything unsound in the cache is rebuilt, never used."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed.config import load_site
from testbed.grid import GridError, cache, checker_for
from testbed.grid import feeder as feeder_mod
from testbed.grid.check import GridChecker


def reports(checker: GridChecker) -> list[dict]:
    """Reports over random dispatches, a far-end overload and an impossible one included
    (compared by repr: a failed flow's NaN limits compare unequal as floats)."""
    rng = np.random.default_rng(7)
    names = checker.prosumers
    out = []
    for scale in (1e3, 4e3, 2e4, 1e7):
        p = dict(zip(names, map(float, rng.normal(0, scale, len(names))), strict=True))
        q = dict(zip(names, map(float, rng.normal(0, scale / 8, len(names))), strict=True))
        awards = {f"a{i}": (n, 6e3) for i, n in enumerate(names[:4])}
        out.append(checker.check(p, awards, background=0.5, base_q=q).to_dict(detail=True))
    return out


def same(a: GridChecker, b: GridChecker) -> bool:
    return repr(reports(a)) == repr(reports(b))


def build_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every pandapower build `checker_for` does."""
    built: list[str] = []
    real = feeder_mod.load_network

    def spy(spec):  # type: ignore[no-untyped-def]
        built.append(str(spec))
        return real(spec)
    monkeypatch.setattr(feeder_mod, "load_network", spy)
    return built


def test_warm_checker_is_the_cold_one_without_a_build(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    built = build_only(monkeypatch)
    site = load_site("demo")
    cold = checker_for(site, cache_dir=tmp_path)
    assert len(built) == 1
    assert len(list(tmp_path.glob("feeder-*.npz"))) == 1
    warm = checker_for(site, cache_dir=tmp_path)
    assert len(built) == 1  # no second build
    assert warm.restored and not cold.restored
    assert warm.connections == cold.connections
    assert same(warm, cold)  # bit for bit: the same floats, not approx
    assert reports(warm)[-1]["converged"] is False  # the impossible dispatch is in there
    uncached = checker_for(site, use_cache=False)
    assert same(uncached, cold)
    assert len(warm.net.bus) == len(cold.net.bus) == 44  # built on demand (CIGRE LV)
    assert len(built) == 3


def test_warm_start_imports_no_pandapower(tmp_path: Path) -> None:
    checker_for(load_site("demo"), cache_dir=tmp_path)
    code = ("import sys; from testbed.config import load_site; "
            "from testbed.grid import checker_for; "
            f"c = checker_for(load_site('demo'), cache_dir={str(tmp_path)!r}); "
            "assert c.restored, 'not from the cache'; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pandapower'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_key_covers_network_content_mapping_and_versions(tmp_path: Path) -> None:
    f = tmp_path / "feeder.json"
    f.write_text("{}")
    base = cache.key(f, ["a", "b"], {}, "auto")
    assert base is not None
    assert cache.key(f, ["a", "b"], {}, "auto") == base
    f.write_text("{ }")
    assert cache.key(f, ["a", "b"], {}, "auto") != base  # the file's content, not its name
    f.write_text("{}")
    assert cache.key(f, ["b", "a"], {}, "auto") != base
    assert cache.key(f, ["a", "b"], {"a": 3}, "auto") != base
    assert cache.key(f, ["a", "b"], {"a": "3"}, "auto") != cache.key(f, ["a", "b"], {"a": 3},
                                                                     "auto")
    assert cache.key(f, ["a", "b"], {}, "fast") != base
    assert set(base["versions"]) == {"python", "pandapower", "lightsim2grid", "numpy", "scipy"}
    assert base["versions"]["pandapower"] != "missing"
    assert cache.key(tmp_path / "absent.json", ["a"], {}, "auto") is None
    kerber = cache.key("kerber-dorfnetz", ["a"], {}, "auto")
    assert kerber is not None and kerber["network"] == {"bundled": "kerber-dorfnetz",
                                                        "kerber_seed": 0}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "other-key"])
def test_unsound_entry_is_rebuilt_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture,
                                               damage: str) -> None:
    site = load_site("demo")
    cold = checker_for(site, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("feeder-*.npz")
    good = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        entry.write_bytes(good[:100] + bytes(200) + good[300:])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a sound entry of another site under this key's name
        other = tmp_path / "other"
        checker_for(load_site("far-end"), cache_dir=other)
        (o,) = other.glob("feeder-*.npz")
        entry.write_bytes(o.read_bytes())
    built = build_only(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="testbed.grid.cache"):
        again = checker_for(site, cache_dir=tmp_path)
    assert len(built) == 1 and not again.restored  # rebuilt, not trusted
    assert "not used" in caplog.text
    assert same(again, cold)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [entry.name]  # no temp left
    warm = checker_for(site, cache_dir=tmp_path)
    assert warm.restored and same(warm, cold)  # the entry was replaced


def test_cache_off_unwritable_or_failing_build(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_CACHE_DIR", "")
    assert cache.cache_dir() is None
    assert not checker_for(load_site("demo")).restored
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert not checker_for(load_site("demo"), cache_dir=blocked).restored  # still runs
    (tmp_path / "feeder.json").write_text('{"not": "a network"')
    (tmp_path / "site.yaml").write_text(
        "name: s\ngrid:\n  network: feeder.json\nprosumers:\n  - name: h1\n    devices: "
        "[{name: m1, kind: meter, port: 1502, unit: 1}]\n")
    with pytest.raises(GridError, match="not a pandapower"):
        checker_for(load_site(tmp_path / "site.yaml"), cache_dir=tmp_path / "c2")
    assert not (tmp_path / "c2").exists() or not any((tmp_path / "c2").iterdir())
