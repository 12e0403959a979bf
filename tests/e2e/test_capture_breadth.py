"""Whatever the traffic looks like, the counts are what tcpdump counts: extra ports,
IPv4 options and fragments, IPv6, 802.1Q tags in-band and in metadata, snaplen-cut
frames, packets over 64 KiB; and when the kernel cannot keep up, the drops are in SQL."""

import os
import signal
import socket
import threading
import time

import pytest

from conftest import EXPECTED_METHOD, INTERVAL
from harness import Tcpdump, free_port, interval_sums, packet_sockets, start_in_a_fresh_interval, wait_for


def reset(cluster):
    cluster.change_settings("ALTER SYSTEM RESET ALL")


def echo_server(port):
    srv = socket.create_server(("127.0.0.1", port))

    def serve():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
        srv.close()

    threading.Thread(target=serve, daemon=True).start()


def test_extra_ports_are_counted_with_the_server_port(cluster, tmp_path):
    extra = free_port()
    echo_server(extra)
    try:
        cluster.change_settings(f"ALTER SYSTEM SET pg_netstat.ports = '{extra}'")
        start_in_a_fresh_interval(cluster, INTERVAL)
        with Tcpdump("lo", [cluster.port, extra], tmp_path) as dump:
            cluster.sql("SELECT 1", host="127.0.0.1")
            with socket.create_connection(("127.0.0.1", extra)) as c:
                for i in range(30):
                    msg = b"m" * (100 + i * 50)
                    c.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        got += c.recv(65536)
            dump.wait_closed()
        want = dump.tally()
        got, _, _ = interval_sums(cluster, "lo", want["first_sec"], want["last_sec"])
        assert got == {k: want[k] for k in got}
        assert want["packets_out"] >= 30 + 5, "the echo replies (out of the extra port) are missing"
    finally:
        reset(cluster)


def frame_specs(port):
    """(spec, counted?) pairs covering the cases the filter must get right."""
    return [
        ({"sport": 40001, "dport": port, "payload": 10, "count": 3}, True),                 # plain IPv4
        ({"sport": 40002, "dport": port, "options": 40, "payload": 10, "count": 3}, True),  # IPv4 options
        ({"sport": 40003, "dport": port, "more_fragments": True, "payload": 64, "count": 2}, True),  # 1st fragment
        ({"sport": 40004, "dport": port, "frag_offset": 10, "payload": 64, "count": 2}, False),      # later fragment
        ({"ip": 6, "sport": 40005, "dport": port, "payload": 10, "count": 3}, True),        # IPv6
        ({"vlan": 5, "sport": 40006, "dport": port, "payload": 10, "count": 3}, True),      # 802.1Q, IPv4
        ({"vlan": 7, "ip": 6, "sport": 40007, "dport": port, "payload": 10, "count": 2}, True),  # 802.1Q, IPv6
        ({"sport": 40008, "dport": port, "payload": 1400, "count": 3}, True),               # cut by snaplen
        ({"sport": 40009, "dport": port + 1, "payload": 10, "count": 3}, False),            # another port
        ({"udp": True, "sport": 40010, "dport": port, "payload": 10, "count": 3}, False),   # UDP
    ]


def expected_in(specs_counted, lengths):
    """packets and bytes the counted frames make, from the injector's own lengths."""
    packets = bytes_ = 0
    i = 0
    for spec, counted in specs_counted:
        for _ in range(spec["count"]):
            if counted:
                packets += 1
                bytes_ += lengths[i]
            i += 1
    return packets, bytes_


def test_crafted_frames_count_like_tcpdump_and_like_the_sender(cluster, netns, tmp_path):
    start_in_a_fresh_interval(cluster, INTERVAL, netns.name)
    cases = frame_specs(cluster.port)
    # From the namespace: received by the host end (802.1Q tags arrive in metadata).
    # From the host end: sent by this host (802.1Q tags stay in-band).
    outgoing = [({**spec, "sport": spec["dport"], "dport": spec["sport"]}, counted)
                for spec, counted in cases if "vlan" in spec]
    with Tcpdump(netns.host_if, cluster.port, tmp_path) as dump:
        lengths_in = netns.inject([s for s, _ in cases], tmp_path)
        lengths_out = netns.inject([s for s, _ in outgoing], tmp_path, from_host=True)
        packets_in, bytes_in = expected_in(cases, lengths_in)
        packets_out, bytes_out = expected_in(outgoing, lengths_out)
        dump.wait_packets(packets_in, packets_out)
    want = dump.tally()
    sender = dict(packets_in=packets_in, packets_out=packets_out, bytes_in=bytes_in, bytes_out=bytes_out)
    got, drops, _ = interval_sums(cluster, netns.host_if, want["first_sec"], want["last_sec"])
    print(f"view {got}; tcpdump {want}; sender {sender}")
    assert drops == 0
    assert got == sender, f"view {got} != what was sent {sender}"
    assert got == {k: want[k] for k in got}, f"view {got} != tcpdump {want}"


