"""Helpers for the end-to-end tests: throwaway clusters, test hosts in network
namespaces, tcpdump as the independent packet count, and a small pcap reader.

Traffic only ever goes to loopback or to the namespace this harness creates."""

import ctypes
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The server under test: PG_NETSTAT_PG_CONFIG names its pg_config (default: the system's
# PostgreSQL 15); its programs are taken from that installation's bindir.
PG_CONFIG = os.environ.get("PG_NETSTAT_PG_CONFIG", "/usr/lib/postgresql/15/bin/pg_config")


def pg_config(option):
    return subprocess.run([PG_CONFIG, option], check=True, capture_output=True, text=True).stdout.strip()


PGBIN = Path(pg_config("--bindir"))
# Its major version: "PostgreSQL 17.11" → 17.
PG_MAJOR = int(re.match(r"PostgreSQL (\d+)", pg_config("--version")).group(1))
CLUSTER = ROOT / "scripts" / "cluster"


def run(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def wait_for(what, predicate, timeout=30.0, every=0.2):
    """Polls `predicate` until it returns something truthy; fails with `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def enter_private_world():
    """Moves this process (its calling thread, and so every process it starts from now on)
    into a network namespace of its own, with its own `lo`, and a mount namespace in
    which /sys shows that network namespace's devices, as `ip netns exec` does. Servers,
    clients, tcpdump and the test hosts' veth pairs made afterwards live there: no other
    test process sees their packets, addresses or names, and none of theirs reach here.
    The namespaces go when the process ends. Every test process (each pytest-xdist
    worker, or pytest alone) does this once, at start (conftest.py)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    clone_newns, clone_newnet = 0x00020000, 0x40000000
    ms_rec, ms_slave, mnt_detach = 0x4000, 1 << 19, 2
    check(libc.unshare(clone_newnet | clone_newns), "unshare(CLONE_NEWNET | CLONE_NEWNS)")
    # Mounts made here (sysfs, `ip netns add`'s) stay here.
    check(libc.mount(b"none", b"/", None, ms_rec | ms_slave, None), "mount --make-rslave /")
    check(libc.umount2(b"/sys", mnt_detach), "umount /sys")
    check(libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None), "mount -t sysfs sysfs /sys")
    run(["ip", "link", "set", "lo", "up"])


class SqlError(Exception):
    def __init__(self, stderr):
        super().__init__(stderr)
        self.stderr = stderr


class Cluster:
    """A cluster of the PostgreSQL under test in its own directory, run as `postgres` with CAP_NET_RAW."""

    def __init__(self, port, conf=(), listen="127.0.0.1,::1", hba_extra="", preload=True):
        self.dir = Path(tempfile.mkdtemp(prefix="pgn_e2e_"))
        self.port = port
        env = dict(os.environ, LISTEN=listen, HBA_EXTRA=hba_extra)
        run([str(CLUSTER), "init", str(self.dir), str(port), *conf], env=env)
        if not preload:
            conf_file = self.dir / "data" / "postgresql.conf"
            text = conf_file.read_text().replace("shared_preload_libraries = 'pg_netstat'", "")
            conf_file.write_text(text)

    @property
    def log_path(self):
        return self.dir / "server.log"

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, cap_net_raw=True, extra_caps=()):
        """Starts the server with CAP_NET_RAW (unless told not to) and any `extra_caps`
        (setpriv names such as "net_bind_service"), all inheritable and ambient."""
        env = dict(os.environ, NO_CAP_NET_RAW="" if cap_net_raw else "1", EXTRA_CAPS=",".join(extra_caps))
        run([str(CLUSTER), "start", str(self.dir)], env=env)

    def stop(self, mode="fast"):
        """pg_ctl stop -m `mode`: fast (a clean shutdown), or immediate (a crash to
        PostgreSQL: no shutdown checkpoint, crash recovery at the next start)."""
        run([str(CLUSTER), "stop", str(self.dir), mode], check=False)

    def reload(self):
        """pg_ctl reload; returns once the postmaster has re-read its files."""
        mark = len(self.log())
        run([str(CLUSTER), "reload", str(self.dir)])
        self.wait_reloaded(mark)

    def wait_reloaded(self, mark):
        """Waits for the postmaster's reload after log offset `mark`. It logs the line
        before it re-reads the files, and serves no new connection until it has finished:
        every connection made after this returns sees the new files."""
        wait_for("the postmaster to reload", lambda: "received SIGHUP, reloading configuration files" in self.log()[mark:])

    def change_settings(self, *statements):
        """Runs ALTER SYSTEM statements (SET or RESET) and reloads; when that changed a
        reloadable pg_netstat setting, waits until the capture worker has applied it."""
        settings = ("SELECT name, setting FROM pg_settings WHERE name LIKE 'pg_netstat.%' "
                    "AND context = 'sighup' ORDER BY name")
        before = self.rows(settings)
        mark = len(self.log())
        for statement in statements:
            self.sql(statement)
        self.sql("SELECT pg_reload_conf()")
        self.wait_reloaded(mark)
        if self.rows(settings) != before:
            wait_for("the capture worker to apply the settings",
                     lambda: "pg_netstat: settings reloaded" in self.log()[mark:])

    def worker_pid(self):
        """PID of the capture worker: the postmaster's child titled "pg_netstat collector".
        (A worker without a database connection is not in pg_stat_activity.)"""
        parent = self.postmaster_pid()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and "pg_netstat collector" in title:
                return int(proc.name)
        return None

    def postmaster_pid(self):
        return int((self.dir / "data" / "postmaster.pid").read_text().split()[0])

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def make_certificate(self):
        """A self-signed certificate and key (server.crt, server.key) in the data
        directory, for `ssl = on` with `ssl_cert_file = 'server.crt'` and `ssl_key_file =
        'server.key'`; before start."""
        data = self.dir / "data"
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-keyout", str(data / "server.key"), "-out", str(data / "server.crt")])
        for name in ("server.key", "server.crt"):
            shutil.chown(data / name, "postgres", "postgres")
        os.chmod(data / "server.key", 0o600)

    def psql_result(self, sql, user="postgres", host=None, dbname="postgres", netns=None):
        """Runs SQL; over the Unix socket unless `host` is given (then over TCP, which the
        extension counts). Returns the CompletedProcess."""
        cmd = [str(PGBIN / "psql"), "-X", "-qAt", "-v", "ON_ERROR_STOP=1",
               "-h", host or str(self.dir), "-p", str(self.port), "-U", user, "-d", dbname, "-f", "-"]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        # SQL on stdin: a statement can be larger than one command-line argument may be.
        return run(cmd, check=False, input=sql)

    def sql(self, sql, **kw):
        r = self.psql_result(sql, **kw)
        if r.returncode != 0:
            raise SqlError(r.stderr)
        return r.stdout.strip()

    def rows(self, sql, **kw):
        out = self.sql(sql, **kw)
        return [line.split("|") for line in out.splitlines() if line]


