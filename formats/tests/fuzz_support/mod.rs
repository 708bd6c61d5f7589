//! Shared by the fuzz test binaries (bolero targets run by `cargo test` for a bounded time): an
//! allocator that refuses and reports oversized allocations, and per-target execution counts.
//!
//! Included by path from the shard and router fuzz tests too, so it depends only on std.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Largest single allocation one fuzz execution may make. Fuzz inputs are at most a few KiB, so
/// anything near this size means a count or length read from the input reached an allocation.
pub const ALLOCATION_CAP: usize = 64 << 20;

/// Allocations past this are refused outright (the process aborts naming the size) instead of
/// succeeding lazily through overcommit and hiding the bug.
const REFUSE_PAST: usize = 1 << 30;

thread_local! {
    /// Largest allocation made on this thread since the last [`largest_allocation`] reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The test binary's global allocator: the system one, with the largest request tracked per thread.
pub struct CappedAlloc;

fn note(size: usize) {
    // `try_with`: a thread being torn down has no slot left; it is not running a fuzz input.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call forwards to `System` with the caller's layout; refusing returns null, which
// the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > REFUSE_PAST {
            return std::ptr::null_mut();
        }
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > REFUSE_PAST {
            return std::ptr::null_mut();
        }
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > REFUSE_PAST {
            return std::ptr::null_mut();
        }
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// Runs `f` and panics (failing the fuzz input) if it made an allocation past [`ALLOCATION_CAP`]
/// on this thread.
pub fn within_allocation_cap<R>(f: impl FnOnce() -> R) -> R {
    LARGEST.with(|l| l.set(0));
    let out = f();
    let largest = LARGEST.with(Cell::get);
    assert!(
        largest <= ALLOCATION_CAP,
        "one allocation of {largest} bytes, past the {ALLOCATION_CAP}-byte cap"
    );
    out
}

/// How long each target runs under `cargo test` unless `BOLERO_RANDOM_TEST_TIME_MS` says otherwise.
pub const TEST_TIME: Duration = Duration::from_secs(3);

/// Counts one target's executions and prints the total when dropped (at the end of its test).
pub struct Executions {
    name: &'static str,
    count: AtomicU64,
    deep: AtomicU64,
}

impl Executions {
    pub fn new(name: &'static str) -> Self {
        Executions {
            name,
            count: AtomicU64::new(0),
            deep: AtomicU64::new(0),
        }
    }

    pub fn tick(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an execution whose input got through to the target's last step (a file that opened
    /// and was used, a tokenizer that was built), which says how deep the random inputs reach.
    pub fn reached_end(&self) {
        self.deep.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Executions {
    fn drop(&mut self) {
        let n = self.count.load(Ordering::Relaxed);
        let deep = self.deep.load(Ordering::Relaxed);
        // A panicking input fails the test before this line; reaching it means no crash.
        if !std::thread::panicking() {
            println!(
                "fuzz {}: {n} executions ({deep} reached the last step), 0 crashes",
                self.name
            );
        }
    }
}

/// Interesting values for declared counts, lengths and sizes.
pub const EXTREMES: [u64; 12] = [
    0,
    1,
    2,
    255,
    65_535,
    u32::MAX as u64,
    (u32::MAX as u64) + 1,
    1 << 40,
    1 << 60,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// One change to a seed file; a list of them turns a valid file into a near-valid one, which
/// reaches deeper checks than random bytes would.
#[derive(Debug, bolero::generator::TypeGenerator)]
pub enum Edit {
    /// Overwrite one byte (position taken modulo the length).
    Byte { at: u16, value: u8 },
    /// Overwrite 8 bytes with one of [`EXTREMES`], little-endian.
    Extreme { at: u16, which: u8 },
    /// Overwrite 4 bytes with a u32.
    Word { at: u16, value: u32 },
    /// Cut the file at this position.
    Truncate { at: u16 },
    /// Insert bytes at this position.
    Insert { at: u16, bytes: Vec<u8> },
}

/// Applies `edits` in order to `bytes`.
pub fn apply(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for edit in edits {
        let len = bytes.len();
        let pos = |at: u16| if len == 0 { 0 } else { at as usize % len };
        let overwrite = |bytes: &mut Vec<u8>, at: usize, new: &[u8]| {
            for (i, b) in new.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(at + i) {
                    *slot = *b;
                }
            }
        };
        match edit {
            Edit::Byte { at, value } => overwrite(bytes, pos(*at), &[*value]),
            Edit::Extreme { at, which } => {
                let v = EXTREMES[*which as usize % EXTREMES.len()];
                overwrite(bytes, pos(*at), &v.to_le_bytes())
            }
            Edit::Word { at, value } => overwrite(bytes, pos(*at), &value.to_le_bytes()),
            Edit::Truncate { at } => bytes.truncate(pos(*at)),
            Edit::Insert { at, bytes: new } => {
                let at = pos(*at);
                bytes.splice(at..at, new.iter().copied());
            }
        }
    }
}
