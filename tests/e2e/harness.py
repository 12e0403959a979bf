"""Helpers for the end-to-end tests: throwaway clusters, test hosts in network
namespaces, tcpdump as the independent packet count, and a small pcap reader.

Traffic only ever goes to loopback or to the namespace this harness creates."""

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
PGBIN = Path("/usr/lib/postgresql/15/bin")
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


class SqlError(Exception):
    def __init__(self, stderr):
        super().__init__(stderr)
        self.stderr = stderr


class Cluster:
    """A PostgreSQL 15 cluster in its own directory, run as `postgres` with CAP_NET_RAW."""

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

    def start(self, cap_net_raw=True):
        env = dict(os.environ, NO_CAP_NET_RAW="" if cap_net_raw else "1")
        run([str(CLUSTER), "start", str(self.dir)], env=env)

    def stop(self):
        run([str(CLUSTER), "stop", str(self.dir)], check=False)

    def reload(self):
        run([str(CLUSTER), "reload", str(self.dir)])

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
    Host end `host_if` gets `host_ip`, the namespace end gets `peer_ip` (both /30)."""

    def __init__(self, tag, host_ip="169.254.77.1", peer_ip="169.254.77.2"):
        self.name = f"pgn_{tag}"
        self.host_if = f"pgnh{tag}"[:15]
        self.peer_if = f"pgnp{tag}"[:15]
        self.host_ip = host_ip
        self.peer_ip = peer_ip
        self.teardown()
        run(["ip", "netns", "add", self.name])
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if])
        run(["ip", "link", "set", self.peer_if, "netns", self.name])
        run(["ip", "addr", "add", f"{host_ip}/30", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        self.exec(["ip", "addr", "add", f"{peer_ip}/30", "dev", self.peer_if])
        self.exec(["ip", "link", "set", self.peer_if, "up"])
        self.exec(["ip", "link", "set", "lo", "up"])

    def exec(self, cmd, check=True):
        return run(["ip", "netns", "exec", self.name, *cmd], check=check)

    def teardown(self):
        run(["ip", "link", "del", self.host_if], check=False)
        run(["ip", "netns", "del", self.name], check=False)


class Tcpdump:
    """tcpdump writing a pcap of `tcp port PORT` on one device: the independent count.
    libpcap, like pg_netstat, keeps one copy of each loopback packet."""

    def __init__(self, device, port, workdir):
        self.path = Path(workdir) / f"{device}.pcap"
        self.device = device
        self.port = port

    def __enter__(self):
        self.err_path = self.path.with_suffix(".err")
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            # --immediate-mode: libpcap hands over each packet at once. Without it, the
            # packets in its last, partly filled ring block are lost when tcpdump is
            # stopped, and the reference count comes out short.
            ["tcpdump", "-i", self.device, "-p", "-n", "-s", "128", "-B", "16384", "-U", "--immediate-mode",
             "-Z", "root", "-w", str(self.path), f"tcp port {self.port}"],
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
        return pcap_tally(self.path, self.port)


def pcap_packets(path, port):
    """(seconds as float, 'in'|'out', original length) of each TCP packet on `port` in a
    pcap file; 'in' is toward the port."""
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
        frame = data[off + 16: off + 16 + incl]
        off += 16 + incl
        ports = _tcp_ports(frame)
        if ports is None:
            continue
        if ports[0] == port:
            yield sec + frac * frac_scale, "out", orig
        elif ports[1] == port:
            yield sec + frac * frac_scale, "in", orig


def pcap_tally(path, port):
    """Packets and bytes (original frame lengths) of TCP port `port` in a pcap file, plus
    the whole seconds of the first and last packet."""
    t = dict(packets_in=0, packets_out=0, bytes_in=0, bytes_out=0, first_sec=None, last_sec=None)
    for ts, direction, length in pcap_packets(path, port):
        t["packets_" + direction] += 1
        t["bytes_" + direction] += length
        t["first_sec"] = int(ts) if t["first_sec"] is None else t["first_sec"]
        t["last_sec"] = int(ts)
    return t


def _tcp_ports(f):
    if len(f) < 14:
        return None
    ethertype = struct.unpack(">H", f[12:14])[0]
    if ethertype == 0x0800 and len(f) >= 34:
        proto, l4 = f[23], 14 + (f[14] & 0x0F) * 4
    elif ethertype == 0x86DD and len(f) >= 54:
        proto, l4 = f[20], 54
    else:
        return None
    if proto != 6 or len(f) < l4 + 4:
        return None
    return struct.unpack(">HH", f[l4:l4 + 4])


def cap_bits(status_text):
    """CapInh/CapPrm/CapEff/CapAmb of a /proc/PID/status text, as integers."""
    out = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            out[key] = int(value.strip(), 16)
    return out


CAP_NET_RAW = 1 << 13


def cpu_ticks(pid):
    """User + system CPU time of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