class Netns:
    """A test host: a network namespace joined to this host by a veth pair.
    Host end `host_if` gets `host_ip` and `host_ip6`, the namespace end `peer_ip` and
    `peer_ip6`. Both ends allow 185,000-byte GSO/GRO packets (BIG TCP), so TCP over IPv6
    between them produces packets longer than 64 KiB."""

    BIG = "185000"

    def __init__(self, tag, host_ip="169.254.77.1", peer_ip="169.254.77.2", host_ip6="fd77::1", peer_ip6="fd77::2"):
        # The process's PID in the name: `ip netns` keeps names as files in /run/netns,
        # which every test process shares although each mounts its namespaces privately.
        # Device names and addresses are per network namespace, so they may repeat.
        self.name = f"pgn_{tag}_{os.getpid()}"
        self.host_if = f"pgnh{tag}"[:15]
        self.peer_if = f"pgnp{tag}"[:15]
        self.host_ip, self.peer_ip = host_ip, peer_ip
        self.host_ip6, self.peer_ip6 = host_ip6, peer_ip6
        self.teardown()
        run(["ip", "netns", "add", self.name])
        self.exec(["ip", "link", "set", "lo", "up"])
        self.create_link()

    def create_link(self):
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if])
        run(["ip", "link", "set", self.peer_if, "netns", self.name])
        run(["ip", "link", "set", self.host_if, "gso_max_size", self.BIG, "gro_max_size", self.BIG])
        run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        run(["ip", "-6", "addr", "add", f"{self.host_ip6}/64", "dev", self.host_if, "nodad"])
        # Received frames are processed on one CPU (RPS to CPU 0): otherwise frames the
        # peer sent from two CPUs are delivered to each packet socket concurrently, and
        # two captures of this device (pg_netstat's and tcpdump's, the reference) can see
        # a direction's segments in different orders, which changes what is out of order.
        Path(f"/sys/class/net/{self.host_if}/queues/rx-0/rps_cpus").write_text("1\n")
        run(["ip", "link", "set", self.host_if, "up"])
        self.exec(["ip", "link", "set", self.peer_if, "gso_max_size", self.BIG, "gro_max_size", self.BIG])
        self.exec(["ip", "addr", "add", f"{self.peer_ip}/30", "dev", self.peer_if])
        self.exec(["ip", "-6", "addr", "add", f"{self.peer_ip6}/64", "dev", self.peer_if, "nodad"])
        self.exec(["ip", "link", "set", self.peer_if, "up"])

    def delete_link(self):
        run(["ip", "link", "del", self.host_if])

    def set_host_link(self, state):
        run(["ip", "link", "set", self.host_if, state])

    def exec(self, cmd, check=True):
        return run(["ip", "netns", "exec", self.name, *cmd], check=check)

    def inject(self, specs, workdir, from_host=False):
        """Sends crafted frames (see inject.py) into the pair: from the namespace end (the
        host end receives them) or, with from_host, out of the host end. Returns the list
        of frame lengths sent."""
        spec_path = Path(workdir) / "frames.json"
        spec_path.write_text(json.dumps(specs))
        script = str(Path(__file__).parent / "inject.py")
        if from_host:
            out = run(["python3", script, self.host_if, str(spec_path)]).stdout
        else:
            out = self.exec(["python3", script, self.peer_if, str(spec_path)]).stdout
        return json.loads(out)

    def teardown(self):
        run(["ip", "link", "del", self.host_if], check=False)
        run(["ip", "netns", "del", self.name], check=False)


