"""Bad settings: every malformed or out-of-range value of every pg_netstat.* setting is
refused with a message that says what is allowed, whichever way it arrives: ALTER SYSTEM
refuses it; written into postgresql.conf and reloaded it is refused in the log and the
old value stays in force (while counting stays exact); present at server start it is
refused in the log, the server starts anyway and the setting keeps its default."""

import time

from harness import PG_MAJOR, Cluster, free_port, wait_for
from test_reliability import traffic_compared_with_tcpdump

MANY_DEVICES = ",".join(f"d{i}" for i in range(17))
MANY_PORTS = ",".join(str(7000 + i) for i in range(16))


def out_of_range(value, name, low, high, unit=None):
    """PostgreSQL's own refusal of a number outside a setting's bounds. From 17 on it
    gives the bounds with the unit too: "(1 s .. 900000 s)" where 15 and 16 say "(1 .. 900000)"."""
    u = f" {unit}" if unit else ""
    bounds = f"{low}{u} .. {high}{u}" if PG_MAJOR >= 17 else f"{low} .. {high}"
    return f'{value}{u} is outside the valid range for parameter "{name}" ({bounds})'


def whole_numbers(low, high, unit=None):
    """The hint pg_netstat adds to PostgreSQL's "invalid value" for a number it cannot read."""
    return f"Allowed values: whole numbers from {low} to {high}" + (f" {unit}" if unit else "")


