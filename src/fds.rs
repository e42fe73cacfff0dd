//! How a node spends its file descriptors: RocksDB's open files, open projection copies, idle
//! query readers and each listener's connections get a share of one budget (by default this
//! process's soft `RLIMIT_NOFILE`, which `quire serve` raises to the hard limit first). So a node
//! with 10,000 streams runs under a limit of 1,024 instead of stopping at about a hundred.

/// Descriptors one open copy is counted as holding.
pub const FDS_PER_COPY: u64 = 4;

/// Fewest open copies, however small the budget (a node needs a few to make progress at all).
pub(crate) const MIN_OPEN_COPIES: usize = 8;

/// How a node spends its file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// Open projection copies at once (half the budget, at [`FDS_PER_COPY`] each, and at most
    /// 512: each open SQLite copy also holds its page cache and statements, about 0.3 MiB).
    pub open_copies: usize,
    /// Files RocksDB keeps open (an eighth of the budget).
    pub store_files: usize,
    /// Idle readers each query service keeps (a sixty-fourth of the budget, at most 64).
    pub idle_readers: usize,
    /// Client API connections at once (an eighth of the budget), whatever
    /// `--max-api-connections` allows.
    pub api_connections: usize,
    /// Peer connections at once (a thirty-second of the budget), whatever
    /// `--max-peer-connections` allows.
    pub peer_connections: usize,
}

impl FdBudget {
    /// The shares of `fds` descriptors; what is left is for connections and everything else.
    pub fn of(fds: u64) -> FdBudget {
        FdBudget {
            open_copies: ((fds / 2 / FDS_PER_COPY) as usize).clamp(MIN_OPEN_COPIES, 512),
            store_files: ((fds / 8) as usize).clamp(32, 1024),
            idle_readers: ((fds / 64) as usize).clamp(2, 64),
            api_connections: ((fds / 8) as usize).max(8),
            peer_connections: ((fds / 32) as usize).max(4),
        }
    }

    /// The shares of this process's soft `RLIMIT_NOFILE` (`quire serve` raises it to the hard
    /// limit first).
    pub fn from_limit() -> FdBudget {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        FdBudget::of(limit.current.unwrap_or(1 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_grow_with_the_budget_within_bounds() {
        let small = FdBudget::of(1024);
        assert_eq!(small.open_copies, 128);
        assert_eq!(small.store_files, 128);
        assert_eq!(small.idle_readers, 16);
        let used = small.open_copies as u64 * FDS_PER_COPY
            + small.store_files as u64
            + 3 * small.idle_readers as u64 * 3
            + small.api_connections as u64
            + small.peer_connections as u64;
        assert!(
            used < 1000,
            "{used} of 1024 descriptors, connections included"
        );
        let tiny = FdBudget::of(16);
        assert_eq!(tiny.open_copies, MIN_OPEN_COPIES);
        let huge = FdBudget::of(1 << 20);
        assert_eq!(
            (huge.open_copies, huge.store_files, huge.idle_readers),
            (512, 1024, 64)
        );
    }
}
