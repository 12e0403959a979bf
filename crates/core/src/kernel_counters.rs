//! A device's kernel drops and ring freezes as running totals that never go back, free of
//! PostgreSQL. Each capture source (a ring, a libpcap handle) reports its own running
//! totals from zero; a device has many sources over its life (rebuilt on a settings
//! change, re-opened after a fault, carried over from a worker that restarted). This
//! turns those reports into deltas, charged once, and into totals that only
//! pg_netstat_reset() may restart.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// What sources already replaced (or an earlier worker) reported.
    retired_drops: u64,
    retired_freezes: u64,
    /// The current source's running totals when last observed.
    seen_drops: u64,
    seen_freezes: u64,
}

impl KernelCounters {
    /// Starts from totals published by an earlier worker for the same device.
    pub fn carried_over(drops: u64, freezes: u64) -> KernelCounters {
        KernelCounters { retired_drops: drops, retired_freezes: freezes, ..KernelCounters::default() }
    }

    /// The current source now reports these running totals; returns the drops not yet
    /// charged. Asking twice with the same figures charges nothing the second time.
    pub fn observe(&mut self, drops: u64, freezes: u64) -> u64 {
        let new = drops.saturating_sub(self.seen_drops);
        self.seen_drops = self.seen_drops.max(drops);
        self.seen_freezes = self.seen_freezes.max(freezes);
        new
    }

    /// The current source is gone or replaced; the next one reports from zero. Call it
    /// only when that is so: a source kept after a failed replacement goes on reporting
    /// its old running totals.
    pub fn source_replaced(&mut self) {
        self.retired_drops += std::mem::take(&mut self.seen_drops);
        self.retired_freezes += std::mem::take(&mut self.seen_freezes);
    }

    pub fn drops(&self) -> u64 {
        self.retired_drops + self.seen_drops
    }

    pub fn freezes(&self) -> u64 {
        self.retired_freezes + self.seen_freezes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_drop_is_charged_once_across_sources() {
        let mut k = KernelCounters::default();
        assert_eq!(k.observe(5, 1), 5);
        assert_eq!(k.observe(5, 1), 0, "the same report again charges nothing");
        assert_eq!(k.observe(8, 2), 3);
        k.source_replaced();
        assert_eq!(k.observe(2, 0), 2, "a new source counts from zero");
        assert_eq!((k.drops(), k.freezes()), (10, 2));
    }

    #[test]
    fn a_source_kept_after_a_failed_replacement_is_not_charged_twice() {
        // The worker once zeroed what it had seen of a ring before trying to replace it,
        // then kept that same ring when the new one failed to open: its next report was
        // charged again and the device total counted those drops twice.
        let mut k = KernelCounters::default();
        assert_eq!(k.observe(100, 0), 100);
        // Replacement failed: nothing to call; the same ring reports again.
        assert_eq!(k.observe(100, 0), 0);
        assert_eq!(k.observe(101, 0), 1);
        assert_eq!(k.drops(), 101);
    }

    #[test]
    fn totals_carry_over_to_a_new_worker_and_never_go_back() {
        let mut k = KernelCounters::carried_over(40, 3);
        assert_eq!((k.drops(), k.freezes()), (40, 3));
        assert_eq!(k.observe(1, 1), 1);
        k.source_replaced();
        assert_eq!(k.observe(4, 0), 4);
        assert_eq!((k.drops(), k.freezes()), (45, 4));
    }
}
