//! pg_netstat's pure core: everything that counts, and nothing that needs PostgreSQL.
//! It does not depend on pgrx, so the compiler keeps the boundary and its tests build
//! and run without a server (`cargo test -p pg_netstat_core`). The extension (the
//! crate at the repository's top) is the glue: the background worker, the hooks in the
//! backends, shared memory, the SQL functions and views, the settings; it feeds this
//! core what PostgreSQL knows and publishes what the core counted.
//!
//! The rooms (docs/architecture.md draws them):
//! - `capture`: the packet sources (AF_PACKET TPACKET_V3 ring and its BPF filter;
//!   libpcap), devices, frame parsing.
//! - `device`: one captured device: its sources, state, retries, the drain into
//!   intervals and flows; `handover`: a ring replaced without losing or doubling a
//!   packet; `kernel_counters`: drops and freezes as totals that never go back.
//! - `counters`, `stats`, `history`: counts per direction, interval buckets, the rows
//!   kept per device.
//! - `flows`: the connection table in shared memory's layout, its owners, totals.
//! - `statements`: attribution of traffic to statements, the statement table, the
//!   per-backend pending charges; `tcpinfo`, `peer`: a socket's own counters, who the
//!   peer is.
//! - `savefile`: the file that keeps the counts across restarts (hostile input).
//! - `privileges`: capabilities the worker needs (Linux).

pub mod capture;
pub mod counters;
pub mod device;
pub mod flows;
pub mod handover;
pub mod history;
pub mod kernel_counters;
pub mod peer;
#[cfg(linux_native)]
pub mod privileges;
pub mod savefile;
pub mod statements;
pub mod stats;
pub mod tcpinfo;
