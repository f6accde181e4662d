//! What the qmesh fuzz targets share: the allocation check.
//!
//! Every decoding target checks that no single allocation made while it
//! decodes exceeds the bound its decoder documents (see fuzz/README.md for
//! each target's bound and where it comes from). This library holds the one
//! `#[global_allocator]` of every target: the system allocator, recording
//! the largest request made while armed.
//!
//! # Layout
//!
//! - [`largest_allocation`]: run a closure armed, and return its value and
//!   the largest single allocation it made;
//! - [`check_allocation`]: the same, failing (panicking, so that libFuzzer
//!   reports a crash and keeps the input) when that allocation exceeds a
//!   bound;
//! - [`der_bound`]: the bound of the targets that parse certificates
//!   (`cert`, `client_cert`).
//!
//! The record is process-wide: an allocation made by another thread while
//! armed counts too. The targets run on one thread (libFuzzer calls them in
//! turn; `read_frame` uses a current-thread tokio runtime).
#![warn(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The system allocator, recording the largest request while armed.
struct Tracking;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn record(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on unchanged to the system allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` with the allocator armed and returns its value and the size in
/// bytes of the largest single allocation (or reallocation) made meanwhile.
///
/// Calls nest: an allocation made inside an inner call counts for the
/// outer one too.
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let outer = LARGEST.swap(0, Ordering::Relaxed);
    let was_armed = ARMED.swap(true, Ordering::Relaxed);
    let value = f();
    ARMED.store(was_armed, Ordering::Relaxed);
    let largest = LARGEST.swap(outer, Ordering::Relaxed);
    if was_armed {
        LARGEST.fetch_max(largest, Ordering::Relaxed);
    }
    (value, largest)
}

/// Runs `f` armed (see [`largest_allocation`]) and panics when a single
/// allocation made meanwhile was larger than `bound` bytes.
///
/// `what` names the call and `why` says where the bound comes from, for the
/// message: "`what` allocated N bytes at once, above its bound of B bytes
/// (`why`)". They are only formatted on failure.
pub fn check_allocation<T>(
    what: impl Display,
    bound: usize,
    why: impl Display,
    f: impl FnOnce() -> T,
) -> T {
    let (value, largest) = largest_allocation(f);
    assert!(
        largest <= bound,
        "{what} allocated {largest} bytes at once, above its bound of {bound} bytes ({why})"
    );
    value
}

/// Bytes of one allocation per byte of input that parsing a certificate
/// may take; see [`der_bound`].
pub const DER_PER_BYTE: usize = 72;

/// The fixed part of [`der_bound`].
pub const DER_FIXED: usize = 4096;

/// The largest single allocation parsing `len` bytes of certificate (DER,
/// or the PEM text holding it) may make: [`DER_PER_BYTE`] per byte plus
/// [`DER_FIXED`].
///
/// The certificate code (certs/src/pem.rs, certs/src/clientauth.rs)
/// documents no bound for parsing; `MAX_PEM_FILE` (1 MiB) only caps the
/// files it reads. So the bound is linear in the input: x509-parser keeps
/// one value per element of each list in a certificate, in a `Vec` that may
/// hold up to twice the elements it needs, and the costliest element per
/// byte is a `GeneralName` (72 bytes) of a subject alternative name, which
/// takes 2 bytes of DER (`82 00`, an empty DNS name): at most 72 bytes per
/// byte. Base64 makes PEM text longer than its DER, so the bound holds for
/// text too. The fixed part covers the small fixed allocations (a PEM
/// reader's buffer, nom's first `Vec` of four elements, rustls's state for
/// a handshake: 1.6 KiB measured).
pub fn der_bound(len: usize) -> usize {
    DER_PER_BYTE * len + DER_FIXED
}
