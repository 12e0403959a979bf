//! A connection's life: counting starts when its session has begun (`login`: after
//! authentication and every check of InitPostgres; TCP client backends only) and ends at
//! exit, with the last reading taken once nothing more goes to the client.

use super::*;

/// Called once the session has begun (`login`): a TCP client backend starts counting;
/// any other connection (Unix socket, walsender) never does. Everything received and
/// sent so far (startup, TLS, authentication, the server's first messages) is the
/// session's setup.
///
/// # Safety
/// `port` is NULL or this backend's Port (MyProcPort), which lives as long as the backend.
pub unsafe fn session_begun(port: *const pg_sys::libpq::be::Port) {
    // SAFETY: a plain read of a flag set before authentication; `port` by the caller's
    // promise, `sock` its first field in every major.
    let (walsender, sock) = unsafe { (pg_sys::am_walsender, if port.is_null() { -1 } else { (*port).sock }) };
    if sock < 0 {
        return;
    }
    let Some(sample) = tcpinfo::read(sock) else { return };
    // SAFETY: by the caller's promise.
    unsafe { open_connection(port, sock, walsender, &sample) };
    if walsender {
        return;
    }
    let mut tracker = Tracker::new();
    // SAFETY: a transaction callback, on this backend's thread.
    let on = unsafe { gucs::track_statements() };
    if on {
        tracker.authenticated(sample);
    }
    let local = Local { tracker, sock, in_statement: false, stale: !on };
    backend(|b| b.local.try_borrow_mut().map(|mut l| *l = Some(local)));
    // The exit callback is registered once, here.
    // An on_shmem_exit callback: it runs after every before_shmem_exit one, so after
    // ShutdownPostgres has ended the session's transaction and released its locks (the
    // server's FIN, which the exit sends, must not reach a client before that), and,
    // registered after InitProcess's, before ProcKill: this backend's PGPROC, and so its
    // LWLocks, are still there.
    // SAFETY: PostgreSQL's callback registration, in the backend, once per backend.
    unsafe {
        pg_sys::on_shmem_exit(Some(on_exit), pg_sys::Datum::from(0));
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

/// Takes this connection's slot in the per-connection figures, with its first reading.
///
/// # Safety
/// As `session_begun`.
unsafe fn open_connection(port: *const pg_sys::libpq::be::Port, sock: c_int, walsender: bool, sample: &Sample) {
    // SAFETY: a transaction callback, on this backend's thread.
    if !unsafe { gucs::track_statements() } {
        return;
    }
    // SAFETY: by the caller's promise.
    let Some(p) = (unsafe { owner_hooks::describe(port as *const _) }) else { return };
    let kind = if walsender { BackendKind::WalSender } else { BackendKind::Client };
    let key = AppKey {
        role: p.role,
        database: p.database,
        application: p.application,
        peer_class: peer::classify(&p.client_addr, p.ipv6) as u8,
        kind: kind as u8,
    };
    let conn = Conn {
        // SAFETY: a plain read of this process's PID.
        pid: unsafe { pg_sys::MyProcPid },
        key,
        client_addr: p.client_addr,
        ipv6: p.ipv6,
        client_port: p.client_port,
        started_us: now_us(),
        socket: Socket::from_sample(sample),
        ..Conn::default()
    };
    backend(|b| {
        let slot = stmtshm::open_slot(&b.pending, conn);
        b.conn.set(Some(ConnLocal { key, sock, slot }));
    });
    if walsender {
        // Client backends close theirs in `on_exit`, after the last statement's charge.
        // SAFETY: PostgreSQL's callback registration, in the backend, once.
        unsafe { pg_sys::before_shmem_exit(Some(on_walsender_exit), pg_sys::Datum::from(0)) };
    }
}

fn conn_local() -> Option<ConnLocal> {
    backend(|b| b.conn.get()).flatten()
}

/// The connection ends: its figures go to the totals. `last` is the final reading, if one
/// was taken (counting off: the latest in the slot stands).
fn close_connection(last: Option<Sample>) {
    let Some(c) = conn_local() else { return };
    let last = last.map(|s| Socket::from_sample(&s));
    stmtshm::write_all(|_, conns| conns.close(c.slot, &c.key, last));
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_walsender_exit(_code: c_int, _arg: pg_sys::Datum) {
    let Some(c) = conn_local() else { return };
    // SAFETY: an exit callback of this backend, on its thread.
    let last = if unsafe { gucs::track_statements() } { tcpinfo::read_final(c.sock) } else { None };
    close_connection(last);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: c_int, _arg: pg_sys::Datum) {
    let last = backend(|b| {
        let last = boundary_with(b, read_at_exit, true, |t, s| t.exit(s));
        // Counting off now, or nothing left to charge: what waits still goes to the table.
        if let Some(id) = b.conn.get().and_then(|c| c.slot) {
            stmtshm::flush_pending(&b.pending, id, |_, _| ());
        }
        last
    })
    .flatten();
    close_connection(last);
}

/// The last reading. When nothing more can go to the client (it sent Terminate or
/// closed: whereToSendOutput is no longer DestRemote), the server ends its side first,
/// as PostgreSQL would a moment later, and then waits for the client's answer:
/// PostgreSQL's TLS close (its close_notify alert, which socket_close would otherwise
/// send from an on_proc_exit callback, after this reading, when shared memory is gone),
/// then the server's FIN, then at most EXIT_WAIT for the client's FIN or reset, then the
/// reading (`tcpinfo::read_at_end`). So a client that waits for the server to close
/// before it closes (asyncpg; over TLS it answers the alert with its own) is answered at
/// once, and a client that is slow to send its last record and FIN (a busy machine) is
/// still counted to its last byte. libpq, pgJDBC and node-postgres close at once: their
/// FIN is usually in already and the wait ends at once.
/// After a FATAL error (pg_terminate_backend, a timeout) messages may still go out during
/// exit, so nothing is ended early: the reading is the socket as it is, and the TLS
/// alert is left to socket_close, uncounted.
fn read_at_exit(fd: c_int) -> Option<pg_netstat_core::statements::Sample> {
    // SAFETY: plain reads of this backend's globals; MyProcPort is valid until the
    // process ends.
    let (port, closing) = unsafe {
        let port = pg_sys::libpq::be::MyProcPort;
        (port, !port.is_null() && pg_sys::whereToSendOutput != pg_sys::CommandDest::DestRemote)
    };
    if !closing {
        return tcpinfo::read_final(fd);
    }
    // SAFETY: secure_close only ends the TLS session of this backend's Port (nothing
    // without one), and socket_close's own call is then a no-op.
    tcpinfo::read_at_end(fd, || unsafe { secure_close(port) }, EXIT_WAIT)
}

/// The longest an exiting backend waits for the client's FIN after its own (the server's
/// side is closed by then: no client waits on this). Only a client that keeps its socket
/// open after Terminate meets it; the backend keeps its process slot (and its row in
/// pg_stat_activity) meanwhile, its transaction ended and its locks released already.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

unsafe extern "C-unwind" {
    /// PostgreSQL's own end of a TLS session (SSL_shutdown, which sends the close_notify
    /// alert, then SSL_free); nothing without TLS, nothing when called again.
    #[link_name = "secure_close"]
    fn secure_close(port: *mut pg_sys::libpq::be::Port);
}
