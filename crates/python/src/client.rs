//! Clients, streams and batches for Python: the Rust client driven from a process-wide tokio
//! runtime, with the GIL released while waiting, and every object tied to the process that
//! made it (a forked child connects again instead of sharing the parent's sockets).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use patchflow_client::{
    Batch, BatchStream, Client, ClientError, ClientOptions, ImageDtype, LabelDtype, Secret,
    SharedMemory, TlsOptions,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::buffer::NativeBuffer;
use crate::errors::{client_error, error, invalid};
use crate::{ForkGuard, convert, runtime};

/// How long a wait for a batch runs before Python gets a chance to handle signals (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(200);

/// Locks `m`, recovering from a panic of another holder (the data stays consistent: every
/// critical section below replaces values whole).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection to one or several daemons. Connects on first use, in each process.
#[pyclass(frozen, module = "patchflow._native")]
pub(crate) struct NativeClient {
    endpoints: Vec<String>,
    options: ClientOptions,
    /// Connected clients of this process, by prefetch depth.
    connected: Mutex<HashMap<u32, ForkGuard<Client>>>,
}

impl NativeClient {
    /// The connected client with `prefetch` batches read ahead per daemon, connecting (with
    /// the GIL released) if this process has none yet.
    fn client(&self, py: Python<'_>, prefetch: Option<u32>) -> PyResult<Client> {
        let rt = runtime()?;
        let prefetch = prefetch.unwrap_or(self.options.prefetch);
        let result = py.detach(|| {
            let mut connected = lock(&self.connected);
            if let Some(client) = connected.get(&prefetch).and_then(ForkGuard::get) {
                return Ok(client.clone());
            }
            let options = ClientOptions {
                prefetch,
                ..self.options.clone()
            };
            let client = rt.block_on(Client::connect(self.endpoints.iter(), options))?;
            // A client inherited from the parent process is left to leak (see ForkGuard).
            connected.insert(prefetch, ForkGuard::new(client.clone()));
            Ok::<Client, ClientError>(client)
        });
        result.map_err(|e| client_error(&e))
    }
}

#[pymethods]
impl NativeClient {
    #[new]
    #[pyo3(signature = (endpoints, token=None, token_file=None, tls_ca=None, tls_cert=None,
        tls_key=None, tls_domain=None, shared_memory="auto", prefetch=4, held_batches=4,
        max_attempts=10, connect_timeout=10.0, compact=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        endpoints: Vec<String>,
        token: Option<String>,
        token_file: Option<PathBuf>,
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_domain: Option<String>,
        shared_memory: &str,
        prefetch: u32,
        held_batches: u32,
        max_attempts: u32,
        connect_timeout: f64,
        compact: bool,
    ) -> PyResult<NativeClient> {
        if endpoints.is_empty() {
            return Err(invalid("endpoints", "no endpoint given"));
        }
        let token = match (token, token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid("token", "give token or token_file, not both"));
            }
            (Some(t), None) => {
                Some(Secret::new(t).map_err(|e| client_error(&ClientError::from(e)))?)
            }
            (None, Some(path)) => {
                Some(Secret::from_file(&path).map_err(|e| client_error(&ClientError::from(e)))?)
            }
            (None, None) => None,
        };
        let shared_memory = match shared_memory {
            "auto" => SharedMemory::Auto,
            "on" => SharedMemory::On,
            "off" => SharedMemory::Off,
            other => {
                return Err(invalid(
                    "shared_memory",
                    format!("{other:?} is not 'auto', 'on' or 'off'"),
                ));
            }
        };
        if prefetch == 0 {
            return Err(invalid("prefetch", "must be at least 1"));
        }
        if !(connect_timeout.is_finite() && connect_timeout > 0.0) {
            return Err(invalid(
                "connect_timeout",
                format!("{connect_timeout} is not a positive number of seconds"),
            ));
        }
        let tls = TlsOptions {
            ca: tls_ca,
            cert: tls_cert,
            key: tls_key,
            domain: tls_domain,
        };
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(invalid(
                "tls_cert",
                "a client certificate needs both tls_cert and tls_key",
            ));
        }
        let options = ClientOptions {
            prefetch,
            held_batches,
            max_attempts,
            connect_timeout: Duration::from_secs_f64(connect_timeout),
            token,
            tls,
            shared_memory,
            compact,
            ..ClientOptions::default()
        };
        Ok(NativeClient {
            endpoints,
            options,
            connected: Mutex::new(HashMap::new()),
        })
    }

    /// The endpoints, in the order batches are spread over them.
    #[getter]
    fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    /// Connects now (otherwise the first call does).
    fn connect(&self, py: Python<'_>) -> PyResult<()> {
        self.client(py, None).map(|_| ())
    }

    /// The limits each daemon announced, in endpoint order.
    fn limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let client = self.client(py, None)?;
        let list = PyList::empty(py);
        for l in client.limits() {
            list.append(convert::limits(py, l)?)?;
        }
        Ok(list)
    }

    /// `ListDatasets` of the first daemon: `{"datasets": [...], "limits": {...}}`.
    fn list_datasets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let client = self.client(py, None)?;
        let rt = runtime()?;
        let listing = py
            .detach(|| rt.block_on(client.list_datasets()))
            .map_err(|e| client_error(&e))?;
        convert::listing(py, &listing)
    }

    /// `DescribeDataset` of the first daemon, as a dict.
    fn describe<'py>(&self, py: Python<'py>, dataset: String) -> PyResult<Bound<'py, PyDict>> {
        let client = self.client(py, None)?;
        let rt = runtime()?;
        let description = py
            .detach(|| rt.block_on(client.describe(&dataset)))
            .map_err(|e| client_error(&e))?;
        convert::description(py, &description)
    }

    /// Opens a stream of the batches `start, start + stride, ...` with `config` (the keyword
    /// arguments of `Client.stream`).
    #[pyo3(signature = (config, start=0, stride=1, prefetch=None))]
    fn stream(
        &self,
        py: Python<'_>,
        config: &Bound<'_, PyDict>,
        start: u64,
        stride: u64,
        prefetch: Option<u32>,
    ) -> PyResult<NativeStream> {
        let config = convert::stream_config(config)?;
        if stride == 0 {
            return Err(invalid("index_stride", "must be at least 1"));
        }
        if prefetch == Some(0) {
            return Err(invalid("prefetch", "must be at least 1"));
        }
        let client = self.client(py, prefetch)?;
        let rt = runtime()?;
        let stream = py
            .detach(|| rt.block_on(client.stream_strided(config, start, stride)))
            .map_err(|e| client_error(&e))?;
        Ok(NativeStream {
            stream: Mutex::new(Some(ForkGuard::new(stream))),
        })
    }
}