class Tcpdump:
    """tcpdump writing a pcap of `tcp port PORT` on one device: the independent count.
    libpcap, like pg_netstat, keeps one copy of each loopback packet."""

    def __init__(self, device, port, workdir, name=None, snaplen=128):
        """`snaplen` 128 holds the headers; 0 keeps whole packets (for pcap_stream)."""
        self.path = Path(workdir) / f"{name or device}.pcap"
        self.device = device
        self.snaplen = snaplen
        self.ports = [port] if isinstance(port, int) else list(port)
        self.port = self.ports[0]

    def __enter__(self):
        self.err_path = self.path.with_suffix(".err")
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            # --immediate-mode: libpcap hands over each packet at once. Without it, the
            # packets in its last, partly filled ring block are lost when tcpdump is
            # stopped, and the reference count comes out short.
            # A whole-packet capture (snaplen 0: 262,144 bytes) gets a buffer 16 times the
            # headers-only one: libpcap sizes its ring blocks from the snaplen, and in
            # immediate mode a block often holds one packet, so 16 MiB was 64 packets of
            # room, and a pipelined pgbench burst on lo lost 156 of 840 in CI.
            ["tcpdump", "-i", self.device, "-p", "-n", "-s", str(self.snaplen),
             "-B", "262144" if self.snaplen == 0 else "16384", "-U", "--immediate-mode",
             "-Z", "root", "-w", str(self.path),
             # libpcap's "tcp port" alone misses frames with an in-band 802.1Q tag.
             "(tcp and ({0})) or (vlan and tcp and ({0}))".format(" or ".join(f"port {p}" for p in self.ports))],
            stdout=subprocess.DEVNULL, stderr=self.err)
        wait_for(f"tcpdump on {self.device} to listen",
                 lambda: "listening on" in self.err_path.read_text() or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.err_path.read_text()
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        self.err.close()
        stats = self.err_path.read_text()
        # "0 packets dropped by kernel": a count with drops is no reference.
        assert re.search(r"^0 packets dropped by kernel", stats, re.M), stats

    def tally(self):
        return pcap_tally(self.path, self.ports)

    def wait_closed(self, still_open=(), expect=()):
        """Waits until every connection in the capture so far has ended in it (a RST, or a
        FIN each way and the last ACK), but those of the client ports in `still_open`:
        they must have all they sent acknowledged in it. The capture must hold at least
        one connection, and those of the client ports in `expect`: tcpdump writes what the
        kernel handed it when it gets the CPU, and on a busy machine the file can still be
        empty (seen: 242 packets passed its filter, none written yet) when everything
        it will hold has long ended. The tail of a connection that ended as the capture
        began (seen: its client's FIN before, the server's FIN and the last ACK in it) has
        ended once what it shows is acknowledged."""
        def settled():
            conns = pcap_connections(self.path, self.ports)
            return conns and all(p in conns for p in expect) and all(
                c["ended"] or ((p in still_open or c["tail"]) and c["acked"]) for p, c in conns.items())
        wait_for(f"every connection on {self.device} to end in tcpdump's capture", settled)

    def wait_packets(self, packets_in, packets_out=0):
        """Waits until tcpdump has captured this many packets in and out (or more)."""
        def caught_up():
            t = self.tally()
            return t if t["packets_in"] >= packets_in and t["packets_out"] >= packets_out else None
        wait_for(f"tcpdump on {self.device} to capture {packets_in} packets in and {packets_out} out", caught_up)

    def max_length(self):
        return max((length for _, _, length in pcap_packets(self.path, self.ports)), default=0)


def pcap_frames(path):
    """(seconds as float, original length, captured bytes) of each record of an Ethernet
    pcap file (either byte order, micro- or nanosecond stamps)."""
    data = Path(path).read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file")
    frac_scale = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    assert linktype == 1, f"{path}: link type {linktype}, expected Ethernet"
    off = 24
    while off + 16 <= len(data):
        sec, frac, incl, orig = struct.unpack(endian + "IIII", data[off:off + 16])
        yield sec + frac * frac_scale, orig, data[off + 16: off + 16 + incl]
        off += 16 + incl


def pcap_packets(path, ports):
    """(seconds as float, 'in'|'out', original length) of each TCP packet on `ports` (one
    port or a list) in a pcap file; 'in' is toward a port."""
    ports = [ports] if isinstance(ports, int) else ports
    for ts, orig, frame in pcap_frames(path):
        tcp = _tcp_ports(frame)
        if tcp is None:
            continue
        if tcp[0] in ports:
            yield ts, "out", orig
        elif tcp[1] in ports:
            yield ts, "in", orig


def pcap_tally(path, ports):
    """Packets and bytes (original frame lengths) of TCP port `port` in a pcap file, plus
    the whole seconds of the first and last packet."""
    t = dict(packets_in=0, packets_out=0, bytes_in=0, bytes_out=0, first_sec=None, last_sec=None)
    for ts, direction, length in pcap_packets(path, ports):
        t["packets_" + direction] += 1
        t["bytes_" + direction] += length
        t["first_sec"] = int(ts) if t["first_sec"] is None else t["first_sec"]
        t["last_sec"] = int(ts)
    return t


def _tcp_at(f):
    """(offset of the TCP header, end of the IP packet by its own length field) in an
    Ethernet frame, or None when it is not TCP over IPv4/IPv6 with the ports captured."""
    if len(f) < 14:
        return None
    l2 = 14
    ethertype = struct.unpack(">H", f[12:14])[0]
    if ethertype == 0x8100 and len(f) >= 18:  # libpcap re-inserts tags the kernel moved aside
        ethertype, l2 = struct.unpack(">H", f[16:18])[0], 18
    if ethertype == 0x0800 and len(f) >= l2 + 20:
        proto, l4, end = f[l2 + 9], l2 + (f[l2] & 0x0F) * 4, l2 + struct.unpack(">H", f[l2 + 2:l2 + 4])[0]
    elif ethertype == 0x86DD and len(f) >= l2 + 40:
        proto, l4, end = f[l2 + 6], l2 + 40, l2 + 40 + struct.unpack(">H", f[l2 + 4:l2 + 6])[0]
    else:
        return None
    if proto != 6 or len(f) < l4 + 4:
        return None
    return l4, end


def _tcp_ports(f):
    at = _tcp_at(f)
    return None if at is None else struct.unpack(">HH", f[at[0]:at[0] + 4])


def interval_sums(cluster, device, first_sec, last_sec):
    """Sums of every published interval that overlaps [first_sec, last_sec], whatever
    their lengths, once the interval holding `last_sec` is published."""
    wait_for(f"the interval holding {last_sec} on {device}", lambda: cluster.sql(f"""
        SELECT count(*) FROM pg_netstat_intervals WHERE device = '{device}'
           AND ts + make_interval(secs => interval_seconds) > to_timestamp({last_sec})""") != "0",
             timeout=30)
    row = cluster.rows(f"""
        SELECT sum(packets_in), sum(packets_out), sum(bytes_in), sum(bytes_out),
               sum(kernel_drops), string_agg(DISTINCT interval_seconds::text, ',' ORDER BY interval_seconds::text)
          FROM pg_netstat_intervals
         WHERE device = '{device}' AND ts <= to_timestamp({last_sec})
           AND ts + make_interval(secs => interval_seconds) > to_timestamp({first_sec})""")[0]
    sums = dict(packets_in=int(row[0]), packets_out=int(row[1]), bytes_in=int(row[2]), bytes_out=int(row[3]))
    return sums, int(row[4]), row[5]


def cap_bits(status_text):
    """CapInh/CapPrm/CapEff/CapAmb of a /proc/PID/status text, as integers."""
    out = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            out[key] = int(value.strip(), 16)
    return out


CAP_NET_RAW = 1 << 13
CAP_NET_BIND_SERVICE = 1 << 10


def cpu_ticks(pid):
    """User + system CPU time of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def free_port():
    """A TCP port free on 127.0.0.1 and ::1, below the ephemeral range (32768-60999): a
    client's TIME_WAIT on an ephemeral port can block a server's later bind to it, and the
    kernel's own pick (bind to port 0) is an ephemeral port."""
    import random
    import socket
    for _ in range(200):
        port = random.randrange(20000, 32000)
        try:
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                with socket.socket(family) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free TCP port in 20000-31999")


def pcap_connections(path, ports):
    """Per client port, how the TCP connection on `ports` stands in a pcap: `ended` (a RST
    either way, or a FIN each way and then the last ACK, from the side that did not send
    the second FIN), `acked` (all that each side sent, SYN and FIN included, is
    acknowledged by the other) and `tail` (neither its SYN nor any payload is in the
    capture: the end of a connection that began, and may have sent its first FIN, before
    it). A new SYN on the same ports starts afresh."""
    conns = {}
    for _, _, f in pcap_frames(path):
        at = _tcp_at(f)
        if at is None or len(f) < at[0] + 14:
            continue
        l4, ip_end = at
        sport, dport, seq, ack = struct.unpack(">HHII", f[l4:l4 + 12])
        if dport in ports:
            key, inbound = (sport, dport), True
        elif sport in ports:
            key, inbound = (dport, sport), False
        else:
            continue
        doff, flags = (f[l4 + 12] >> 4) * 4, f[l4 + 13]
        if flags & 0x12 == 0x02 or key not in conns:  # a SYN without ACK begins a connection
            conns[key] = dict(fins=set(), ended=False, sent={}, acked={}, begun=False, payload=False)
        c = conns[key]
        c["begun"] |= bool(flags & 0x02)
        if flags & 0x04:
            c["ended"] = True
        elif len(c["fins"]) == 2 and flags & 0x10 and inbound != c["second_fin_inbound"]:
            c["ended"] = True
        if flags & 0x01 and inbound not in c["fins"]:
            c["fins"].add(inbound)
            c["second_fin_inbound"] = inbound
        used = ip_end - l4 - doff + (1 if flags & 0x02 else 0) + (1 if flags & 0x01 else 0)
        if used > 0:
            c["sent"][inbound] = (seq + used) & 0xffffffff
        c["payload"] |= used > (1 if flags & 0x03 else 0)
        if flags & 0x10:
            c["acked"][not inbound] = ack
    # "a is at or after b" in sequence space
    at_or_after = lambda a, b: (a - b) & 0xffffffff < 0x80000000  # noqa: E731
    return {client: dict(ended=c["ended"], acked=all(d in c["acked"] and at_or_after(c["acked"][d], end)
                                                      for d, end in c["sent"].items()),
                         tail=not c["begun"] and not c["payload"])
            for (client, _), c in conns.items()}


def open_connections(port, netns=None):
    """The TCP sockets of connections to or from `port` that can still send a packet: every
    state but LISTEN, TIME-WAIT and CLOSED, in this process's namespace or in `netns`'s
    (a peer's)."""
    cmd = ["ss", "-Htan", "state", "connected", "exclude", "time-wait", f"( sport = :{port} or dport = :{port} )"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return run(cmd).stdout.strip()


def wait_quiet(port, netns=(), timeout=30):
    """Waits until no connection to or from `port` can send another packet, here and in
    each peer namespace of `netns` (every FIN sent and acknowledged, resets included);
    returns the time it saw that: every packet of those connections is stamped before it."""
    peers = [netns] if isinstance(netns, str) else list(netns)
    wait_for(f"every connection of port {port} to end", lambda: not any(
        open_connections(port, ns) for ns in [None, *peers]), timeout=timeout)
    return time.time()


def packet_sockets(device):
    """How many packet sockets in this process's network namespace are bound to
    `device` (/proc/net/packet): after a ring rebuild, two until the old ring is closed."""
    ifindex = open(f"/sys/class/net/{device}/ifindex").read().strip()
    lines = Path("/proc/net/packet").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[4] == ifindex)


def next_interval(interval, lead=0.05):
    """Waits for the clock: returns `lead` seconds into the next interval of `interval`
    seconds (intervals are aligned on multiples of their length since the epoch)."""
    time.sleep(interval - time.time() % interval + lead)
    return time.time()


def start_in_a_fresh_interval(cluster, interval, netns=()):
    """Waits until every earlier connection of the server's port has ended (its FIN and
    ACKs seen, here and in `netns`), then for the next interval: the traffic that follows
    starts in an interval no earlier packet reached, so the intervals that overlap the
    test's capture hold nothing but the test's traffic."""
    wait_quiet(cluster.port, netns)
    next_interval(interval)


def published_through(cluster, t, timeout=30):
    """Waits until every capturing device has published the interval that holds time `t`
    (idle intervals are published too, as zeros): every packet stamped before `t` is then
    in the views."""
    wait_for(f"every device to publish the interval holding {t:.3f}", lambda: cluster.sql(f"""
        SELECT count(*) FROM pg_netstat_devices d
         WHERE d.state = 'capturing' AND NOT EXISTS (
               SELECT 1 FROM pg_netstat_intervals i
                WHERE i.device = d.device
                  AND i.ts + make_interval(secs => i.interval_seconds) > to_timestamp({t}))""") == "0",
             timeout=timeout)


def quiesce(cluster, netns=(), timeout=60):
    """Waits until the server's TCP traffic so far is all in the views: every TCP backend
    has exited (its exit callback, which charges what was left to its statement, runs
    before its pg_stat_activity row goes), every connection of the port has ended, and
    every device has published the interval in which the last of them did."""
    wait_for("every TCP backend to exit", lambda: cluster.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE client_addr IS NOT NULL") == "0", timeout=timeout)
    published_through(cluster, wait_quiet(cluster.port, netns, timeout), timeout)


def pcap_by_client(path, server_port):
    """Per client port: packets and bytes in/out (original lengths) and SYNs sent by the
    client, for TCP to or from `server_port` in a pcap file."""
    out = {}
    for _, orig, f in pcap_frames(path):
        ports = _tcp_ports(f)
        if ports is None or server_port not in ports:
            continue
        inbound = ports[1] == server_port
        client = ports[0] if inbound else ports[1]
        t = out.setdefault(client, dict(packets_in=0, packets_out=0, bytes_in=0, bytes_out=0, syn=0))
        t["packets_in" if inbound else "packets_out"] += 1
        t["bytes_in" if inbound else "bytes_out"] += orig
        l4 = _tcp_at(f)[0]
        if inbound and len(f) > l4 + 13 and f[l4 + 13] & 0x12 == 0x02:
            t["syn"] += 1
    return out


def pcap_retransmissions(path, server_port):
    """Per client port: (retransmitted in, retransmitted out, out of order in, out of
    order out) computed from a pcap with exact sets of seen sequence ranges: a segment
    is retransmitted when part of it was seen before, out of order when part of it lies
    below the highest sequence seen but was never seen. The reference for pg_netstat's
    bounded (four gaps per direction) bookkeeping."""
    seen, high, base, out = {}, {}, {}, {}
    for _, _, f in pcap_frames(path):
        at = _tcp_at(f)
        if at is None or len(f) < at[0] + 14:
            continue
        l4, ip_end = at
        sport, dport, seq = struct.unpack(">HHI", f[l4:l4 + 8])
        if server_port not in (sport, dport):
            continue
        doff, flags = (f[l4 + 12] >> 4) * 4, f[l4 + 13]
        used = ip_end - l4 - doff + (1 if flags & 2 else 0) + (1 if flags & 1 else 0)
        if flags & 4 or used <= 0:
            continue
        inbound = dport == server_port
        key = (sport if inbound else dport, inbound)
        b = base.setdefault(key, seq)
        s = (seq - b) & 0xffffffff
        e = s + used
        ranges = seen.setdefault(key, [])
        overlap = sum(max(0, min(e, re) - max(s, rs)) for rs, re in ranges)
        counts = out.setdefault(key[0], [0, 0, 0, 0])
        if overlap > 0:
            counts[0 if inbound else 1] += 1
        below = min(e, high.get(key, 0))  # new data past the highest seen fills no gap
        if s < below and overlap < below - s:
            counts[2 if inbound else 3] += 1
        high[key] = max(high.get(key, 0), e)
        ranges.append((s, e))
        ranges.sort()
        merged = [ranges[0]]
        for rs, rend in ranges[1:]:
            if rs <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], rend))
            else:
                merged.append((rs, rend))
        seen[key] = merged
    return out


