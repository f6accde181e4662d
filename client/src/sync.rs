//! Small synchronisation helpers shared by the whole crate.

use std::sync::{Mutex, MutexGuard};

/// Lock `m`, taking the data even when a panicking holder poisoned it: the
/// crate's locks guard plain data that stays consistent between statements.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
