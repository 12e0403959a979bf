//! What the caller may see of other roles' connections and statements: the rule of
//! pg_stat_activity and pg_stat_statements. A superuser, or a member of
//! pg_read_all_stats (pg_monitor is one), sees everything; anyone else sees everything
//! of the sessions of roles whose privileges they have (their own), and of the others
//! only what those views show of them: the role, the database, the PID, the application
//! name (pg_stat_activity shows it to all), the traffic; not the client's address and
//! port, nor the query id. A connection
//! that never became a session (a refused or failed login) belongs to no role: its
//! claimed names and its address are for the privileged only. Applied in the functions
//! themselves, so a role that may call them directly sees no more than through a view.

use pg_netstat_core::flows::NAME_LEN;
use pgrx::pg_sys;
use std::collections::HashMap;
use std::ffi::CString;

pub(super) struct Viewer {
    all: bool,
    me: pg_sys::Oid,
    /// Role names looked up so far (a name is looked up once per call).
    names: HashMap<[u8; NAME_LEN], bool>,
}

impl Viewer {
    /// The current user's view; called in an SQL function, inside a transaction.
    pub fn current() -> Viewer {
        // SAFETY: plain reads of this backend's current user and the catalog, inside
        // the transaction the calling SQL function runs in; pgrx raises their errors.
        let (me, all) = unsafe {
            let me = pg_sys::GetUserId();
            let stats = pg_sys::Oid::from(pg_sys::ROLE_PG_READ_ALL_STATS);
            (me, pg_sys::superuser() || pg_sys::has_privs_of_role(me, stats))
        };
        Viewer { all, me, names: HashMap::new() }
    }

    /// Whether every row shows in full.
    pub fn sees_all(&self) -> bool {
        self.all
    }

    /// Whether the sessions of the role with this OID show in full.
    pub fn sees_role(&self, role: u32) -> bool {
        // SAFETY: a catalog lookup inside the calling function's transaction.
        self.all || (role != 0 && unsafe { pg_sys::has_privs_of_role(self.me, pg_sys::Oid::from(role)) })
    }

    /// Whether the sessions of the role of this name show in full (a name of no role:
    /// no).
    pub fn sees_role_named(&mut self, name: &[u8; NAME_LEN]) -> bool {
        if self.all {
            return true;
        }
        if name[0] == 0 {
            return false;
        }
        if let Some(&seen) = self.names.get(name) {
            return seen;
        }
        let end = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        let seen = CString::new(&name[..end]).is_ok_and(|c| {
            // SAFETY: a C string that outlives the call; missing_ok: no error for a
            // name that is no role (any more).
            let role = unsafe { pg_sys::get_role_oid(c.as_ptr(), true) };
            role != pg_sys::InvalidOid && self.sees_role(u32::from(role))
        });
        self.names.insert(*name, seen);
        seen
    }
}
