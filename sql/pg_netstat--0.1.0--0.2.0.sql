-- pg_netstat 0.1.0 -> 0.2.0: traffic per connection, role and database with TCP health;
-- TCP health per device and interval; pg_netstat_reset().
-- The result of `ALTER EXTENSION pg_netstat UPDATE` must equal a fresh 0.2.0 install
-- (tests/e2e/test_package.py compares functions, views, comments and privileges).
-- Restart the server after installing the 0.2.0 library and before running this: the
-- library is preloaded, so a running server keeps the old one. Run under the old
-- library, this script stops at the first new function with `could not find function
-- "pg_netstat_flows_wrapper"` and changes nothing (tried; docs/install.md).
\echo Use "ALTER EXTENSION pg_netstat UPDATE TO '0.2.0'" to load this file. \quit

-- pg_netstat_interval_history() gains the TCP health columns. A function's result type
-- cannot be changed in place, and dropping it would take the view over it along, with
-- the grants a user gave on that view (issue 29). So the new function is made under a
-- temporary name, the view is replaced in place over it (the old columns come first,
-- unchanged, so CREATE OR REPLACE VIEW may add the new ones after them: the view keeps
-- its privileges), the old function is dropped and the new one takes its name. A view
-- of your own on top of pg_netstat_intervals is kept too; it goes on showing the
-- columns it was made with.
CREATE FUNCTION pg_netstat_interval_history_0_2_0() RETURNS TABLE (
	"device" TEXT,
	"ts" timestamp with time zone,
	"interval_seconds" INT,
	"packets_in" bigint,
	"packets_out" bigint,
	"bytes_in" bigint,
	"bytes_out" bigint,
	"kernel_drops" bigint,
	"late_packets" bigint,
	"created_at" timestamp with time zone,
	"connection_attempts" bigint,
	"resets_in" bigint,
	"resets_out" bigint,
	"retransmits_in" bigint,
	"retransmits_out" bigint,
	"zero_windows_in" bigint,
	"zero_windows_out" bigint,
	"out_of_order_in" bigint,
	"out_of_order_out" bigint
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_interval_history_wrapper';
CREATE OR REPLACE VIEW pg_netstat_intervals AS
    SELECT * FROM pg_netstat_interval_history_0_2_0() ORDER BY device, ts;
DROP FUNCTION pg_netstat_interval_history();
ALTER FUNCTION pg_netstat_interval_history_0_2_0() RENAME TO pg_netstat_interval_history;
-- Once more under the function's own name (the view's text names what it selects from).
CREATE OR REPLACE VIEW pg_netstat_intervals AS
    SELECT * FROM pg_netstat_interval_history() ORDER BY device, ts;
COMMENT ON VIEW pg_netstat_intervals IS 'Every closed interval with its own length, kernel drops, late packets and TCP health';

