//! `patchflow._native`: the compiled core of the Python package `patchflow`.
//!
//! It owns the Python bindings only: conversions, the GIL, the runtime and fork safety. It must
//! not hold a rule of its own: the protocol, the sampling and the schedules stay in the crates it
//! wraps.
//!
//! PyTorch users train from Python; this module gives them the Rust client (`crates/client`)
//! and the PGPS curriculum (`crates/curriculum`) without a gRPC client of their own. It stays
//! thin: the Python layer (`python/patchflow`) holds the ergonomic API (keyword arguments,
//! numpy and torch views, the curriculum loader), this layer holds what needs Rust:
//!
//! * a tokio runtime started lazily, and again in a forked child (the parent's threads do not
//!   exist there), see [`runtime`];
//! * clients, streams and batches whose waits release the GIL;
//! * batch buffers exported through the buffer protocol without a copy ([`buffer`]);
//! * the schedule, built and queried by the curriculum crate itself ([`schedule`]).
//!
//! Objects made in one process and inherited by a forked child are never torn down in the
//! child (see [`ForkGuard`]): their background tasks lived on threads the child does not have.

mod buffer;
mod client;
mod convert;
mod errors;
mod schedule;

use std::mem::ManuallyDrop;
use std::sync::Mutex;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

/// The runtime of this process and the process it was started in.
static RUNTIME: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);

/// The tokio runtime of the current process, started on first use and again in a forked child.
///
/// A runtime is never dropped: the parent keeps its runtime for the life of the process, and a
/// child cannot shut down the parent's (its worker threads were not copied by `fork`), so the
/// child leaves it alone and starts its own.
pub(crate) fn runtime() -> PyResult<&'static Runtime> {
    let pid = std::process::id();
    let mut current = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((owner, rt)) = *current
        && owner == pid
    {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("patchflow-client")
        .enable_all()
        .build()
        .map_err(|e| {
            errors::error(
                "Internal",
                &format!("could not start the client runtime: {e}"),
                None,
            )
        })?;
    let rt: &'static Runtime = Box::leak(Box::new(rt));
    *current = Some((pid, rt));
    Ok(rt)
}

/// A value that belongs to the process that made it. Dropped there as usual; in a forked child
/// it is leaked instead, because dropping it would act on the parent's runtime (wake tasks,
/// take locks that a parent thread may have held at the fork) from a process without its
/// threads.
pub(crate) struct ForkGuard<T> {
    pid: u32,
    value: ManuallyDrop<T>,
}

impl<T> ForkGuard<T> {
    /// Wraps `value` for the current process.
    pub(crate) fn new(value: T) -> ForkGuard<T> {
        ForkGuard {
            pid: std::process::id(),
            value: ManuallyDrop::new(value),
        }
    }

    /// The value, if this is the process that made it.
    pub(crate) fn get(&self) -> Option<&T> {
        (self.pid == std::process::id()).then_some(&*self.value)
    }

    /// The value, mutably, if this is the process that made it.
    pub(crate) fn get_mut(&mut self) -> Option<&mut T> {
        (self.pid == std::process::id()).then_some(&mut *self.value)
    }

    /// The process that made the value.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The value whatever the process (read-only views of memory stay valid in a child).
    pub(crate) fn any_process(&self) -> &T {
        &self.value
    }
}

impl<T> Drop for ForkGuard<T> {
    fn drop(&mut self) {
        if self.pid == std::process::id() {
            // SAFETY: dropped once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.value) };
        }
    }
}

/// The compiled core of `patchflow` (import `patchflow`, not this module).
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::NativeClient>()?;
    m.add_class::<client::NativeStream>()?;
    m.add_class::<client::NativeBatch>()?;
    m.add_class::<buffer::NativeBuffer>()?;
    m.add_class::<schedule::NativeSchedule>()?;
    m.add_function(wrap_pyfunction!(schedule::modes, m)?)?;
    m.add_function(wrap_pyfunction!(schedule::rpss_stage, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