def test_packets_over_64_kib_count_their_full_length(cluster, netns, tmp_path):
    """GRO/GSO packets longer than any IP length field (as BIG TCP makes them): sent as
    single GSO frames through a packet socket with a virtio-net header, they cross the
    veth pair whole (both ends allow 185,000-byte packets)."""
    start_in_a_fresh_interval(cluster, INTERVAL, netns.name)
    specs = [{"ip": 6, "sport": 40200, "dport": cluster.port, "payload": 100_000, "gso": True, "count": 3},
             {"ip": 6, "sport": 40201, "dport": cluster.port, "payload": 150_000, "gso": True, "count": 2}]
    with Tcpdump(netns.host_if, cluster.port, tmp_path) as dump:
        lengths = netns.inject(specs, tmp_path)
        dump.wait_packets(len(lengths))
    assert dump.max_length() > 65535 and min(lengths) > 65535, (dump.max_length(), lengths)
    want = dump.tally()
    got, _, _ = interval_sums(cluster, netns.host_if, want["first_sec"], want["last_sec"])
    sender = dict(packets_in=len(lengths), packets_out=0, bytes_in=sum(lengths), bytes_out=0)
    print(f"sent {lengths}; view {got}")
    assert got == sender, f"view {got} != sent {sender}"
    assert got == {k: want[k] for k in got}


def veth_dropped(netns):
    host = int(open(f"/sys/class/net/{netns.host_if}/statistics/rx_dropped").read())
    peer = int(netns.exec(["cat", f"/sys/class/net/{netns.peer_if}/statistics/tx_dropped"]).stdout)
    return host + peer


@pytest.mark.alone  # floods a frozen worker's ring; the pacing that keeps the veth from dropping needs a CPU
def test_kernel_drops_are_reported_and_nothing_goes_unaccounted(cluster, netns, tmp_path):
    """The worker frozen right after a settings change shrank the ring, while the old ring
    is still open (make-before-break): both rings overflow on the same burst, and every
    packet is counted once, as captured or as dropped by the new ring."""
    try:
        # The ring to be replaced: 1 MiB, too small for the burst too, so that it drops
        # packets the new ring also sees; its retire window is its block timeout + 250 ms:
        # 1.15 s to freeze in.
        cluster.change_settings("ALTER SYSTEM SET pg_netstat.pcap_timeout = 900",
                                "ALTER SYSTEM SET pg_netstat.pcap_buffer_size = 1048576")
        wait_for("the ring before that closed", lambda: packet_sockets(netns.host_if) == 1)
        worker = cluster.worker_pid()
        drops_before, freezes_before = map(int, cluster.rows(
            f"SELECT kernel_drops, ring_freezes FROM pg_netstat_devices WHERE device = '{netns.host_if}'")[0])
        start_in_a_fresh_interval(cluster, INTERVAL, netns.name)
        start = int(time.time())
        veth_drops = veth_dropped(netns)
        # Applied once logged: the small ring is bound, the old one still open.
        cluster.change_settings("ALTER SYSTEM SET pg_netstat.pcap_buffer_size = 131070")
        # Freeze the worker so the rings fill, then send more than the small one holds,
        # paced so that the veth pair itself drops nothing.
        os.kill(worker, signal.SIGSTOP)
        try:
            rings = packet_sockets(netns.host_if)
            assert rings == 2, f"frozen with {rings} ring(s) open, not in the retire window: the test proves nothing"
            sent = netns.inject([{"sport": 40100, "dport": cluster.port, "payload": 200, "count": 10000, "pace": 50}],
                                tmp_path)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert veth_dropped(netns) == veth_drops, "the veth pair dropped frames: the burst proves nothing"
        resumed = int(time.time())
        # The drops are read when the next interval after the resume closes.
        _, _, _ = interval_sums(cluster, netns.host_if, start, resumed + INTERVAL)
        row = cluster.rows(f"""
            SELECT sum(packets_in), sum(kernel_drops), sum(packets_out) FROM pg_netstat_intervals
             WHERE device = '{netns.host_if}' AND ts >= to_timestamp({start - start % INTERVAL})""")[0]
        captured, dropped, out = int(row[0]), int(row[1]), int(row[2])
        counts = f"sent {len(sent)}: captured {captured}, dropped by the kernel {dropped}"
        print(counts)
        assert out == 0, counts
        assert dropped > 0, "the burst should have overflowed the ring: " + counts
        assert captured + dropped == len(sent), counts
        drops_total, freezes = cluster.rows(
            f"SELECT kernel_drops, ring_freezes FROM pg_netstat_devices WHERE device = '{netns.host_if}'")[0]
        # Running totals: only what they gained during this test is this test's.
        assert int(drops_total) - drops_before >= dropped
        if EXPECTED_METHOD == "ring":
            assert int(freezes) - freezes_before >= 1, "a frozen worker must show as a ring freeze"
    finally:
        reset(cluster)