# (setting, value as written after "=", fragments the refusal must contain: the value it
# refused and what is allowed). The same text reaches the client (ALTER SYSTEM) and the
# server log (reload, start).
CASES = [
    ("pg_netstat.interval", "0", [out_of_range(0, "pg_netstat.interval", 1, 900000, "s")]),
    ("pg_netstat.interval", "'900001'", [out_of_range(900001, "pg_netstat.interval", 1, 900000, "s")]),
    ("pg_netstat.interval", "'ten'", ['invalid value for parameter "pg_netstat.interval": "ten"', whole_numbers(1, 900000, "s")]),
    ("pg_netstat.interval", "'5 parsecs'", ['invalid value for parameter "pg_netstat.interval": "5 parsecs"',
                                            'Valid units for this parameter are "us", "ms", "s", "min", "h", and "d"',
                                            whole_numbers(1, 900000, "s")]),
    ("pg_netstat.interval", "'99999999999'", ['invalid value for parameter "pg_netstat.interval": "99999999999"',
                                              whole_numbers(1, 900000, "s")]),
    ("pg_netstat.packet_wait_time", "0", [out_of_range(0, "pg_netstat.packet_wait_time", 1, 60, "s")]),
    ("pg_netstat.packet_wait_time", "'2min'", [out_of_range(120, "pg_netstat.packet_wait_time", 1, 60, "s")]),
    ("pg_netstat.packet_wait_time", "'soon'", ['invalid value for parameter "pg_netstat.packet_wait_time": "soon"', whole_numbers(1, 60, "s")]),
    ("pg_netstat.pcap_buffer_size", "1000", [out_of_range(1000, "pg_netstat.pcap_buffer_size", 131070, 1073741824, "B")]),
    ("pg_netstat.pcap_buffer_size", "'2GB'", ['invalid value for parameter "pg_netstat.pcap_buffer_size": "2GB"',
                                              whole_numbers(131070, 1073741824, "B")]),
    ("pg_netstat.pcap_buffer_size", "'big'", ['invalid value for parameter "pg_netstat.pcap_buffer_size": "big"',
                                              whole_numbers(131070, 1073741824, "B")]),
    ("pg_netstat.pcap_snaplen", "40", [out_of_range(40, "pg_netstat.pcap_snaplen", 96, 65535, "B")]),
    ("pg_netstat.pcap_snaplen", "65536", [out_of_range(65536, "pg_netstat.pcap_snaplen", 96, 65535, "B")]),
    ("pg_netstat.pcap_snaplen", "'all'", ['invalid value for parameter "pg_netstat.pcap_snaplen": "all"', whole_numbers(96, 65535, "B")]),
    ("pg_netstat.pcap_timeout", "0", [out_of_range(0, "pg_netstat.pcap_timeout", 1, 30000, "ms")]),
    ("pg_netstat.pcap_timeout", "'31s'", [out_of_range(31000, "pg_netstat.pcap_timeout", 1, 30000, "ms")]),
    ("pg_netstat.pcap_timeout", "'never'", ['invalid value for parameter "pg_netstat.pcap_timeout": "never"', whole_numbers(1, 30000, "ms")]),
    ("pg_netstat.devices", "'lo,,eth0'", ['invalid value for parameter "pg_netstat.devices": "lo,,eth0"',
                                          "Entry 2 of the list is empty; write names separated by single commas"]),
    ("pg_netstat.devices", "'lo,lo'", ['invalid value for parameter "pg_netstat.devices": "lo,lo"', 'Device "lo" is listed twice']),
    ("pg_netstat.devices", "'bad name'", ['invalid value for parameter "pg_netstat.devices": "bad name"',
                                          "is not a valid network device name: 1 to 15 characters"]),
    ("pg_netstat.devices", "'averyveryverylongname0'", ['"averyveryverylongname0" is not a valid network device name: 1 to 15 characters']),
    ("pg_netstat.devices", f"'{MANY_DEVICES}'", [f'invalid value for parameter "pg_netstat.devices": "{MANY_DEVICES}"',
                                                 "17 devices are listed; at most 16 can be captured"]),
    ("pg_netstat.capture_loopback", "'perhaps'", ['parameter "pg_netstat.capture_loopback" requires a Boolean value',
                                                  "on, off, true, false"]),
    ("pg_netstat.capture_loopback", "2", ['parameter "pg_netstat.capture_loopback" requires a Boolean value', "on, off, true, false"]),
    ("pg_netstat.capture_method", "'dpdk'", ['invalid value for parameter "pg_netstat.capture_method": "dpdk"',
                                             "Available values: auto, ring, pcap"]),
    ("pg_netstat.ports", "'0'", ['invalid value for parameter "pg_netstat.ports": "0"', '"0" is not a TCP port number (1 to 65535)']),
    ("pg_netstat.ports", "'65536'", ['"65536" is not a TCP port number (1 to 65535)']),
    ("pg_netstat.ports", "'pgbouncer'", ['"pgbouncer" is not a TCP port number (1 to 65535)']),
    ("pg_netstat.ports", "'6432,,6433'", ["Entry 2 of the list is empty; write ports separated by single commas"]),
    ("pg_netstat.ports", "'6432,6432'", ["Port 6432 is listed twice"]),
    ("pg_netstat.ports", f"'{MANY_PORTS}'", ["16 ports are listed; at most 15 can be added to the server's own port"]),
    ("pg_netstat.max_flows", "-1", [out_of_range(-1, "pg_netstat.max_flows", 0, 1048576)]),
    ("pg_netstat.max_flows", "2000000", [out_of_range(2000000, "pg_netstat.max_flows", 0, 1048576)]),
    ("pg_netstat.max_flows", "'lots'", ['invalid value for parameter "pg_netstat.max_flows": "lots"', whole_numbers(0, 1048576)]),
    ("pg_netstat.history", "0", [out_of_range(0, "pg_netstat.history", 1, 86400)]),
    ("pg_netstat.history", "100000", [out_of_range(100000, "pg_netstat.history", 1, 86400)]),
    ("pg_netstat.history", "'a day'", ['invalid value for parameter "pg_netstat.history": "a day"', whole_numbers(1, 86400)]),
    ("pg_netstat.save_interval", "-1", [out_of_range(-1, "pg_netstat.save_interval", 0, 86400, "s")]),
    ("pg_netstat.save_interval", "'2d'", [out_of_range(172800, "pg_netstat.save_interval", 0, 86400, "s")]),
    ("pg_netstat.save_interval", "'often'", ['invalid value for parameter "pg_netstat.save_interval": "often"',
                                            whole_numbers(0, 86400, "s")]),
    ("pg_netstat.flow_idle_timeout", "-1", [out_of_range(-1, "pg_netstat.flow_idle_timeout", 0, 2147483, "s")]),
    ("pg_netstat.flow_idle_timeout", "'30d'", [out_of_range(2592000, "pg_netstat.flow_idle_timeout", 0, 2147483, "s")]),
    ("pg_netstat.flow_idle_timeout", "'forever'", ['invalid value for parameter "pg_netstat.flow_idle_timeout": "forever"',
                                                   whole_numbers(0, 2147483, "s")]),
    ("pg_netstat.max_statements", "9", [out_of_range(9, "pg_netstat.max_statements", 10, 1000000)]),
    ("pg_netstat.max_statements", "1000001", [out_of_range(1000001, "pg_netstat.max_statements", 10, 1000000)]),
    ("pg_netstat.max_statements", "'many'", ['invalid value for parameter "pg_netstat.max_statements": "many"',
                                             whole_numbers(10, 1000000)]),
    ("pg_netstat.track_statements", "'sometimes'", ['parameter "pg_netstat.track_statements" requires a Boolean value',
                                                    "on, off, true, false"]),
    ("pg_netstat.track_statements", "2", ['parameter "pg_netstat.track_statements" requires a Boolean value',
                                          "on, off, true, false"]),
]
# The list settings' hint says what a list may hold, whatever was wrong with it.
LIST_ALLOWED = {"pg_netstat.devices": "Allowed values: up to 16 network device names",
                "pg_netstat.ports": "Allowed values: up to 15 TCP port numbers from 1 to 65535"}
CASES = [(name, value, fragments + [LIST_ALLOWED[name]] if name in LIST_ALLOWED else fragments)
         for name, value, fragments in CASES]