def _covered(ranges, s, e):
    """How much of [s, e) the (possibly overlapping) ranges cover."""
    cut = sorted((max(rs, s), min(re, e)) for rs, re in ranges if rs < e and re > s)
    total, at = 0, s
    for rs, re in cut:
        rs = max(rs, at)
        if re > rs:
            total += re - rs
            at = re
    return total


def pcap_payloads(path, server_port, client_port, resent=True):
    """('in'|'out', TCP payload bytes, first payload byte or None) of the packets of one
    connection (server port, client port) in a pcap; 'in' is toward the server. Counted
    as the server's kernel counts them (tcp_info), and in the order that decides which
    statement the server was running when it counted them, for a client that waits for
    each result before it sends more (psql, pgbench):
    - out: every transmission, retransmitted payload again (tcpi_bytes_sent). A copy
      sent again goes right after the first one: the client acknowledges a result
      before it sends the next statement, so the server can only have resent it while
      that result's statement was current, however late tcpdump saw it.
    - in: each byte once (tcpi_bytes_received counts what advances the receive
      sequence), with the last copy of it the client sent: when a segment is lost on its
      way in after tcpdump on lo saw it, the copy sent again is the one the server
      receives (a resent Query message starts its statement only then). Earlier copies
      count nothing.
    With resent=False, out counts each byte once too (its first copy): what the
    application wrote, whatever the network did with it."""
    frames = []
    for _, _, f in pcap_frames(path):
        at = _tcp_at(f)
        if at is None or len(f) < at[0] + 14:
            continue
        l4, ip_end = at
        sport, dport, seq = struct.unpack(">HHI", f[l4:l4 + 8])
        if (sport, dport) == (client_port, server_port):
            direction = "in"
        elif (sport, dport) == (server_port, client_port):
            direction = "out"
        else:
            continue
        doff = (f[l4 + 12] >> 4) * 4
        n = ip_end - l4 - doff
        if n > 0:
            frames.append([direction, seq, n, f[l4 + doff] if len(f) > l4 + doff else None, len(frames)])
    base = {d: next((seq for x, seq, _, _, _ in frames if x == d), 0) for d in ("in", "out")}

    def span(seq, n, d):  # relative sequence range, with room below the first
        s = (seq - base[d] + (1 << 31)) & 0xFFFFFFFF
        return s, s + n

    # In, backwards: what of each segment no later copy holds; its first byte only when
    # no later copy holds that.
    later = []
    for fr in reversed(frames):
        if fr[0] == "in":
            s, e = span(fr[1], fr[2], "in")
            covered = sum(max(0, min(e, re) - max(s, rs)) for rs, re in later)
            if any(rs <= s < re for rs, re in later):
                fr[3] = None
            later.append((s, e))
            fr[2] -= covered
    # Out, forwards: a copy sent again moves to where the first copy of its start was.
    # resent=False: what an earlier copy covered is not counted again. Not "below the
    # highest sequence so far": tcpdump on lo can see a segment before the one sent just
    # before it (they cross CPUs).
    earlier, seen = [], []
    for fr in frames:
        if fr[0] == "out":
            s, e = span(fr[1], fr[2], "out")
            fr[4] = next((at for rs, re, at in earlier if rs <= s < re), fr[4])
            earlier.append((s, e, fr[4]))
            if not resent:
                fr[2] -= _covered(seen, s, e)
                seen.append((s, e))
    for direction, _, n, first, _ in sorted(frames, key=lambda fr: fr[4]):
        if n > 0:
            yield direction, n, first


