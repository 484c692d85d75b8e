"""The CPU memory probe measures a real allocation's peak (Linux /proc)."""

import pytest

from serving._private.memory import ProcessRssProbe


def test_rss_probe_sees_a_transient_allocation():
    probe = ProcessRssProbe()
    if not probe.exact:
        pytest.skip("this kernel does not allow resetting the peak RSS")
    probe.reset_peak()
    baseline = probe.peak_bytes()
    block = bytearray(200 * 1024 * 1024)  # touched: bytearray zero-fills
    del block
    peak = probe.peak_bytes()
    assert peak - baseline >= 150 * 1024 * 1024
    probe.reset_peak()
    assert probe.peak_bytes() < peak
