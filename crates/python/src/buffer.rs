//! A batch buffer handed to Python through the buffer protocol, so that numpy (and through it
//! torch) views the bytes the client received, or the daemon's shared-memory slot, in place.
//!
//! The exporter owns a [`Bytes`] handle: every view made from it keeps it alive, and with it
//! the slot, which goes back to the daemon when the last handle is gone.

use std::ffi::{c_int, c_void};

use bytes::Bytes;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::ForkGuard;

/// Read-only bytes of one batch buffer (image or label), exported without a copy.
#[pyclass(frozen, module = "patchflow._native")]
pub(crate) struct NativeBuffer {
    bytes: ForkGuard<Bytes>,
}

impl NativeBuffer {
    /// An exporter of `bytes`.
    pub(crate) fn new(bytes: Bytes) -> NativeBuffer {
        NativeBuffer {
            bytes: ForkGuard::new(bytes),
        }
    }
}

/// The buffer format of unsigned bytes.
static FORMAT: &[u8; 2] = b"B\0";

#[pymethods]
impl NativeBuffer {
    /// Exports the bytes as a one-dimensional read-only buffer of unsigned bytes.
    ///
    /// # Safety
    /// Called by Python with a valid `Py_buffer` to fill. The memory lives as long as `slf`,
    /// whose reference the view holds (`obj`), and is never written while a view exists: it is
    /// either the client's own copy or a slot the daemon writes only after every handle to it
    /// was dropped.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("no buffer to fill"));
        }
        if (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err(
                "patchflow batch buffers are read-only (copy them to write)",
            ));
        }
        let data: &[u8] = slf.get().bytes.any_process();
        let (ptr, len) = (data.as_ptr(), data.len());
        // SAFETY: `view` is non-null and points to a Py_buffer Python gave us to fill; every
        // pointer stored in it outlives the view: `obj` is a new reference to `slf`, `buf`
        // points into the bytes `slf` owns, `shape` and `strides` point into the view itself,
        // and `format` is static.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr as *mut c_void;
            (*view).len = len as isize;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT {
                FORMAT.as_ptr() as *mut std::ffi::c_char
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND {
                &mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    /// Nothing to free: the format string is static and the view holds a reference to `self`.
    ///
    /// # Safety
    /// Called by Python once per filled view.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    /// Length in bytes.
    fn __len__(&self) -> usize {
        self.bytes.any_process().len()
    }

    /// Address of the first byte (for checks that the memory is the daemon's slot).
    #[getter]
    fn address(&self) -> usize {
        self.bytes.any_process().as_ptr() as usize
    }
}