/// What one wait for a batch ended with.
enum Step {
    Batch(Box<Batch>),
    Failed(ClientError),
    /// Nothing yet: let Python handle signals, then wait again.
    Wait,
    Closed,
    /// The stream belongs to this process's parent.
    Forked(u32),
}

/// An ordered, endless stream of batches.
#[pyclass(frozen, module = "patchflow._native")]
pub(crate) struct NativeStream {
    stream: Mutex<Option<ForkGuard<BatchStream>>>,
}

impl NativeStream {
    /// Runs `f` on the stream of this process, or raises why there is none.
    fn with<T>(&self, f: impl FnOnce(&mut BatchStream) -> PyResult<T>) -> PyResult<T> {
        let mut guard = lock(&self.stream);
        match guard.as_mut() {
            None => Err(closed()),
            Some(g) => {
                let pid = g.pid();
                match g.get_mut() {
                    Some(stream) => f(stream),
                    None => Err(forked(pid)),
                }
            }
        }
    }
}

fn closed() -> PyErr {
    error("FailedPrecondition", "the stream is closed", None)
}

fn forked(pid: u32) -> PyErr {
    error(
        "FailedPrecondition",
        &format!(
            "this stream was opened in process {pid} and cannot be used in process {} (a \
             forked child): open a new stream there (its client reconnects by itself)",
            std::process::id()
        ),
        None,
    )
}

#[pymethods]
impl NativeStream {
    /// The next batch, in index order; waits with the GIL released.
    fn next(&self, py: Python<'_>) -> PyResult<NativeBatch> {
        // Fast path: a batch already read ahead is taken without entering the runtime or
        // releasing the GIL (one poll; `next` is cancel-safe, so a pending poll loses nothing).
        if let Ok(mut guard) = self.stream.try_lock()
            && let Some(stream) = guard.as_mut().and_then(ForkGuard::get_mut)
        {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let next = std::pin::pin!(stream.next());
            match next.poll(&mut cx) {
                std::task::Poll::Ready(Ok(batch)) => return Ok(NativeBatch::new(batch)),
                std::task::Poll::Ready(Err(e)) => return Err(client_error(&e)),
                std::task::Poll::Pending => {}
            }
        }
        let rt = runtime()?;
        loop {
            let step = py.detach(|| {
                let mut guard = lock(&self.stream);
                let Some(g) = guard.as_mut() else {
                    return Step::Closed;
                };
                let pid = g.pid();
                let Some(stream) = g.get_mut() else {
                    return Step::Forked(pid);
                };
                // `next` is cancel-safe: a timed-out wait loses nothing.
                match rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK, stream.next()).await })
                {
                    Ok(Ok(batch)) => Step::Batch(Box::new(batch)),
                    Ok(Err(e)) => Step::Failed(e),
                    Err(_) => Step::Wait,
                }
            });
            match step {
                Step::Batch(batch) => return Ok(NativeBatch::new(*batch)),
                Step::Failed(e) => return Err(client_error(&e)),
                Step::Wait => py.check_signals()?,
                Step::Closed => return Err(closed()),
                Step::Forked(pid) => return Err(forked(pid)),
            }
        }
    }

    /// Applies `config` (the keyword arguments of `Client.stream`) from the next batch on.
    fn reconfigure(&self, config: &Bound<'_, PyDict>) -> PyResult<()> {
        let config = convert::stream_config(config)?;
        self.with(|s| s.reconfigure(config).map_err(|e| client_error(&e)))
    }

    /// Index of the batch the next call to `next` returns.
    #[getter]
    fn next_index(&self) -> PyResult<u64> {
        self.with(|s| Ok(s.next_index()))
    }

    /// Distance between the indices of consecutive batches.
    #[getter]
    fn index_stride(&self) -> PyResult<u64> {
        self.with(|s| Ok(s.index_stride()))
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.stream).is_none()
    }

    /// Ends the daemons' streams. Batches already handed out stay valid.
    fn close(&self, py: Python<'_>) {
        let stream = lock(&self.stream).take();
        // Dropping aborts the connection tasks; done without the GIL (it may wait for a lock
        // of the runtime).
        py.detach(move || drop(stream));
    }
}

