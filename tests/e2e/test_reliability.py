"""Nothing a user or the network does takes capture down: reloads during traffic keep
exact counts, the worker comes back after SIGTERM or an error, a server without
CAP_NET_RAW runs and says why it cannot capture, bad settings are refused with the
reason (test_settings.py walks every setting), and only the capture worker can use CAP_NET_RAW."""

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest

from conftest import BUILD, CAPTURE_METHOD, INTERVAL, native_only
from harness import (CAP_NET_BIND_SERVICE, CAP_NET_RAW, PGBIN, Cluster, SqlError, Tcpdump, cap_bits,
                     cpu_ticks, free_port, interval_sums, pcap_packets, start_in_a_fresh_interval, wait_for)


class Traffic:
    """Rate-limited pgbench over 127.0.0.1 and from the test namespace, in the background."""

    def __init__(self, cluster, netns, seconds):
        cmd = [str(PGBIN / "pgbench"), "-n", "-S", "-c", "2", "-j", "1", "-R", "300", "-T", str(seconds),
               "-p", str(cluster.port), "-U", "postgres", "postgres"]
        self.procs = [
            subprocess.Popen(cmd + ["-h", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
            subprocess.Popen(["ip", "netns", "exec", netns.name, *cmd, "-h", netns.host_ip],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
        ]

    def wait(self):
        for p in self.procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()


def per_interval_comparison(cluster, device, dump, want):
    """For a failure message: each interval's packets_in next to tcpdump's count for it."""
    rows = cluster.rows(f"""
        SELECT extract(epoch FROM ts)::bigint, interval_seconds, packets_in, packets_out
          FROM pg_netstat_intervals WHERE device = '{device}'
           AND ts >= to_timestamp({want['first_sec'] - 10}) ORDER BY ts""")
    packets = list(pcap_packets(dump.path, dump.port))
    lines = [f"{device}: start secs view_in pcap_in view_out pcap_out"]
    for start, secs, p_in, p_out in rows:
        lo, hi = int(start), int(start) + int(secs)
        c_in = sum(1 for t, d, _ in packets if lo <= t < hi and d == "in")
        c_out = sum(1 for t, d, _ in packets if lo <= t < hi and d == "out")
        mark = "" if (int(p_in), int(p_out)) == (c_in, c_out) else "  <--"
        lines.append(f"  {lo} {secs} {p_in} {c_in} {p_out} {c_out}{mark}")
    return "\n".join(lines)


@contextmanager
def traffic_compared_with_tcpdump(cluster, netns, tmp_path, seconds, min_packets_in):
    """Rate-limited pgbench over loopback and the veth for `seconds`, recorded by tcpdump
    on both, while the body runs (and changes settings meanwhile). Afterwards the
    intervals over each dump's span must sum to its tally exactly, with no kernel drops,
    from more than `min_packets_in` packets in. Yields a dict that then holds the
    interval lengths published on each device."""
    start_in_a_fresh_interval(cluster, INTERVAL, netns.name)
    lengths = {}
    with Tcpdump("lo", cluster.port, tmp_path) as lo_dump, \
            Tcpdump(netns.host_if, cluster.port, tmp_path) as veth_dump:
        traffic = Traffic(cluster, netns, seconds=seconds)
        yield lengths
        traffic.wait()
        lo_dump.wait_closed()
        veth_dump.wait_closed()
    for dump, device in ((lo_dump, "lo"), (veth_dump, netns.host_if)):
        want = dump.tally()
        got, drops, lengths[device] = interval_sums(cluster, device, want["first_sec"], want["last_sec"])
        expected = {k: want[k] for k in got}
        print(f"{device}: intervals {lengths[device]}; view {got}; tcpdump {expected}")
        assert want["packets_in"] > min_packets_in, want
        assert drops == 0
        if got != expected:
            print(per_interval_comparison(cluster, device, dump, want))
        assert got == expected, f"{device}: view {got} != tcpdump {expected}"


def alter(cluster, setting, value):
    cluster.change_settings(f"ALTER SYSTEM SET {setting} = {value}")


def reset_all(cluster):
    cluster.change_settings("ALTER SYSTEM RESET ALL")


def test_reloading_every_setting_during_traffic_keeps_exact_counts(cluster, netns, tmp_path):
    worker = cluster.worker_pid()
    mark = len(cluster.log())
    try:
        with traffic_compared_with_tcpdump(cluster, netns, tmp_path, 14, 1000) as lengths:
            for setting, value in (("pg_netstat.interval", "3"),
                                   ("pg_netstat.pcap_buffer_size", "'4MB'"),
                                   ("pg_netstat.packet_wait_time", "2"),
                                   ("pg_netstat.pcap_snaplen", "200"),
                                   ("pg_netstat.pcap_timeout", "50"),
                                   ("pg_netstat.interval", "5"),
                                   ("pg_netstat.capture_loopback", "on"),  # unchanged value
                                   ("pg_netstat.interval", "2")):
                time.sleep(1.4)  # input: the reloads are spaced out over the traffic
                alter(cluster, setting, value)
        for device, seen in lengths.items():
            assert "3" in seen.split(","), f"{device}: no 3-second intervals published: {seen}"
    finally:
        reset_all(cluster)
    assert cluster.worker_pid() == worker, "a reload must not restart the worker"
    # Speeds follow each row's own length, old rows included.
    rows = cluster.rows("""
        SELECT n.packets_out, n.packets_out_speed, n.bytes_in, n.bytes_in_speed, i.interval_seconds
          FROM pg_netstat n JOIN pg_netstat_intervals i USING (device, ts)""")
    assert len({int(r[4]) for r in rows}) > 1
    for p_out, p_out_speed, b_in, b_in_speed, secs in rows:
        assert int(p_out_speed) == int(p_out) // int(secs)
        assert int(b_in_speed) == int(b_in) // int(secs)
    log = cluster.log()[mark:]
    assert "cannot apply the new capture settings" not in log
    assert log.count("pg_netstat: settings reloaded") >= 7


def test_turning_loopback_off_leaves_the_other_device_untouched(cluster, netns, tmp_path):
    start_in_a_fresh_interval(cluster, INTERVAL, netns.name)
    opened = cluster.log().count(f'capturing on device "{netns.host_if}"')
    try:
        with Tcpdump(netns.host_if, cluster.port, tmp_path) as veth_dump:
            traffic = Traffic(cluster, netns, seconds=6)
            time.sleep(2)  # input: traffic on both devices before the change
            alter(cluster, "pg_netstat.capture_loopback", "off")
            wait_for("lo to leave the device list", lambda: cluster.rows(
                "SELECT device FROM pg_netstat_devices") == [[netns.host_if]])
            traffic.wait()
            veth_dump.wait_closed()
        want = veth_dump.tally()
        got, _, _ = interval_sums(cluster, netns.host_if, want["first_sec"], want["last_sec"])
        assert got == {k: want[k] for k in got}
        assert cluster.log().count(f'capturing on device "{netns.host_if}"') == opened, "veth ring was reopened"
    finally:
        reset_all(cluster)
    wait_for("lo back", lambda: cluster.rows("SELECT device FROM pg_netstat_devices WHERE state = 'capturing'")
             == sorted([["lo"], [netns.host_if]]))


def test_worker_comes_back_after_sigterm_and_after_an_error(cluster):
    rows_before = int(cluster.sql("SELECT count(*) FROM pg_netstat"))
    mark = len(cluster.log())
    first = cluster.worker_pid()
    assert first, "no capture worker process"
    os.kill(first, signal.SIGTERM)
    second = wait_for("a new worker after SIGTERM", lambda: (p := cluster.worker_pid()) and p != first and p)
    assert 'terminating background worker "pg_netstat" due to administrator command' in cluster.log()[mark:]

    # The new process announces itself once it has taken its devices over (until then
    # the function asks nobody and returns NULL).
    wait_for("the new worker announced", lambda: cluster.sql("SELECT pg_netstat_inject_worker_error()") == str(second))
    third = wait_for("a new worker after the injected error",
                     lambda: (p := cluster.worker_pid()) and p != second and p)
    assert "pg_netstat: error injected by pg_netstat_inject_worker_error()" in cluster.log()[mark:]
    assert third not in (first, second)

    # The server never restarted, history survived, and capture resumed.
    assert cluster.sql("SELECT 1") == "1"
    wait_for("devices capturing again", lambda: cluster.sql(
        "SELECT bool_and(state = 'capturing') FROM pg_netstat_devices") == "t")
    assert int(cluster.sql("SELECT count(*) FROM pg_netstat")) >= rows_before
    before = int(cluster.sql("SELECT coalesce(sum(packets_in), 0) FROM pg_netstat WHERE device = 'lo'"))
    cluster.sql("SELECT 1", host="127.0.0.1")
    wait_for("traffic counted by the restarted worker", lambda: int(cluster.sql(
        "SELECT coalesce(sum(packets_in), 0) FROM pg_netstat WHERE device = 'lo'")) > before, timeout=20)


def test_only_superusers_can_inject_errors(cluster):
    cluster.sql("CREATE ROLE pgn_mon2 LOGIN IN ROLE pg_monitor")
    try:
        with pytest.raises(SqlError) as e:
            cluster.sql("SELECT pg_netstat_inject_worker_error()", user="pgn_mon2")
        assert "permission denied" in e.value.stderr
    finally:
        cluster.sql("DROP ROLE pgn_mon2")


@native_only
def test_only_the_capture_worker_holds_cap_net_raw(cluster):
    client = cap_bits(cluster.sql("SELECT pg_read_file('/proc/self/status')"))
    assert all(v & CAP_NET_RAW == 0 for v in client.values()), f"client backend: {client}"

    worker = cap_bits(open(f"/proc/{cluster.worker_pid()}/status").read())
    assert worker["CapEff"] & CAP_NET_RAW and worker["CapPrm"] & CAP_NET_RAW, f"worker: {worker}"
    assert worker["CapAmb"] == 0 and worker["CapInh"] == 0

    postmaster = cap_bits(open(f"/proc/{cluster.postmaster_pid()}/status").read())
    assert postmaster["CapPrm"] == CAP_NET_RAW, f"postmaster: {postmaster}"
    assert postmaster["CapEff"] == postmaster["CapAmb"] == postmaster["CapInh"] == 0

    # A program the server runs for a client cannot open a packet socket.
    out = cluster.dir / "copy_program.txt"
    probe = ("import socket\n"
             "try:\n"
             "    socket.socket(socket.AF_PACKET, socket.SOCK_RAW); print('OPENED')\n"
             "except PermissionError as e:\n"
             "    print('DENIED', e)\n")
    script = cluster.dir / "probe.py"
    script.write_text(probe)
    cluster.sql(f"COPY (SELECT 1) TO PROGRAM '/usr/bin/python3 {script} > {out} 2>&1; grep ^Cap /proc/self/status >> {out}'")
    text = out.read_text()
    assert text.startswith("DENIED"), text
    assert all(v == 0 for v in cap_bits(text).values()), text


def postmaster_children(cluster):
    """{pid: /proc status text} of the postmaster's children."""
    parent, out = cluster.postmaster_pid(), {}
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            status = open(f"/proc/{proc}/status").read()
        except OSError:
            continue
        if f"\nPPid:\t{parent}\n" in status:
            out[int(proc)] = status
    return out


@native_only
def test_cap_net_raw_is_dropped_where_code_of_ours_first_runs_and_the_window_that_remains(cluster):
    """Where PostgreSQL runs code of ours in a process, it drops CAP_NET_RAW there first:
    the checkpointer at its first report, a parallel worker at its first statement
    (issue 29). What remains (docs/security.md): a client backend before authentication
    holds it permitted, never effective."""
    # The checkpointer reports each checkpoint (log_checkpoints is on from PostgreSQL 15).
    cluster.sql("CHECKPOINT")
    pid = int(cluster.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"))
    checkpointer = cap_bits(open(f"/proc/{pid}/status").read())
    assert checkpointer["CapPrm"] & CAP_NET_RAW == 0 and checkpointer["CapEff"] == 0, f"checkpointer: {checkpointer}"

    # A parallel worker, while it runs a statement.
    force = "debug_parallel_query" if int(cluster.sql("SHOW server_version_num")) >= 160000 else "force_parallel_mode"
    sleeper = subprocess.Popen([str(PGBIN / "psql"), "-X", "-h", str(cluster.dir), "-p", str(cluster.port),
                                "-U", "postgres", "-d", "postgres", "-c",
                                f"SET {force} = on; SET parallel_setup_cost = 0; SELECT pg_sleep(4)"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid = int(wait_for("a parallel worker", lambda: cluster.sql(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'parallel worker'")))
        worker = cap_bits(open(f"/proc/{pid}/status").read())
        assert worker["CapPrm"] & CAP_NET_RAW == 0 and worker["CapEff"] == 0, f"parallel worker: {worker}"
    finally:
        sleeper.wait(timeout=30)

    # A client that connects and sends nothing: its backend holds CAP_NET_RAW permitted
    # (not effective) until it authenticates.
    before = set(postmaster_children(cluster))
    with socket.create_connection(("127.0.0.1", cluster.port)) as s:
        pid = wait_for("the new backend", lambda: next(iter(set(postmaster_children(cluster)) - before), None))
        waiting = cap_bits(postmaster_children(cluster)[pid])
        assert waiting["CapEff"] == 0 and waiting["CapPrm"] == CAP_NET_RAW, f"backend before authentication: {waiting}"
        s.sendall(b"")


@pytest.mark.skipif(BUILD != "portable", reason="the native build restricts CAP_NET_RAW (tested above)")
def test_the_portable_build_says_it_does_not_restrict_privileges(cluster):
    """What a build without capability handling does, said plainly: the log says so at
    start, and a client backend keeps the CAP_NET_RAW the server was started with."""
    assert "pg_netstat: this build (libpcap only, no Linux capability handling) does not restrict " \
           "capture privileges" in cluster.log()
    client = cap_bits(cluster.sql("SELECT pg_read_file('/proc/self/status')"))
    assert client["CapEff"] & CAP_NET_RAW, f"client backend: {client}"


def free_privileged_port():
    """A TCP port below 1024 that nothing listens on at 127.0.0.1 (this test runs as root,
    so the bind succeeds whenever the port is free)."""
    import socket
    for port in range(650, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise AssertionError("no free port below 1024")


def cap_bounding(status_text):
    return int(next(line for line in status_text.splitlines() if line.startswith("CapBnd:")).split()[1], 16)


@native_only
def test_least_privilege_keeps_the_capabilities_the_administrator_granted():
    """A server started with CAP_NET_BIND_SERVICE besides CAP_NET_RAW listens on a port
    below 1024: pg_netstat takes CAP_NET_RAW from everyone but the capture worker and
    leaves CAP_NET_BIND_SERVICE exactly as granted (effective, permitted, inheritable,
    ambient), and the bounding set as it was."""
    port = free_privileged_port()
    assert int(open("/proc/sys/net/ipv4/ip_unprivileged_port_start").read()) > port, \
        "ports this low need no privilege here: the test would prove nothing"
    c = Cluster(port, conf=["pg_netstat.capture_loopback = on", "pg_netstat.interval = 1",
                            "pg_netstat.packet_wait_time = 1", "pg_netstat.pcap_timeout = 100",
                            f"pg_netstat.capture_method = {CAPTURE_METHOD}"],
                listen="127.0.0.1")
    try:
        c.start(extra_caps=["net_bind_service"])
        granted = CAP_NET_RAW | CAP_NET_BIND_SERVICE
        status = c.sql("SELECT pg_read_file('/proc/self/status')", host="127.0.0.1")
        client = cap_bits(status)
        assert all(v & CAP_NET_RAW == 0 for v in client.values()), f"client backend: {client}"
        assert all(v & CAP_NET_BIND_SERVICE for v in client.values()), f"client backend: {client}"
        bounding = cap_bounding(open("/proc/self/status").read())
        assert cap_bounding(status) == bounding

        worker_pid = wait_for("the capture worker", c.worker_pid)
        worker = cap_bits(open(f"/proc/{worker_pid}/status").read())
        assert worker["CapEff"] & granted == granted and worker["CapPrm"] & granted == granted, f"worker: {worker}"
        assert worker["CapInh"] & granted == worker["CapAmb"] & granted == CAP_NET_BIND_SERVICE, f"worker: {worker}"

        pm_status = open(f"/proc/{c.postmaster_pid()}/status").read()
        postmaster = cap_bits(pm_status)
        assert postmaster["CapPrm"] == granted, f"postmaster: {postmaster}"
        assert postmaster["CapEff"] == postmaster["CapInh"] == postmaster["CapAmb"] == CAP_NET_BIND_SERVICE, \
            f"postmaster: {postmaster}"
        assert cap_bounding(pm_status) == bounding

        # And the worker uses what it kept: loopback traffic on the low port is counted.
        c.sql("CREATE EXTENSION pg_netstat")
        wait_for("loopback capturing", lambda: c.sql(
            "SELECT state FROM pg_netstat_devices WHERE device = 'lo'") == "capturing")
        c.sql("SELECT 1", host="127.0.0.1")
        wait_for("the connection counted", lambda: c.sql(
            "SELECT coalesce(sum(packets_in), 0) > 0 FROM pg_netstat_intervals WHERE device = 'lo'") == "t")
    finally:
        c.stop()
        c.remove()


@pytest.mark.alone  # measures the worker's CPU time
def test_without_cap_net_raw_the_server_runs_and_says_why():
    c = Cluster(free_port(), conf=["pg_netstat.capture_loopback = on", "pg_netstat.interval = 1",
                                   f"pg_netstat.capture_method = {CAPTURE_METHOD}"])
    c.start(cap_net_raw=False)
    try:
        c.sql("CREATE EXTENSION pg_netstat")
        wait_for("no_permission on every device", lambda: c.rows(
            "SELECT DISTINCT state FROM pg_netstat_devices") == [["no_permission"]])
        errors = c.rows("SELECT DISTINCT last_error FROM pg_netstat_devices")
        assert len(errors) == 1 and "CAP_NET_RAW" in errors[0][0], errors
        worker = c.worker_pid()
        ticks = cpu_ticks(worker)
        time.sleep(3)  # the span over which the worker's CPU is measured, not a wait
        assert cpu_ticks(worker) - ticks <= 5, "the worker is busy while it cannot capture"
        lines = [line for line in c.log().splitlines() if "cannot capture network traffic" in line]
        assert len(lines) == 1, lines
        assert "CAP_NET_RAW" in lines[0]
        log_lines = c.log().splitlines()
        hint = log_lines[log_lines.index(lines[0]) + 1]
        assert "HINT:" in hint and "setpriv" in hint and "setcap cap_net_raw=ep" in hint, hint
        # Everything else works: intervals are still published (as zeros) and SQL runs.
        assert c.sql("SELECT 1", host="127.0.0.1") == "1"
        wait_for("intervals published", lambda: c.sql("SELECT count(*) FROM pg_netstat") != "0")
    finally:
        c.stop()
        c.remove()
