import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from harness import PGBIN, Cluster, Netns, enter_private_world, free_port, run, wait_for  # noqa: E402

INTERVAL = 2
# Which build is installed: "native" (the default) or "portable" (cargo feature portable:
# libpcap only, no ring, no capability handling, as on a system other than Linux).
BUILD = os.environ.get("PG_NETSTAT_BUILD", "native")
assert BUILD in ("native", "portable"), f"PG_NETSTAT_BUILD={BUILD!r}: native or portable"
# Which backend the session's cluster uses; scripts/test runs the suite once per backend.
CAPTURE_METHOD = os.environ.get("PG_NETSTAT_CAPTURE_METHOD", "auto")
EXPECTED_METHOD = ("pcap" if BUILD == "portable" else "ring") if CAPTURE_METHOD == "auto" else CAPTURE_METHOD
# For tests of what only the Linux-native build has.
native_only = pytest.mark.skipif(BUILD == "portable", reason="the portable build has no Linux capability handling")

# Lines that mean something went badly wrong in the server; any of them fails the run.
# (A worker exit with code 1 is not among them: the restart tests cause those on purpose
# and check them themselves.)
CRASH_MARKERS = ("PANIC", "terminated by signal", "server process (PID", "was terminated by signal",
                 "all server processes terminated", "terminating any other active server processes")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "alone: runs after the others, one test at a time: it measures CPU time, floods, loads the "
        "CPUs, or changes files other servers load (docs/testing.md lists them and why)")
    # Each test process in a world of its own (harness.enter_private_world): with
    # pytest-xdist, each worker; the tests of one file run in one worker (--dist loadfile).
    if os.environ.get("PG_NETSTAT_E2E_HOST_NAMESPACE") != "1":
        enter_private_world()


def capture_conf(device):
    """The settings of a test server that captures `device`: 2-second intervals, a short
    retire timeout so intervals close quickly, the capture method of this run."""
    return [f"pg_netstat.interval = {INTERVAL}", "pg_netstat.packet_wait_time = 1", "pg_netstat.pcap_timeout = 100",
            f"pg_netstat.devices = '{device}'", f"pg_netstat.capture_method = {CAPTURE_METHOD}"]


@pytest.fixture(scope="module")
def netns():
    ns = Netns(str(os.getpid() % 100000))
    yield ns
    ns.teardown()


@pytest.fixture(scope="module")
def cluster(netns):
    """A capturing cluster for each test file: loopback plus the host end of the veth
    pair, 2-second intervals, a short retire timeout so intervals close quickly. Tests of
    one file share it and leave it as they found it; no other file sees it."""
    c = Cluster(
        free_port(),
        conf=capture_conf(netns.host_if) + ["pg_netstat.capture_loopback = on"],
        listen=f"127.0.0.1,::1,{netns.host_ip},{netns.host_ip6}",
        hba_extra=f"host all all {netns.host_ip.rsplit('.', 1)[0]}.0/30 trust\nhost all all {netns.host_ip6}/64 trust",
    )
    c.start()
    try:
        c.sql("CREATE EXTENSION pg_netstat")
        # pgbench tables for the traffic tests, made over the Unix socket (not captured).
        run([str(PGBIN / "pgbench"), "-i", "-q", "-s", "1", "-h", str(c.dir), "-p", str(c.port), "-U", "postgres", "postgres"])
        wait_for("both devices capturing", lambda: c.rows(
            "SELECT device FROM pg_netstat_devices WHERE state = 'capturing'") == sorted([[netns.host_if], ["lo"]]))
        yield c
        log = c.log()
        bad = [line for line in log.splitlines() if any(m in line for m in CRASH_MARKERS)]
        assert not bad, "server log shows a crash:\n" + "\n".join(bad)
    finally:
        c.stop()
        if os.environ.get("PG_NETSTAT_KEEP_CLUSTER") != "1":
            c.remove()
