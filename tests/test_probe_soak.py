"""Soak per Ollama version: simulated users for 18 probe intervals (time-scaled to a few seconds) against
the exporter's real poll and probe loops. A probe must not load, reload or unpin anything, must let an
idle model unload within one probe interval of when it would have, and must still measure every model.
The scenario is tests/soak.py; benchmarks/soak_probes.py runs it longer and prints the figures."""

from __future__ import annotations

import pytest

from tests import soak
from tests.fakes.ollama import PROFILES

INTERVAL = 0.25
SLACK = 0.1  # scheduling noise on a loaded CI machine, in seconds


@pytest.mark.parametrize("profile", list(PROFILES))
def test_probes_change_nothing_over_a_soak(profile):
    f = soak.run(profile, PROFILES[profile], interval=INTERVAL)
    print("\n" + soak.HEADER + "\n" + f.row())
    assert f.probe_cold_loads == 0 and f.probe_reloads == 0 and f.probe_pins_lost == 0
    assert f.resident == set(soak.MODELS) and f.user_loads == 7  # what the users did, and nothing more
    assert len(f.unload_delays) == 2, "the finite-keep_alive model went idle twice"
    if profile == "<=0.1.48":  # probes are off: the users' own requests reset their pins (and that is seen)
        assert f.probes == 0 and not any(f.measured.values()) and f.skipped["unsupported_version"] > 0
        assert 0 < f.downgrades <= f.pins_lost  # a loss re-pinned within one poll can go unseen
        assert all(abs(d) < SLACK for d in f.unload_delays)
        return
    assert f.pins_lost == 0 and f.downgrades == 0 and f.pin_restores == 0
    assert all(d <= INTERVAL + SLACK for d in f.unload_delays), f.unload_delays
    assert all(f.measured.get(model, 0) > 0 for model in soak.MODELS), f.measured
    if profile == "0.2-0.9":  # no context_length: after the admin's num_ctx reload it cannot be probed safely
        assert f.skipped["reload_risk"] > 0
    else:
        assert f.skipped["reload_risk"] == 0
