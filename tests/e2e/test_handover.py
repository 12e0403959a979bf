"""Ring rebuilds under load: every rebuild hands capture from the old ring to the new one
without losing or doubling a packet, even though the two rings stamp each packet a few
microseconds apart (see crates/core/src/handover.rs)."""

import subprocess
import time

import pytest
from conftest import INTERVAL
from harness import PGBIN, Tcpdump, interval_sums, start_in_a_fresh_interval

REBUILDS = 12

# Runs alone (docs/testing.md): pgbench at full rate through 12 ring rebuilds, which must
# drop nothing; beside other tests the collector lost 1,747 packets to a full ring.
pytestmark = pytest.mark.alone


def test_rebuilds_under_load_lose_and_double_nothing(cluster, tmp_path):
    # A ring of 16 MB: libpcap (the pcap backend) takes longer than the ring to open a
    # capture, and the load must not overflow the old one meanwhile. The load has a set
    # rate, the same on every machine: flat out, how fast the collector drains depends
    # on what else the two CPUs run, and a fresh-clone run on a faster day (250,000
    # packets in, 4 MB) overflowed the portable build's old ring by 8,162 frames. What
    # is tested here is the handover; the collector's throughput is the capture
    # benchmark's (docs/performance.md).
    try:
        cluster.change_settings("ALTER SYSTEM SET pg_netstat.pcap_buffer_size = '16MB'")
        mark = len(cluster.log())
        start_in_a_fresh_interval(cluster, INTERVAL)
        with Tcpdump("lo", cluster.port, tmp_path) as dump:
            load = subprocess.Popen(
                [str(PGBIN / "pgbench"), "-n", "-S", "-c", "4", "-j", "2", "-T", "9", "-R", "12000",
                 "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "postgres"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # input: the load runs at full rate before the first rebuild
            for i in range(REBUILDS):
                # A new pcap_timeout rebuilds every ring, make-before-break.
                cluster.change_settings(f"ALTER SYSTEM SET pg_netstat.pcap_timeout = {110 + 10 * (i % 2)}")
                time.sleep(0.6)  # input: rebuilds spaced out over the load
            _, err = load.communicate(timeout=60)
            assert load.returncode == 0, err.decode()
            dump.wait_closed()
        want = dump.tally()
        got, drops, _ = interval_sums(cluster, "lo", want["first_sec"], want["last_sec"])
        expected = {k: want[k] for k in got}
        print(f"lo: view {got}; tcpdump {expected}; kernel drops {drops}")
        assert want["packets_in"] > 50_000, want
        assert drops == 0
        assert got == expected
        assert cluster.log()[mark:].count("new settings, ") >= REBUILDS
    finally:
        cluster.change_settings("ALTER SYSTEM RESET pg_netstat.pcap_timeout",
                                "ALTER SYSTEM RESET pg_netstat.pcap_buffer_size")