fn dtype_name(d: ImageDtype) -> &'static str {
    match d {
        ImageDtype::F32 => "f32",
        ImageDtype::F16 => "f16",
        ImageDtype::Bf16 => "bf16",
        ImageDtype::Unspecified => "unspecified",
    }
}

fn label_dtype_name(d: LabelDtype) -> &'static str {
    match d {
        LabelDtype::U8 => "u8",
        LabelDtype::U16 => "u16",
        LabelDtype::Unspecified => "unspecified",
    }
}

/// One batch as received: its shapes, element types, items and the two buffers.
#[pyclass(frozen, module = "patchflow._native")]
pub(crate) struct NativeBatch {
    index: u64,
    patch: [usize; 3],
    batch_size: usize,
    channels: usize,
    dtype: ImageDtype,
    label_dtype: LabelDtype,
    ignore_label: u16,
    items: Vec<patchflow_client::Item>,
    image: ForkGuard<Bytes>,
    label: ForkGuard<Bytes>,
}

impl NativeBatch {
    fn new(b: Batch) -> NativeBatch {
        NativeBatch {
            index: b.index,
            patch: b.patch,
            batch_size: b.batch_size,
            channels: b.channels,
            dtype: b.dtype,
            label_dtype: b.label_dtype,
            ignore_label: b.ignore_label,
            items: b.items,
            image: ForkGuard::new(b.image),
            label: ForkGuard::new(b.label),
        }
    }
}

#[pymethods]
impl NativeBatch {
    /// Index of the batch in the stream's sequence.
    #[getter]
    fn index(&self) -> u64 {
        self.index
    }

    /// Patch size `(z, y, x)`.
    #[getter]
    fn patch(&self) -> (usize, usize, usize) {
        (self.patch[0], self.patch[1], self.patch[2])
    }

    /// Items in the batch (B).
    #[getter]
    fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Image channels (C).
    #[getter]
    fn channels(&self) -> usize {
        self.channels
    }

    /// Image element type: `f32`, `f16` or `bf16`.
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.dtype)
    }

    /// Label element type: `u8` or `u16`.
    #[getter]
    fn label_dtype(&self) -> &'static str {
        label_dtype_name(self.label_dtype)
    }

    /// Label value of padded voxels.
    #[getter]
    fn ignore_label(&self) -> u16 {
        self.ignore_label
    }

    /// The image bytes, `[B, C, Z, Y, X]` row-major, little-endian.
    fn image_buffer(&self) -> NativeBuffer {
        NativeBuffer::new(self.image.any_process().clone())
    }

    /// The label bytes, `[B, 1, Z, Y, X]` row-major, little-endian.
    fn label_buffer(&self) -> NativeBuffer {
        NativeBuffer::new(self.label.any_process().clone())
    }

    /// Per item: `case`, `case_index`, `origin`, `forced_foreground`, `class_value`,
    /// `augmentation` (JSON text or None).
    #[getter]
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for item in &self.items {
            let d = PyDict::new(py);
            d.set_item("case", &item.case_id)?;
            d.set_item("case_index", item.case_index)?;
            d.set_item("origin", (item.origin[0], item.origin[1], item.origin[2]))?;
            d.set_item("forced_foreground", item.forced_foreground)?;
            d.set_item("class_value", item.class)?;
            d.set_item("augmentation", item.augment_json.as_deref())?;
            list.append(d)?;
        }
        Ok(list)
    }
}
