//! How deep the executor and utility processing are nested in a backend, so that only
//! top-level statements are boundaries (as pg_stat_statements counts them). The hooks
//! that count levels must let PostgreSQL's errors pass through untouched (no Rust
//! unwinding, which would re-raise them without their cursor position, message id and
//! more), so an error skips their "leave". The level is put right where PostgreSQL
//! cleans up after an error: at the abort of a subtransaction (a PL/pgSQL EXCEPTION
//! block) back to what it was when the subtransaction began, at the end of the
//! top-level transaction back to zero.

#[derive(Debug, Default)]
pub struct Nesting {
    level: i32,
    /// (subtransaction id, level when it began), innermost last.
    subs: Vec<(u32, i32)>,
}

impl Nesting {
    /// Level 0, no subtransaction (const: a backend's state is built at compile time).
    pub const fn new() -> Self {
        Nesting { level: 0, subs: Vec::new() }
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    pub fn enter(&mut self) {
        self.level += 1;
    }

    pub fn leave(&mut self) {
        self.level = (self.level - 1).max(0);
    }

    pub fn sub_start(&mut self, id: u32) {
        self.subs.push((id, self.level));
    }

    pub fn sub_commit(&mut self, id: u32) {
        if let Some(i) = self.subs.iter().rposition(|(s, _)| *s == id) {
            self.subs.truncate(i);
        }
    }

    pub fn sub_abort(&mut self, id: u32) {
        if let Some(i) = self.subs.iter().rposition(|(s, _)| *s == id) {
            self.level = self.subs[i].1;
            self.subs.truncate(i);
        }
    }

    /// The top-level transaction ended (committed or aborted): no statement runs.
    pub fn xact_end(&mut self) {
        self.level = 0;
        self.subs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_caught_in_a_subtransaction_restores_the_level() {
        let mut n = Nesting::default();
        n.enter(); // a function runs at level 1
        n.sub_start(2); // its EXCEPTION block
        n.enter();
        n.enter(); // an error two levels down skips both leaves
        n.sub_abort(2);
        assert_eq!(n.level(), 1);
        n.leave();
        assert_eq!(n.level(), 0);
    }

    #[test]
    fn nested_subtransactions_and_the_end_of_the_transaction() {
        let mut n = Nesting::default();
        n.enter();
        n.sub_start(2);
        n.enter();
        n.sub_start(3);
        n.enter();
        n.sub_commit(3);
        n.leave();
        n.sub_abort(2); // the outer one fails later
        assert_eq!(n.level(), 1);
        n.enter(); // an error at top level skips the leave
        n.xact_end();
        assert_eq!(n.level(), 0);
        n.leave(); // never below zero
        assert_eq!(n.level(), 0);
    }
}