# Settings that take a server restart: only ALTER SYSTEM and server start apply to them.
RESTART_ONLY = {"pg_netstat.max_flows", "pg_netstat.history", "pg_netstat.max_statements"}


def rounds(cases):
    """The cases in rounds with at most one value per setting (a configuration file holds
    one value per name): round k has the k-th bad value of every setting."""
    by_setting = {}
    for case in cases:
        by_setting.setdefault(case[0], []).append(case)
    return [[values[k] for values in by_setting.values() if k < len(values)]
            for k in range(max(len(v) for v in by_setting.values()))]


def current(cluster):
    return dict(cluster.rows("SELECT name, setting FROM pg_settings WHERE name LIKE 'pg_netstat.%' ORDER BY name"))


def missing(text, cases):
    """Each (setting, value, fragment) whose fragment is not in `text`."""
    return [(name, value, f) for name, value, fragments in cases for f in fragments if f not in text]


def test_every_setting_refuses_every_bad_value_everywhere(cluster, netns, tmp_path):
    names = {name for name, _, _ in CASES}
    defined = set(cluster.sql("SELECT string_agg(name, ' ') FROM pg_settings WHERE name LIKE 'pg_netstat.%'").split())
    assert names == defined, f"settings without a bad value here: {defined - names}"

    # (a) ALTER SYSTEM refuses each value with the reason and what is allowed.
    auto_conf = "SELECT name, setting FROM pg_file_settings WHERE sourcefile LIKE '%auto.conf' ORDER BY seqno"
    auto_before = cluster.rows(auto_conf)
    wrong = []
    for name, value, fragments in CASES:
        r = cluster.psql_result(f"ALTER SYSTEM SET {name} = {value}")
        if r.returncode == 0:
            wrong.append((name, value, "accepted"))
        wrong += [(name, value, f) for f in fragments if f not in r.stderr]
    # An unknown name under the reserved prefix is refused too. PostgreSQL 15 and 16 say it
    # is unknown; 17 and later say why it can never be defined.
    r = cluster.psql_result("ALTER SYSTEM SET pg_netstat.no_such_setting = 1")
    if PG_MAJOR <= 16:
        refusal = ['unrecognized configuration parameter "pg_netstat.no_such_setting"']
    else:
        refusal = ['invalid configuration parameter name "pg_netstat.no_such_setting"',
                   '"pg_netstat" is a reserved prefix']
    assert r.returncode != 0 and all(f in r.stderr for f in refusal), r.stderr
    assert cluster.rows(auto_conf) == auto_before, "a refused value reached postgresql.auto.conf"

    # (b) In postgresql.conf and reloaded, during traffic that is compared with tcpdump:
    # refused in the log, the old values stay, the worker stays, the counts stay exact.
    conf = cluster.dir / "data" / "postgresql.conf"
    original = conf.read_text()
    before = current(cluster)
    worker = cluster.worker_pid()
    log_mark = len(cluster.log())
    try:
        with traffic_compared_with_tcpdump(cluster, netns, tmp_path, 10, 500):
            for batch in rounds([c for c in CASES if c[0] not in RESTART_ONLY]):
                mark = len(cluster.log())
                conf.write_text(original + "".join(f"\n{name} = {value}" for name, value, _ in batch) + "\n")
                cluster.reload()
                wait_for("the reload to be logged", lambda: "contains errors" in cluster.log()[mark:])
                wrong += [("reload",) + m for m in missing(cluster.log()[mark:], batch)]
                assert current(cluster) == before, "a bad value took effect"
                time.sleep(1)  # input: the reloads are spaced out over the traffic
    finally:
        conf.write_text(original)
        cluster.reload()
    assert cluster.worker_pid() == worker, "a refused reload must not restart the worker"
    assert "cannot apply the new capture settings" not in cluster.log()[log_mark:]

    # (c) At server start: refused in the log, the server starts, the default is in force.
    c = Cluster(free_port())
    try:
        conf = c.dir / "data" / "postgresql.conf"
        original = conf.read_text()
        for batch in rounds(CASES):
            conf.write_text(original + "".join(f"\n{name} = {value}" for name, value, _ in batch) + "\n")
            mark = len(c.log())
            c.start()
            try:
                log = c.log()[mark:]
                wrong += [("start",) + m for m in missing(log, batch)]
                assert c.sql("SELECT 1", host="127.0.0.1") == "1"
                assert c.rows("SELECT name, setting FROM pg_settings WHERE name LIKE 'pg_netstat.%'"
                              " AND setting IS DISTINCT FROM boot_val") == []
                assert wait_for("the capture worker", c.worker_pid)
            finally:
                c.stop()
    finally:
        c.stop()
        c.remove()
    assert not wrong, "refusals without the expected words:\n" + "\n".join(map(repr, wrong))

