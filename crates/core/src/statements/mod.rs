//! Network bytes per statement, from each backend's own socket counters (issue 14), free
//! of PostgreSQL: what a backend does with its counter readings (`attrib`) and the
//! bounded table in shared memory they end up in (`table`). The glue is in
//! the extension's `stmt_hooks/` (hooks, getsockopt) and `stmtshm.rs` (the region).

pub mod attrib;
pub mod conns;
pub mod nesting;
pub mod pending;
pub mod seqcell;
pub mod table;

pub use attrib::{Charge, Charges, Figures, Sample, Target, Tracker};
pub use table::{Entry, Header, Kind, StatementTable, StmtKey};
