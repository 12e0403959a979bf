"""Who sees what (issue 29): the per-connection and per-statement views show no more than
pg_stat_activity and pg_stat_statements would. A superuser, pg_monitor and
pg_read_all_stats see every connection in full; a role delegated the views sees its own
sessions in full and of the others only role, database, PID and traffic; a plain role
sees nothing; the delegation recipe of docs/security.md works as written."""

import re
import subprocess
from pathlib import Path

import pytest

from harness import PGBIN, SqlError, wait_for

PSQL = str(PGBIN / "psql")
ALICE, BOB = "pgp_alice", "pgp_bob"
# docs/security.md, "Delegating": its example, as it is written there, for another role.
SECURITY = Path(__file__).resolve().parents[2] / "docs" / "security.md"
RECIPE = "\n".join(line for line in re.findall(r"```sql\n(.*?)```", SECURITY.read_text(), re.S)[0].splitlines()
                   if not line.startswith("CREATE ROLE")).replace(" TO r;", " TO {role};")
assert RECIPE.count("{role}") == 4, RECIPE


@pytest.fixture(scope="module")
def sessions(cluster, netns):
    """Two roles' sessions over TCP, each after a statement of its own, asleep, and one
    of the delegated role; and the roles that look at them."""
    cluster.sql(f"""
        CREATE ROLE {ALICE} LOGIN; CREATE ROLE {BOB} LOGIN;
        CREATE ROLE pgp_watcher LOGIN IN ROLE pg_monitor;
        CREATE ROLE pgp_reader LOGIN IN ROLE pg_read_all_stats;
        CREATE ROLE pgp_delegate LOGIN;
        CREATE ROLE pgp_nobody LOGIN;""")
    cluster.sql(RECIPE.format(role="pgp_reader") + RECIPE.format(role="pgp_delegate"))
    procs = []
    for role in (ALICE, BOB, "pgp_delegate"):
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", netns.name, "env", f"PGAPPNAME={role}_app", PSQL, "-X", "-h", netns.host_ip,
             "-p", str(cluster.port), "-U", role, "-d", "postgres", "-c", f"SELECT 424242 AS {role}_marker",
             "-c", "SELECT pg_sleep(60)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        wait_for("both sessions asleep", lambda: cluster.sql(
            f"SELECT count(*) FROM pg_stat_activity WHERE usename IN ('{ALICE}', '{BOB}', 'pgp_delegate') "
            "AND wait_event = 'PgSleep'") == "3")
        wait_for("the sessions in pg_netstat_connections", lambda: cluster.sql(
            f"SELECT count(*) FROM pg_netstat_connections WHERE usename IN ('{ALICE}', '{BOB}', 'pgp_delegate') "
            "AND state = 'open' AND application_name IS NOT NULL") == "3", timeout=20)
        yield
    finally:
        cluster.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE usename IN ('{ALICE}', '{BOB}', 'pgp_delegate')")
        for p in procs:
            p.wait(timeout=20)


def as_role(cluster, netns, role, sql):
    """Runs `sql` as `role` over TCP from the test host, so the role has a session of
    its own in the views."""
    return cluster.rows(sql, user=role, host=netns.host_ip, netns=netns.name)


# The sleeping sessions (the viewer's own connection may not be captured yet when it asks).
CONNECTIONS = (f"SELECT usename, client_addr IS NOT NULL, client_port IS NOT NULL, application_name "
               f"FROM pg_netstat_connections WHERE state = 'open' AND application_name LIKE 'pgp_%_app' "
               f"ORDER BY usename")
ALL = [[ALICE, "t", "t", f"{ALICE}_app"], [BOB, "t", "t", f"{BOB}_app"], ["pgp_delegate", "t", "t", "pgp_delegate_app"]]


@pytest.mark.parametrize("role", ["postgres", "pgp_watcher", "pgp_reader"])
def test_the_privileged_see_every_connection_in_full(cluster, netns, sessions, role):
    rows = as_role(cluster, netns, role, CONNECTIONS)
    assert rows == ALL, rows
    ids = as_role(cluster, netns, role, f"SELECT count(queryid) FROM pg_netstat_statements WHERE role = '{ALICE}' "
                                        "AND kind = 'statement'")
    assert int(ids[0][0]) >= 1


def test_a_delegated_role_sees_its_own_sessions_in_full_and_of_the_others_what_pg_stat_activity_shows(
        cluster, netns, sessions):
    rows = as_role(cluster, netns, "pgp_delegate", CONNECTIONS)
    # One row each (no connection doubled by the join on what is hidden); the others'
    # address and port hidden, as pg_stat_activity hides them (and, as it does, their
    # application names shown); its own session in full.
    assert rows == [[ALICE, "f", "f", f"{ALICE}_app"], [BOB, "f", "f", f"{BOB}_app"],
                    ["pgp_delegate", "t", "t", "pgp_delegate_app"]], rows
    activity = as_role(cluster, netns, "pgp_delegate", f"""
        SELECT usename, client_addr IS NOT NULL, client_port IS NOT NULL FROM pg_stat_activity
         WHERE usename IN ('{ALICE}', '{BOB}') ORDER BY usename""")
    assert activity == [[ALICE, "f", "f"], [BOB, "f", "f"]], "the yardstick"
    # Called directly, the functions hide the same.
    direct = as_role(cluster, netns, "pgp_delegate", f"""
        SELECT (SELECT count(client_addr) FROM pg_netstat_flows() WHERE role = '{ALICE}'),
               (SELECT count(*) FROM pg_netstat_flow_owners() o JOIN pg_netstat_flows() f USING (client_port)
                 WHERE f.role = '{ALICE}'),
               (SELECT count(client_addr) + count(client_port) FROM pg_netstat_backend_connections()
                 WHERE role = '{ALICE}')""")
    assert direct == [["0", "0", "0"]], direct
    # Statements: the others' rows without their query ids (and so without their text),
    # its own with them.
    stmts = as_role(cluster, netns, "pgp_delegate", f"""
        SELECT role, count(*) > 0, count(queryid) FROM pg_netstat_statements
         WHERE kind = 'statement' AND role IN ('{ALICE}', 'pgp_delegate') GROUP BY role ORDER BY role""")
    assert stmts[0][:3] == [ALICE, "t", "0"], stmts
    assert stmts[1][0] == "pgp_delegate" and int(stmts[1][2]) >= 1, stmts


def test_a_plain_role_sees_nothing(cluster, netns, sessions):
    for view in ("pg_netstat_connections", "pg_netstat_statements", "pg_netstat_roles", "pg_netstat"):
        with pytest.raises(SqlError) as e:
            as_role(cluster, netns, "pgp_nobody", f"SELECT * FROM {view}")
        assert "permission denied" in e.value.stderr, e.value.stderr
    with pytest.raises(SqlError):
        as_role(cluster, netns, "pgp_nobody", "SELECT * FROM pg_netstat_flows()")