def pcap_stream(path, server_port, client_port):
    """One connection's two byte streams, reassembled from a pcap taken with whole
    packets (Tcpdump(snaplen=0)): dict(in_=bytes toward the server, out=bytes from it,
    segments=[('in'|'out', start, end, sent)] for each packet with payload, in capture
    order: the stream offsets of the bytes it added (start == end when it added none:
    a copy sent again) and `sent`, its payload length). The kernel counts bytes in once
    (the streams) and bytes out as sent, every copy (the sum of `sent`). A packet
    captured ahead of one before it in sequence (it happens on a busy lo) waits until
    the gap is filled."""
    streams = {"in": bytearray(), "out": bytearray()}
    pending = {"in": {}, "out": {}}
    base, segments = {}, []
    for _, _, f in pcap_frames(path):
        at = _tcp_at(f)
        if at is None or len(f) < at[0] + 14:
            continue
        l4, ip_end = at
        sport, dport, seq = struct.unpack(">HHI", f[l4:l4 + 8])
        if (sport, dport) == (client_port, server_port):
            d = "in"
        elif (sport, dport) == (server_port, client_port):
            d = "out"
        else:
            continue
        doff, flags = (f[l4 + 12] >> 4) * 4, f[l4 + 13]
        if flags & 0x02:
            base[d] = (seq + 1) & 0xFFFFFFFF
            continue
        if ip_end <= l4 + doff:
            continue
        assert len(f) >= ip_end, f"{path}: packet cut at {len(f)} bytes; capture with snaplen=0"
        assert d in base, f"{path}: data before the SYN of {client_port}"
        payload = f[l4 + doff:ip_end]
        s = streams[d]
        before = len(s)
        pending[d][(seq - base[d]) & 0xFFFFFFFF] = payload
        while True:
            ready = [(start, data) for start, data in pending[d].items() if start <= len(s)]
            if not ready:
                break
            for start, data in ready:
                del pending[d][start]
                if start + len(data) > len(s):
                    s[len(s):] = data[len(s) - start:]
        segments.append((d, before, len(s), len(payload)))
    for d in pending:
        assert not pending[d], f"{path}: a gap in the {d} stream of {client_port} at {len(streams[d])}"
    return dict(in_=bytes(streams["in"]), out=bytes(streams["out"]), segments=segments)