-- The connection table and the totals folded from it.
CREATE FUNCTION pg_netstat_flows() RETURNS TABLE (
	"device" TEXT,
	"client_addr" TEXT,
	"client_port" INT,
	"server_addr" TEXT,
	"server_port" INT,
	"pid" INT,
	"role" TEXT,
	"database" TEXT,
	"auth" TEXT,
	"packets_in" bigint,
	"packets_out" bigint,
	"bytes_in" bigint,
	"bytes_out" bigint,
	"interval_start" timestamp with time zone,
	"interval_packets_in" bigint,
	"interval_packets_out" bigint,
	"interval_bytes_in" bigint,
	"interval_bytes_out" bigint,
	"fins_in" bigint,
	"fins_out" bigint,
	"resets_in" bigint,
	"resets_out" bigint,
	"retransmits_in" bigint,
	"retransmits_out" bigint,
	"zero_windows_in" bigint,
	"zero_windows_out" bigint,
	"out_of_order_in" bigint,
	"out_of_order_out" bigint,
	"state" TEXT,
	"first_seen" timestamp with time zone,
	"last_seen" timestamp with time zone,
	"closed_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_flows_wrapper';
CREATE FUNCTION pg_netstat_totals("kind" TEXT) RETURNS TABLE (
	"name" TEXT,
	"connections" bigint,
	"packets_in" bigint,
	"packets_out" bigint,
	"bytes_in" bigint,
	"bytes_out" bigint,
	"connection_attempts" bigint,
	"resets_in" bigint,
	"resets_out" bigint,
	"retransmits_in" bigint,
	"retransmits_out" bigint,
	"zero_windows" bigint,
	"stats_reset" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_totals_wrapper';
CREATE FUNCTION pg_netstat_flow_table_status() RETURNS TABLE (
	"max_flows" INT,
	"flows" INT,
	"evictions" bigint,
	"folded" bigint,
	"owner_overflow" bigint,
	"stats_reset" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_flow_table_status_wrapper';
CREATE FUNCTION pg_netstat_reset() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_reset_wrapper';

-- What the connection views read besides pg_netstat_flows() (issue 14).
CREATE FUNCTION pg_netstat_flow_owners() RETURNS TABLE (
	"device" TEXT,
	"client_addr" TEXT,
	"client_port" INT,
	"server_addr" TEXT,
	"server_port" INT,
	"application" TEXT,
	"backend_type" TEXT,
	"peer_class" TEXT
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_flow_owners_wrapper';
CREATE FUNCTION pg_netstat_egress_totals() RETURNS TABLE (
	"peer_class" TEXT,
	"backend_type" TEXT,
	"connections" bigint,
	"packets_in" bigint,
	"packets_out" bigint,
	"bytes_in" bigint,
	"bytes_out" bigint,
	"retransmits_in" bigint,
	"retransmits_out" bigint,
	"stats_reset" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_egress_totals_wrapper';
CREATE FUNCTION pg_netstat_backend_connections() RETURNS TABLE (
	"pid" INT,
	"client_addr" TEXT,
	"client_port" INT,
	"role" TEXT,
	"database" TEXT,
	"application" TEXT,
	"backend_type" TEXT,
	"peer_class" TEXT,
	"bytes_in" bigint,
	"bytes_out" bigint,
	"segments_in" bigint,
	"segments_out" bigint,
	"retransmits" bigint,
	"rtt_ms" double precision,
	"backend_start" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_backend_connections_wrapper';
CREATE FUNCTION pg_netstat_application_totals() RETURNS TABLE (
	"role" TEXT,
	"database" TEXT,
	"application" TEXT,
	"peer_class" TEXT,
	"backend_type" TEXT,
	"connections" bigint,
	"bytes_in" bigint,
	"bytes_out" bigint,
	"segments_in" bigint,
	"segments_out" bigint,
	"retransmits" bigint,
	"stats_reset" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_application_totals_wrapper';

CREATE VIEW pg_netstat_connections AS
    SELECT coalesce(a.pid, f.pid, b.pid) AS pid,
           coalesce(a.usename::text, f.role, b.role) AS usename,
           coalesce(a.datname::text, f.database, b.database) AS datname,
           coalesce(a.application_name, o.application, b.application) AS application_name,
           coalesce(a.backend_type, o.backend_type, b.backend_type) AS backend_type,
           f.auth,
           coalesce(f.client_addr, b.client_addr)::inet AS client_addr,
           coalesce(f.client_port, b.client_port) AS client_port,
           f.server_addr::inet AS server_addr,
           f.server_port,
           f.device,
           f.state,
           f.packets_in, f.packets_out, f.bytes_in, f.bytes_out,
           f.interval_start,
           f.interval_packets_in, f.interval_packets_out,
           f.interval_bytes_in, f.interval_bytes_out,
           f.retransmits_in, f.retransmits_out,
           f.resets_in, f.resets_out,
           f.fins_in, f.fins_out,
           f.zero_windows_in, f.zero_windows_out,
           f.out_of_order_in, f.out_of_order_out,
           f.first_seen, f.last_seen, f.closed_at,
           coalesce(o.peer_class, b.peer_class) AS peer_class,
           b.bytes_in AS socket_bytes_in, b.bytes_out AS socket_bytes_out,
           b.segments_in AS socket_segments_in, b.segments_out AS socket_segments_out,
           b.retransmits AS socket_retransmits, b.rtt_ms AS socket_rtt_ms
      FROM pg_netstat_flows() f
      LEFT JOIN pg_netstat_flow_owners() o
        ON o.device = f.device AND o.client_addr = f.client_addr AND o.client_port = f.client_port
       AND o.server_addr = f.server_addr AND o.server_port = f.server_port
      -- The backend's own socket counters: the same connection on whichever device it
      -- was captured, or alone when nothing was captured (no CAP_NET_RAW).
      -- Address and port are NULL on both sides for a connection the caller may not see
      -- in full (another role's, without pg_read_all_stats): then the PID alone matches.
      FULL JOIN pg_netstat_backend_connections() b
        ON b.pid = f.pid AND b.client_port IS NOT DISTINCT FROM f.client_port
       AND b.client_addr IS NOT DISTINCT FROM f.client_addr
      LEFT JOIN pg_stat_activity a
        ON a.pid = coalesce(f.pid, b.pid) AND a.client_port IS NOT DISTINCT FROM coalesce(f.client_port, b.client_port)
     ORDER BY coalesce(f.bytes_in + f.bytes_out, b.bytes_in + b.bytes_out) DESC, f.first_seen;

CREATE VIEW pg_netstat_roles AS
    SELECT name AS role, connections, packets_in, packets_out, bytes_in, bytes_out,
           connection_attempts, resets_in, resets_out, retransmits_in, retransmits_out,
           zero_windows, stats_reset
      FROM pg_netstat_totals('role') ORDER BY bytes_in + bytes_out DESC;

CREATE VIEW pg_netstat_databases AS
    SELECT name AS database, connections, packets_in, packets_out, bytes_in, bytes_out,
           connection_attempts, resets_in, resets_out, retransmits_in, retransmits_out,
           zero_windows, stats_reset
      FROM pg_netstat_totals('database') ORDER BY bytes_in + bytes_out DESC;

CREATE VIEW pg_netstat_unauthenticated AS
    SELECT connections, packets_in, packets_out, bytes_in, bytes_out,
           connection_attempts, resets_in, resets_out, retransmits_in, retransmits_out,
           zero_windows, stats_reset
      FROM pg_netstat_totals('unauthenticated');

CREATE VIEW pg_netstat_flow_table AS
    SELECT * FROM pg_netstat_flow_table_status();

COMMENT ON VIEW pg_netstat_connections IS 'Traffic and TCP health per connection, joined to pg_stat_activity';
COMMENT ON VIEW pg_netstat_roles IS 'Cumulative traffic per role since pg_netstat_reset(), ended connections included';
COMMENT ON VIEW pg_netstat_databases IS 'Cumulative traffic per database since pg_netstat_reset(), ended connections included';
COMMENT ON VIEW pg_netstat_unauthenticated IS 'Cumulative traffic of connections whose login failed or was refused, under no name';
COMMENT ON VIEW pg_netstat_flow_table IS 'Size and use of the connection table (pg_netstat.max_flows)';
COMMENT ON FUNCTION pg_netstat_reset() IS 'Restarts the cumulative figures (roles, databases, statements, device totals) from zero';

-- The same privileges as a fresh install: pg_monitor reads, PUBLIC does not,
-- pg_netstat_reset() stays with superusers.
REVOKE ALL ON FUNCTION pg_netstat_interval_history(), pg_netstat_flows(), pg_netstat_totals(text),
                        pg_netstat_flow_table_status(), pg_netstat_reset() FROM PUBLIC;
REVOKE ALL ON pg_netstat_intervals, pg_netstat_connections, pg_netstat_roles,
              pg_netstat_databases, pg_netstat_unauthenticated, pg_netstat_flow_table FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_netstat_interval_history(), pg_netstat_flows(), pg_netstat_totals(text),
                          pg_netstat_flow_table_status() TO pg_monitor;
GRANT SELECT ON pg_netstat_intervals, pg_netstat_connections, pg_netstat_roles,
                pg_netstat_databases, pg_netstat_unauthenticated, pg_netstat_flow_table TO pg_monitor;

-- Statements (the library's functions, as a fresh install defines them).
CREATE FUNCTION pg_netstat_statement_stats() RETURNS TABLE (
	"kind" TEXT,
	"userid" bigint,
	"dbid" bigint,
	"queryid" bigint,
	"calls" bigint,
	"bytes_in" bigint,
	"bytes_out" bigint,
	"segments_in" bigint,
	"segments_out" bigint,
	"retransmits" bigint,
	"mean_rtt_ms" double precision,
	"max_rtt_ms" double precision,
	"first_seen" timestamp with time zone,
	"last_seen" timestamp with time zone,
	"stats_reset" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_statement_stats_wrapper';
CREATE FUNCTION pg_netstat_statement_table_status() RETURNS TABLE (
	"max_statements" INT,
	"statements" INT,
	"evictions" bigint,
	"overflow_charges" bigint,
	"stats_reset" timestamp with time zone,
	"connection_slots" INT,
	"connections" INT,
	"slot_overflow" bigint,
	"application_rows" INT,
	"application_overflow" bigint
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_netstat_statement_table_status_wrapper';

-- Network bytes per statement (issue 14): from each backend's own TCP counters, no
-- capture. The query text comes from pg_stat_statements when it is installed in this
-- database (same key: role, database, query id); NULL otherwise.
CREATE FUNCTION pg_netstat_statement_texts() RETURNS TABLE (userid oid, dbid oid, queryid bigint, query text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    nsp name;
BEGIN
    SELECT n.nspname INTO nsp
      FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'pg_stat_statements';
    IF nsp IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT userid, dbid, queryid, query FROM %I.pg_stat_statements WHERE toplevel', nsp);
EXCEPTION
    -- Installed in the database but not preloaded, or a version without "toplevel".
    WHEN object_not_in_prerequisite_state OR undefined_column THEN
        RETURN;
END
$$;

CREATE VIEW pg_netstat_statements AS
    SELECT r.rolname::text AS role,
           d.datname::text AS database,
           s.kind,
           s.queryid,
           t.query,
           s.calls,
           s.bytes_in, s.bytes_out,
           s.segments_in, s.segments_out,
           s.retransmits,
           s.mean_rtt_ms, s.max_rtt_ms,
           s.first_seen, s.last_seen,
           s.userid::oid AS userid,
           s.dbid::oid AS dbid,
           s.stats_reset
      FROM pg_netstat_statement_stats() s
      LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.userid::oid
      LEFT JOIN pg_catalog.pg_database d ON d.oid = s.dbid::oid
      LEFT JOIN pg_netstat_statement_texts() t
        ON t.userid = s.userid::oid AND t.dbid = s.dbid::oid AND t.queryid = s.queryid
     ORDER BY s.bytes_in + s.bytes_out DESC, s.first_seen;

CREATE VIEW pg_netstat_statement_table AS
    SELECT * FROM pg_netstat_statement_table_status();

COMMENT ON VIEW pg_netstat_statements IS 'Network bytes and TCP figures per top-level statement (role, database, query id), from each backend''s own socket';
COMMENT ON VIEW pg_netstat_statement_table IS 'Size and use of the statement table (pg_netstat.max_statements)';
REVOKE ALL ON FUNCTION pg_netstat_statement_stats(), pg_netstat_statement_table_status(),
                        pg_netstat_statement_texts() FROM PUBLIC;
REVOKE ALL ON pg_netstat_statements, pg_netstat_statement_table FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_netstat_statement_stats(), pg_netstat_statement_table_status(),
                          pg_netstat_statement_texts() TO pg_monitor;
GRANT SELECT ON pg_netstat_statements, pg_netstat_statement_table TO pg_monitor;

-- Per-connection figures from the backends themselves, their totals per role, database
-- and application, and the egress summary (issue 14): the socket_* figures need no
-- capture (TCP payload bytes, from each backend's own tcp_info).
CREATE VIEW pg_netstat_applications AS
    SELECT role, database, application,
           sum(connections)::bigint AS connections,
           sum(bytes_in)::bigint AS bytes_in, sum(bytes_out)::bigint AS bytes_out,
           sum(segments_in)::bigint AS segments_in, sum(segments_out)::bigint AS segments_out,
           sum(retransmits)::bigint AS retransmits,
           max(stats_reset) AS stats_reset
      FROM pg_netstat_application_totals()
     GROUP BY role, database, application
     ORDER BY sum(bytes_out) DESC, role, database, application;

CREATE VIEW pg_netstat_egress AS
    SELECT coalesce(c.peer_class, s.peer_class) AS peer_class,
           coalesce(c.backend_type, s.backend_type) AS backend_type,
           c.connections, c.bytes_out, c.bytes_in, c.packets_out, c.packets_in,
           c.retransmits_out, c.retransmits_in,
           s.connections AS socket_connections,
           s.bytes_out AS socket_bytes_out, s.bytes_in AS socket_bytes_in,
           coalesce(c.stats_reset, s.stats_reset) AS stats_reset
      FROM pg_netstat_egress_totals() c
      FULL JOIN (SELECT peer_class, backend_type,
                        sum(connections)::bigint AS connections,
                        sum(bytes_out)::bigint AS bytes_out, sum(bytes_in)::bigint AS bytes_in,
                        max(stats_reset) AS stats_reset
                   FROM pg_netstat_application_totals()
                  GROUP BY peer_class, backend_type) s
        ON coalesce(s.peer_class, '') = c.peer_class
       AND coalesce(s.backend_type, '') = coalesce(c.backend_type, '')
     ORDER BY coalesce(c.bytes_out, s.bytes_out) DESC NULLS LAST;

COMMENT ON VIEW pg_netstat_applications IS 'Network bytes per role, database and application name, from each backend''s own socket (no capture), ended connections included';
COMMENT ON VIEW pg_netstat_egress IS 'Bytes out and in per class of client address (loopback, private, link-local, public) and backend type: captured, and from the backends'' own sockets';
REVOKE ALL ON FUNCTION pg_netstat_flow_owners(), pg_netstat_egress_totals(), pg_netstat_backend_connections(),
                        pg_netstat_application_totals() FROM PUBLIC;
REVOKE ALL ON pg_netstat_applications, pg_netstat_egress FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_netstat_flow_owners(), pg_netstat_egress_totals(), pg_netstat_backend_connections(),
                          pg_netstat_application_totals() TO pg_monitor;
GRANT SELECT ON pg_netstat_applications, pg_netstat_egress TO pg_monitor;
