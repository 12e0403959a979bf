-- The view keeps the original supabase/pg_netstat's columns, types and order exactly.
CREATE VIEW pg_netstat AS
    SELECT device, ts,
           packets_in, packets_out, packets_in_speed, packets_out_speed,
           bytes_in, bytes_out, bytes_in_speed, bytes_out_speed,
           created_at
      FROM pg_netstat_history()
     ORDER BY device, ts;

CREATE VIEW pg_netstat_intervals AS
    SELECT * FROM pg_netstat_interval_history() ORDER BY device, ts;

CREATE VIEW pg_netstat_devices AS
    SELECT * FROM pg_netstat_device_status() ORDER BY device;

COMMENT ON VIEW pg_netstat IS 'Packets and bytes in/out on the server port(s), per device and closed interval';
COMMENT ON VIEW pg_netstat_intervals IS 'Every closed interval with its own length, kernel drops and late packets';
COMMENT ON VIEW pg_netstat_devices IS 'Capture status per network device';
COMMENT ON FUNCTION pg_netstat_inject_worker_error() IS 'Makes the capture worker fail once, to check that it is restarted (superuser only)';

-- Traffic figures are monitoring data: superusers and pg_monitor, not PUBLIC.
REVOKE ALL ON FUNCTION pg_netstat_history(), pg_netstat_interval_history(),
                        pg_netstat_device_status(), pg_netstat_inject_worker_error() FROM PUBLIC;
REVOKE ALL ON pg_netstat, pg_netstat_intervals, pg_netstat_devices FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_netstat_history(), pg_netstat_interval_history(),
                          pg_netstat_device_status() TO pg_monitor;
GRANT SELECT ON pg_netstat, pg_netstat_intervals, pg_netstat_devices TO pg_monitor;