def pg_messages(data, client):
    """Protocol-3 messages of a reassembled stream: [(type, offset, length)], length of
    the whole message (type byte included). A client stream starts with untyped
    messages: SSLRequest/GSSENCRequest ('ssl', answered by one byte the server stream
    starts with: 'ssl_reply') and the startup packet ('startup'). For the server stream
    pass `client` = the client stream's messages, to skip those one-byte answers."""
    out, off = [], 0
    if client is True:
        while off + 8 <= len(data):
            n, code = struct.unpack(">II", data[off:off + 8])
            negotiation = code in (80877103, 80877104)
            out.append(("ssl" if negotiation else "startup", off, n))
            off += n
            if not negotiation:
                break
    else:
        for t, _, _ in client:
            if t == "ssl":
                out.append(("ssl_reply", off, 1))
                off += 1
    while off + 5 <= len(data):
        n = struct.unpack(">I", data[off + 1:off + 5])[0]
        out.append((chr(data[off]), off, n + 1))
        off += n + 1
    assert off == len(data), f"a message cut at {off} of {len(data)}"
    return out


def out_before(stream, in_offset):
    """Bytes the server had sent (every copy, as the kernel counts them), in capture
    order, before the client packet that brought stream offset `in_offset` (all of
    them when it is past the end). Meant for a client that waits for each answer before
    it sends more: the server cannot send a copy again after the client's next request."""
    sent = 0
    for d, start, end, n in stream["segments"]:
        if d == "in" and start <= in_offset < end:
            return sent
        if d == "out":
            sent += n
    return sent
