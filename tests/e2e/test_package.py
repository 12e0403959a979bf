"""Packages and upgrades, for real: the .deb from scripts/package for the PostgreSQL under
test goes in and works in a fresh cluster; a database on the first released SQL surface
(0.1.0), updated with ALTER EXTENSION, ends up identical to a fresh install; and a catalog
definition that does not match the loaded library (the window between installing a new
package and running ALTER EXTENSION UPDATE) is refused with an error, not misread.

On 15 the package is installed with dpkg -i into Debian's PostgreSQL 15. On 16-18 it
cannot be: it depends on postgresql-16/17/18 (the PostgreSQL project's apt packages, where
users of Debian 12 get those majors) and Debian 12 has none, so the server under test is
the PyPI build scripts/setup installs. There the package's files, taken out of the .deb
with dpkg-deb, are put where that server looks for them: the same library and SQL, used
for real, only not through dpkg."""

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import INTERVAL
from harness import PG_MAJOR, Cluster, SqlError, free_port, pg_config, run, wait_for

# Runs alone (docs/testing.md): installs the .deb (dpkg -i, dpkg -r) into the PostgreSQL
# every other test's servers load.
pytestmark = pytest.mark.alone

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = f"postgresql-{PG_MAJOR}-pg-netstat"
# Where the package puts its files (Debian's and PGDG's layout for PostgreSQL N) ...
PKG_LIBDIR = Path(f"/usr/lib/postgresql/{PG_MAJOR}/lib")
PKG_EXTDIR = Path(f"/usr/share/postgresql/{PG_MAJOR}/extension")
# ... and where the server under test looks for them (the same on 15).
LIBDIR = Path(pg_config("--pkglibdir"))
EXTDIR = Path(pg_config("--sharedir")) / "extension"
BY_DPKG = (LIBDIR, EXTDIR) == (PKG_LIBDIR, PKG_EXTDIR)
VERSION = re.search(r'^version = "(.+)"$', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
FIRST_RELEASE = "0.1.0"


def put_in_place(src, dst):
    """Replaces dst by rename, never rewriting it in place: running servers have the
    library mapped."""
    tmp = dst.with_name(dst.name + ".restoring")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """Builds the package for the PostgreSQL under test (or takes the one PG_NETSTAT_DEB
    names, made from this tree by scripts/package) and installs it: with dpkg where
    it can (15), else its files from the .deb (see above). Afterwards removes it and puts
    back the files scripts/build had installed (the other tests run on those)."""
    saved = tmp_path_factory.mktemp("installed")
    before = [LIBDIR / "pg_netstat.so", *EXTDIR.glob("pg_netstat*")]
    for f in before:
        shutil.copy2(f, saved / f.name)
    if os.environ.get("PG_NETSTAT_DEB"):
        path = Path(os.environ["PG_NETSTAT_DEB"])  # made once per major by scripts/test
    else:
        out = run([str(ROOT / "scripts" / "package"), "--pg", str(PG_MAJOR)], cwd=ROOT).stdout.strip().splitlines()
        path = ROOT / out[-1]
    added = []
    try:
        if BY_DPKG:
            run(["dpkg", "-i", str(path)])
        else:
            root = tmp_path_factory.mktemp("unpacked")
            run(["dpkg-deb", "-x", str(path), str(root)])
            for src_dir, dst_dir in ((PKG_LIBDIR, LIBDIR), (PKG_EXTDIR, EXTDIR)):
                for src in (root / src_dir.relative_to("/")).iterdir():
                    dst = dst_dir / src.name
                    if not dst.exists():
                        added.append(dst)
                    put_in_place(src, dst)
        yield path
    finally:
        if BY_DPKG:
            run(["dpkg", "-r", PACKAGE], check=False)
        for f in added:
            f.unlink(missing_ok=True)
        for f in before:
            put_in_place(saved / f.name, f)


@pytest.fixture
def fresh_cluster():
    c = Cluster(free_port(), conf=[f"pg_netstat.interval = {INTERVAL}", "pg_netstat.packet_wait_time = 1",
                                   "pg_netstat.devices = 'lo'"])
    c.start()
    try:
        yield c
    finally:
        c.stop()
        c.remove()


def traffic_and_rows(c, view, dbname):
    """Sends a known-size result over TCP and waits for it in `view` of `dbname`."""
    c.sql("SELECT repeat('x', 200000)", host="127.0.0.1", dbname=dbname)
    wait_for(f"the result in {view}", lambda: int(c.sql(
        f"SELECT coalesce(sum(bytes_out), 0) FROM {view} WHERE device = 'lo'", dbname=dbname)) > 200000, timeout=20)


def test_the_debian_package_installs_and_counts(deb, fresh_cluster):
    fields = {k: run(["dpkg-deb", "-f", str(deb), k]).stdout.strip() for k in ("Package", "Version", "Depends")}
    assert fields["Package"] == PACKAGE
    assert fields["Version"] == f"{VERSION}-1"
    depends = [d.strip().split(" ")[0] for d in fields["Depends"].split(",")]
    assert f"postgresql-{PG_MAJOR}" in depends and "libc6" in depends, fields["Depends"]
    assert not any(d.startswith("postgresql-") and d != f"postgresql-{PG_MAJOR}" for d in depends), fields["Depends"]
    assert not any("pcap" in d for d in depends), "the default build must not need libpcap"

    # What the package holds, and where PostgreSQL N looks for it: nothing else of ours.
    contents = {line.split()[-1].lstrip(".") for line in run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines()}
    wanted = [PKG_LIBDIR / "pg_netstat.so", PKG_EXTDIR / "pg_netstat.control", PKG_EXTDIR / f"pg_netstat--{VERSION}.sql",
              PKG_EXTDIR / f"pg_netstat--{FIRST_RELEASE}.sql",
              PKG_EXTDIR / f"pg_netstat--{FIRST_RELEASE}--{VERSION}.sql"]
    for f in wanted:
        assert str(f) in contents, f"{f} is not in the package"
    ours = {f for f in contents if "pg_netstat" in f and not f.startswith(f"/usr/share/doc/{PACKAGE}/")}
    assert ours == {str(f) for f in wanted}, ours
    # The systemd drop-in it ships names this major's cluster unit.
    drop_in = run(["sh", "-c", f"dpkg-deb --fsys-tarfile {deb} | tar -xOf - "
                               f"./usr/share/doc/{PACKAGE}/examples/cap_net_raw.conf"]).stdout
    assert f"postgresql@{PG_MAJOR}-main.service.d" in drop_in, drop_in

    if BY_DPKG:
        status = run(["dpkg-query", "-W", "-f", "${Status} ${Version}", PACKAGE]).stdout
        assert status == f"install ok installed {VERSION}-1"
        owned = set(run(["dpkg", "-L", PACKAGE]).stdout.split())
        for f in wanted:
            assert str(f) in owned, f"{f} is not installed by dpkg"
    for f in wanted:
        installed = (LIBDIR if f.parent == PKG_LIBDIR else EXTDIR) / f.name
        assert installed.exists(), installed
    assert "pcap" not in run(["ldd", str(LIBDIR / "pg_netstat.so")]).stdout

    c = fresh_cluster
    c.sql("CREATE EXTENSION pg_netstat")
    assert c.sql("SELECT extversion FROM pg_extension WHERE extname = 'pg_netstat'") == VERSION
    traffic_and_rows(c, "pg_netstat", "postgres")
    assert c.rows("SELECT device, state FROM pg_netstat_devices") == [["lo", "capturing"]]


# Everything the extension owns, as the catalog holds it: functions (result, C symbol,
# library, volatility, strictness, parallel safety, privileges, comment), views (columns,
# definition, privileges, comment), the initial privileges pg_dump relies on, and members
# of any other kind, so that an object the upgrade forgot shows up as a difference.
CATALOG = r"""
WITH member AS (
    SELECT classid, objid FROM pg_depend
     WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
       AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_netstat'))
SELECT 'function', p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       concat_ws(' / ', pg_get_function_result(p.oid), p.prosrc, p.probin, p.provolatile, p.proisstrict,
                 p.proparallel, p.procost, p.prorows, p.proacl::text, obj_description(p.oid, 'pg_proc'),
                 i.initprivs::text, p.proconfig::text)
  FROM member m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid
  LEFT JOIN pg_init_privs i ON i.classoid = 'pg_proc'::regclass AND i.objoid = p.oid AND i.objsubid = 0
UNION ALL
SELECT 'relation', c.relname,
       concat_ws(' / ', c.relkind, regexp_replace(pg_get_viewdef(c.oid), '\s+', ' ', 'g'),
                 (SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
                    FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped),
                 c.relacl::text, obj_description(c.oid, 'pg_class'), i.initprivs::text)
  FROM member m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
  LEFT JOIN pg_init_privs i ON i.classoid = 'pg_class'::regclass AND i.objoid = c.oid AND i.objsubid = 0
UNION ALL
SELECT 'other member', m.classid::regclass::text, pg_describe_object(m.classid, m.objid, 0)
  FROM member m WHERE m.classid NOT IN ('pg_proc'::regclass, 'pg_class'::regclass)
ORDER BY 1, 2, 3
"""


def test_alter_extension_update_from_the_first_release_equals_a_fresh_install(deb, fresh_cluster):
    c = fresh_cluster
    c.sql("CREATE ROLE watcher LOGIN IN ROLE pg_monitor")
    for db in ("upgraded", "fresh"):
        c.sql(f"CREATE DATABASE {db}")

    c.sql(f"CREATE EXTENSION pg_netstat VERSION '{FIRST_RELEASE}'", dbname="upgraded")
    assert c.sql("SELECT extversion FROM pg_extension WHERE extname = 'pg_netstat'", dbname="upgraded") == FIRST_RELEASE
    old_catalog = c.rows(CATALOG, dbname="upgraded")
    # The new library under the old definitions, as between `dpkg -i` and ALTER EXTENSION:
    # the old views keep working, with the old columns.
    traffic_and_rows(c, "pg_netstat_intervals", "upgraded")
    assert len(c.rows("SELECT * FROM pg_netstat_intervals LIMIT 1", dbname="upgraded")[0]) == 10
    assert c.rows("SELECT device FROM pg_netstat_devices", dbname="upgraded", user="watcher") == [["lo"]]

    # A user's grant on a view the update changes, in a database of its own (grants
    # made before an update become part of the extension's initial privileges there, so
    # this catalog would differ from a fresh install's).
    c.sql("CREATE DATABASE granted")
    c.sql("DROP ROLE IF EXISTS reporter; CREATE ROLE reporter LOGIN")
    c.sql(f"CREATE EXTENSION pg_netstat VERSION '{FIRST_RELEASE}'", dbname="granted")
    c.sql("GRANT SELECT ON pg_netstat_intervals TO reporter", dbname="granted")
    c.sql("CREATE VIEW my_intervals AS SELECT device, ts, bytes_in FROM pg_netstat_intervals", dbname="granted")
    c.sql("ALTER EXTENSION pg_netstat UPDATE", dbname="granted")
    c.sql("SELECT * FROM my_intervals", dbname="granted")
    assert c.sql("SELECT has_table_privilege('reporter', 'pg_netstat_intervals', 'SELECT')", dbname="granted") == "t"
    c.sql("GRANT EXECUTE ON FUNCTION pg_netstat_interval_history() TO reporter", dbname="granted")
    assert len(c.rows("SELECT * FROM pg_netstat_intervals LIMIT 1", dbname="granted", user="reporter")[0]) == 19

    c.sql("ALTER EXTENSION pg_netstat UPDATE", dbname="upgraded")
    c.sql("CREATE EXTENSION pg_netstat", dbname="fresh")
    versions = [c.sql("SELECT extversion FROM pg_extension WHERE extname = 'pg_netstat'", dbname=db)
                for db in ("upgraded", "fresh")]
    assert versions == [VERSION, VERSION]

    upgraded, fresh = c.rows(CATALOG, dbname="upgraded"), c.rows(CATALOG, dbname="fresh")
    assert upgraded != old_catalog, "the update changed nothing"
    missing = [r for r in fresh if r not in upgraded]
    extra = [r for r in upgraded if r not in fresh]
    assert not missing and not extra, f"after the update, missing: {missing}\nnot in a fresh install: {extra}"
    assert len(fresh) >= 15
    # Functions in SQL run with a fixed search_path, not the caller's.
    assert c.sql("SELECT proconfig FROM pg_proc WHERE proname = 'pg_netstat_statement_texts'",
                 dbname="fresh") == "{\"search_path=pg_catalog, pg_temp\"}"

    # The data lives in shared memory, not in the catalog: it is all still there, and the
    # new columns and views answer, for pg_monitor too.
    traffic_and_rows(c, "pg_netstat_intervals", "upgraded")
    for view in ("pg_netstat", "pg_netstat_intervals", "pg_netstat_devices", "pg_netstat_connections",
                 "pg_netstat_roles", "pg_netstat_databases", "pg_netstat_unauthenticated", "pg_netstat_flow_table"):
        c.sql(f"SELECT * FROM {view}", dbname="upgraded", user="watcher")
    # Two TCP connections were made (before and after the update); the new column counts both.
    wait_for("both connections in connection_attempts", lambda: int(c.sql(
        "SELECT sum(connection_attempts) FROM pg_netstat_intervals", dbname="upgraded")) == 2, timeout=20)


def test_a_definition_that_does_not_match_the_library_is_refused(cluster):
    """SQL that points at our C functions with other columns than they return: an error
    that names the fix, the server up, and a prefix of our columns still served."""
    lib = "'$libdir/pg_netstat'"
    cluster.sql(f"""
        CREATE FUNCTION pgn_retyped() RETURNS TABLE (device text, ts bigint)
            AS {lib}, 'pg_netstat_history_wrapper' LANGUAGE c;
        CREATE FUNCTION pgn_too_wide() RETURNS TABLE (max_flows int, flows int, evictions bigint, folded bigint,
                                                      owner_overflow bigint, stats_reset timestamptz, extra bigint)
            AS {lib}, 'pg_netstat_flow_table_status_wrapper' LANGUAGE c;
        CREATE FUNCTION pgn_prefix() RETURNS TABLE (device text, ts timestamptz)
            AS {lib}, 'pg_netstat_history_wrapper' LANGUAGE c;
        CREATE FUNCTION pgn_scalar() RETURNS bigint AS {lib}, 'pg_netstat_history_wrapper' LANGUAGE c;
    """)
    try:
        for fn, why in (("pgn_retyped", 'its column 2 is "ts" of type 20'),
                        ("pgn_too_wide", "it declares 7 columns, this library returns 6"),
                        ("pgn_scalar", "not declared to return rows")):
            with pytest.raises(SqlError) as e:
                cluster.sql(f"SELECT * FROM {fn}()")
            assert "does not match the pg_netstat library" in e.value.stderr, e.value.stderr
            assert why in e.value.stderr and "ALTER EXTENSION pg_netstat UPDATE" in e.value.stderr, e.value.stderr
        cluster.sql("SELECT 1", host="127.0.0.1")
        wait_for("a closed interval", lambda: cluster.rows("SELECT * FROM pg_netstat_history()"), timeout=20)
        served = cluster.rows("SELECT * FROM pgn_prefix()")
        assert served and all(len(r) == 2 for r in served)
        # The same rows as the full function's first two columns (asked again should an
        # interval close between the two reads).
        wait_for("the prefix to equal the full rows' first columns", lambda: cluster.rows(
            "SELECT * FROM pgn_prefix()") == cluster.rows("SELECT device, ts FROM pg_netstat_history()"), timeout=10)
        assert cluster.sql("SELECT 1") == "1"
    finally:
        cluster.sql("DROP FUNCTION pgn_retyped(), pgn_too_wide(), pgn_prefix(), pgn_scalar()")
