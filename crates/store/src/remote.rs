//! The object-storage backend: case files and manifests in S3 or an S3-compatible server
//! (MinIO, Ceph, moto), through the `object_store` crate.
//!
//! Readers and writers call this layer from plain (synchronous) threads: the sampler's worker
//! pool, ingest's case threads. Requests run on a small runtime of this module's own
//! (threads `patchflow-s3`), and the calling thread waits for their result, so a read never
//! blocks the threads of an async server that happens to call it, and works the same whether
//! or not the caller is inside a runtime.
//!
//! One client per bucket, made on first use from the standard AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` or
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for S3-compatible servers, `AWS_ALLOW_HTTP=true`
//! for a plain-HTTP endpoint, and the rest that `object_store` reads), with retries and
//! exponential backoff on failed requests and a process-wide cap on requests in flight.
//! [`set_bucket_client`] puts another client in place (tests, the benchmark's latency proxy).

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::limit::LimitStore;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};

use crate::error::StoreError;
use crate::location::ObjectLocation;

/// Most requests in flight to object storage from this process, over every bucket.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 64;
/// Most range requests one box read runs at once.
pub const MAX_REQUESTS_PER_READ: usize = 8;
/// Objects larger than this are uploaded in parts (multipart upload), so that a failed part is
/// retried alone and no single request carries a whole large case.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Part size of multipart uploads (S3 needs at least 5 MiB for every part but the last).
pub const MULTIPART_PART_BYTES: usize = 8 << 20;
/// Threads of the runtime that drives object-storage requests.
const RUNTIME_THREADS: usize = 2;

/// Request and byte counts of this process's object-storage traffic.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// GET requests (whole objects and ranges).
    pub get_requests: u64,
    /// Bytes received by GET requests.
    pub get_bytes: u64,
    /// PUT requests (whole objects; a multipart upload counts once).
    pub put_requests: u64,
    /// Bytes uploaded.
    pub put_bytes: u64,
}

/// Request counters (process-wide, and per bucket client).
#[derive(Default, Debug)]
struct Counters {
    get_requests: AtomicU64,
    get_bytes: AtomicU64,
    put_requests: AtomicU64,
    put_bytes: AtomicU64,
}

impl Counters {
    fn stats(&self) -> RemoteStats {
        RemoteStats {
            get_requests: self.get_requests.load(Ordering::Relaxed),
            get_bytes: self.get_bytes.load(Ordering::Relaxed),
            put_requests: self.put_requests.load(Ordering::Relaxed),
            put_bytes: self.put_bytes.load(Ordering::Relaxed),
        }
    }
}

static TOTAL: Counters = Counters {
    get_requests: AtomicU64::new(0),
    get_bytes: AtomicU64::new(0),
    put_requests: AtomicU64::new(0),
    put_bytes: AtomicU64::new(0),
};

/// The counters of every object-storage request this process made so far.
pub fn remote_stats() -> RemoteStats {
    TOTAL.stats()
}

/// The counters of the requests made through the current client of `bucket` (since it was
/// made or set); zero when there is none yet.
pub fn bucket_stats(bucket: &str) -> RemoteStats {
    clients()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(bucket)
        .map_or_else(RemoteStats::default, |b| b.counters.stats())
}

impl RemoteStats {
    /// The counts from `earlier` to `self`.
    pub fn since(&self, earlier: &RemoteStats) -> RemoteStats {
        RemoteStats {
            get_requests: self.get_requests.saturating_sub(earlier.get_requests),
            get_bytes: self.get_bytes.saturating_sub(earlier.get_bytes),
            put_requests: self.put_requests.saturating_sub(earlier.put_requests),
            put_bytes: self.put_bytes.saturating_sub(earlier.put_bytes),
        }
    }
}

fn runtime() -> Result<&'static tokio::runtime::Runtime, StoreError> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(RUNTIME_THREADS)
                .thread_name("patchflow-s3")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| StoreError::Remote {
            location: "object storage".into(),
            reason: format!("cannot start the runtime for object-storage requests: {e}"),
        })
}

/// Runs `fut` on the object-storage runtime and waits for it on this thread.
fn run<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> Result<T, StoreError> {
    let rt = runtime()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| StoreError::Remote {
        location: "object storage".into(),
        reason: "an object-storage request was dropped before it finished".into(),
    })
}

/// Makes ring the process's TLS crypto provider when none is set yet: the HTTP client of the
/// S3 clients takes the process default. Call it before building an S3 client of your own
/// for [`set_bucket_client`]; the clients made here call it themselves.
pub fn install_crypto_provider() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}

fn clients() -> &'static Mutex<HashMap<String, Arc<Bucket>>> {
    install_crypto_provider();
    static CLIENTS: OnceLock<Mutex<HashMap<String, Arc<Bucket>>>> = OnceLock::new();
    CLIENTS.get_or_init(Default::default)
}

/// The retry policy of the clients made from the environment: up to 6 retries with
/// exponential backoff from 50 ms to 2 s, given up after 60 s.
pub fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 6,
        retry_timeout: Duration::from_secs(60),
    }
}

/// Makes `store` the client of `bucket` for every later open, read and write in this process
/// (readers opened before keep theirs). The process-wide cap on requests in flight applies.
pub fn set_bucket_client(bucket: &str, store: Arc<dyn ObjectStore>) {
    let client = Arc::new(Bucket::new(bucket, store));
    clients()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(bucket.to_owned(), client);
}

/// The client of `bucket`: the one set with [`set_bucket_client`], else one made from the
/// environment on first use.
pub(crate) fn bucket(name: &str) -> Result<Arc<Bucket>, StoreError> {
    let mut map = clients().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(b) = map.get(name) {
        return Ok(Arc::clone(b));
    }
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(name)
        .with_retry(retry_config())
        .build()
        .map_err(|e| StoreError::Remote {
            location: format!("s3://{name}"),
            reason: format!("cannot configure the S3 client from the environment: {e}"),
        })?;
    let b = Arc::new(Bucket::new(name, Arc::new(store)));
    map.insert(name.to_owned(), Arc::clone(&b));
    Ok(b)
}

/// One bucket's client.
pub(crate) struct Bucket {
    name: String,
    store: Arc<dyn ObjectStore>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket").field("name", &self.name).finish()
    }
}

/// The error of a failed request on `loc`: not-found objects keep their kind, so callers can
/// tell a missing object from a failing server.
fn request_error(loc: &ObjectLocation, e: object_store::Error) -> StoreError {
    let kind = match &e {
        object_store::Error::NotFound { .. } => std::io::ErrorKind::NotFound,
        object_store::Error::AlreadyExists { .. } => std::io::ErrorKind::AlreadyExists,
        _ => std::io::ErrorKind::Other,
    };
    StoreError::io(loc.to_path(), std::io::Error::new(kind, e))
}

fn count_get(counters: &Counters, bytes: usize) {
    for c in [&TOTAL, counters] {
        c.get_requests.fetch_add(1, Ordering::Relaxed);
        c.get_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl Bucket {
    fn new(name: &str, store: Arc<dyn ObjectStore>) -> Bucket {
        Bucket {
            name: name.to_owned(),
            store: Arc::new(LimitStore::new(store, MAX_REQUESTS_IN_FLIGHT)),
            counters: Arc::default(),
        }
    }

    fn count_get(&self, bytes: usize) {
        count_get(&self.counters, bytes);
    }

    fn count_put(&self, bytes: usize) {
        for c in [&TOTAL, &*self.counters] {
            c.put_requests.fetch_add(1, Ordering::Relaxed);
            c.put_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    fn path(loc: &ObjectLocation) -> ObjectPath {
        ObjectPath::from(loc.key.as_str())
    }

    /// The whole object, or `None` when it does not exist. Objects over `max_bytes` are
    /// refused before their body is read.
    pub(crate) fn get(
        &self,
        loc: &ObjectLocation,
        max_bytes: u64,
    ) -> Result<Option<Bytes>, StoreError> {
        let store = Arc::clone(&self.store);
        let path = Self::path(loc);
        let result = run(async move {
            let got = store.get_opts(&path, GetOptions::default()).await?;
            let size = got.meta.size;
            if size > max_bytes {
                return Ok(Err(size));
            }
            got.bytes().await.map(Ok)
        })?;
        match result {
            Ok(Ok(bytes)) => {
                self.count_get(bytes.len());
                Ok(Some(bytes))
            }
            Ok(Err(size)) => {
                self.count_get(0);
                Err(StoreError::corrupt(
                    loc.to_path(),
                    format!("object is {size} bytes, more than the {max_bytes}-byte limit"),
                ))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(request_error(loc, e)),
        }
    }

    /// The first `len` bytes of the object (fewer when it is shorter) and its size.
    pub(crate) fn get_head(
        &self,
        loc: &ObjectLocation,
        len: u64,
    ) -> Result<(Bytes, u64), StoreError> {
        let store = Arc::clone(&self.store);
        let path = Self::path(loc);
        let result = run(async move {
            let options = GetOptions {
                range: Some(GetRange::Bounded(0..len)),
                ..GetOptions::default()
            };
            let got = store.get_opts(&path, options).await?;
            let size = got.meta.size;
            Ok::<_, object_store::Error>((got.bytes().await?, size))
        })?;
        match result {
            Ok((bytes, size)) => {
                self.count_get(bytes.len());
                Ok((bytes, size))
            }
            Err(e) => Err(request_error(loc, e)),
        }
    }

    /// The byte ranges of the object, each fetched with one ranged GET, at most
    /// [`MAX_REQUESTS_PER_READ`] at once; results in the order of `ranges`.
    pub(crate) fn get_ranges(
        &self,
        loc: &ObjectLocation,
        ranges: Vec<Range<u64>>,
    ) -> Result<Vec<Bytes>, StoreError> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let store = Arc::clone(&self.store);
        let counters = Arc::clone(&self.counters);
        let path = Self::path(loc);
        let result = run(async move {
            futures_util::stream::iter(ranges.into_iter().map(|r| {
                let store = Arc::clone(&store);
                let counters = Arc::clone(&counters);
                let path = path.clone();
                async move {
                    let want = r.end - r.start;
                    let bytes = store.get_range(&path, r.clone()).await?;
                    count_get(&counters, bytes.len());
                    if bytes.len() as u64 != want {
                        return Err(object_store::Error::Generic {
                            store: "S3",
                            source: format!(
                                "range {}..{} returned {} bytes, expected {want}",
                                r.start,
                                r.end,
                                bytes.len()
                            )
                            .into(),
                        });
                    }
                    Ok(bytes)
                }
            }))
            .buffered(MAX_REQUESTS_PER_READ)
            .try_collect::<Vec<Bytes>>()
            .await
        })?;
        result.map_err(|e| request_error(loc, e))
    }

    /// Writes the object whole: it appears complete or not at all. Large objects go up in
    /// parts ([`MULTIPART_THRESHOLD`]); a failed upload is aborted.
    pub(crate) fn put(&self, loc: &ObjectLocation, bytes: Bytes) -> Result<(), StoreError> {
        let store = Arc::clone(&self.store);
        let path = Self::path(loc);
        let len = bytes.len();
        let result = run(async move {
            if len <= MULTIPART_THRESHOLD {
                return store.put(&path, PutPayload::from(bytes)).await.map(drop);
            }
            let upload = store.put_multipart(&path).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART_BYTES);
            for part in bytes.chunks(MULTIPART_PART_BYTES) {
                writer.wait_for_capacity(MAX_REQUESTS_PER_READ).await?;
                writer.write(part);
            }
            writer.finish().await.map(drop)
        })?;
        result.map_err(|e| request_error(loc, e))?;
        self.count_put(len);
        Ok(())
    }

    /// Writes the object only if it does not exist yet (a conditional PUT); `false` when it
    /// exists.
    pub(crate) fn put_new(&self, loc: &ObjectLocation, bytes: Bytes) -> Result<bool, StoreError> {
        let store = Arc::clone(&self.store);
        let path = Self::path(loc);
        let len = bytes.len();
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match run(async move {
            store
                .put_opts(&path, PutPayload::from(bytes), options)
                .await
        })? {
            Ok(_) => {
                self.count_put(len);
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(request_error(loc, e)),
        }
    }

    /// Deletes the object (no error when it does not exist).
    pub(crate) fn delete(&self, loc: &ObjectLocation) -> Result<(), StoreError> {
        let store = Arc::clone(&self.store);
        let path = Self::path(loc);
        match run(async move { store.delete(&path).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(request_error(loc, e)),
        }
    }

    /// The "folders" directly under `loc` (common prefixes of a delimited listing).
    pub(crate) fn list_folders(
        &self,
        loc: &ObjectLocation,
    ) -> Result<Vec<ObjectLocation>, StoreError> {
        let store = Arc::clone(&self.store);
        let prefix = (!loc.key.is_empty()).then(|| Self::path(loc));
        let listed = run(async move { store.list_with_delimiter(prefix.as_ref()).await })?
            .map_err(|e| request_error(loc, e))?;
        let mut out: Vec<ObjectLocation> = listed
            .common_prefixes
            .iter()
            .map(|p| ObjectLocation {
                bucket: self.name.clone(),
                key: p.as_ref().to_owned(),
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Keys and sizes of every object under `loc` (recursively).
    pub(crate) fn list_objects(
        &self,
        loc: &ObjectLocation,
    ) -> Result<Vec<(ObjectLocation, u64)>, StoreError> {
        let store = Arc::clone(&self.store);
        let prefix = (!loc.key.is_empty()).then(|| Self::path(loc));
        let listed = run(async move {
            store
                .list(prefix.as_ref())
                .map_ok(|m| (m.location.as_ref().to_owned(), m.size))
                .try_collect::<Vec<_>>()
                .await
        })?
        .map_err(|e| request_error(loc, e))?;
        Ok(listed
            .into_iter()
            .map(|(key, size)| {
                (
                    ObjectLocation {
                        bucket: self.name.clone(),
                        key,
                    },
                    size,
                )
            })
            .collect())
    }
}

/// Writes `bytes` as the object at `loc`, whole (see [`Bucket::put`]).
pub fn put_object(loc: &ObjectLocation, bytes: Vec<u8>) -> Result<(), StoreError> {
    bucket(&loc.bucket)?.put(loc, Bytes::from(bytes))
}

/// The object at `loc`, or `None` when there is none (at most `max_bytes`).
pub fn get_object(loc: &ObjectLocation, max_bytes: u64) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(bucket(&loc.bucket)?
        .get(loc, max_bytes)?
        .map(|b| b.to_vec()))
}

/// Deletes the object at `loc` (nothing happens when there is none).
pub fn delete_object(loc: &ObjectLocation) -> Result<(), StoreError> {
    bucket(&loc.bucket)?.delete(loc)
}

/// The "folders" directly under `loc`, sorted.
pub fn list_folders(loc: &ObjectLocation) -> Result<Vec<ObjectLocation>, StoreError> {
    bucket(&loc.bucket)?.list_folders(loc)
}

/// Every object under `loc` with its size in bytes.
pub fn list_objects(loc: &ObjectLocation) -> Result<Vec<(ObjectLocation, u64)>, StoreError> {
    bucket(&loc.bucket)?.list_objects(loc)
}

/// An object that marks a store as being written, made with a conditional PUT so that only one
/// writer holds it; deleted when dropped. Unlike a local file lock it outlives a writer that is
/// killed: [`ObjectLock::acquire`] then reports who held it, and the user removes it.
#[derive(Debug)]
pub struct ObjectLock {
    loc: ObjectLocation,
    bucket: Arc<Bucket>,
}

impl ObjectLock {
    /// Creates the lock object at `loc` holding `holder` (who and when, for the message a
    /// second writer gets). `Ok(Err(text))` when it exists, with the holder it names.
    pub fn acquire(
        loc: &ObjectLocation,
        holder: &str,
    ) -> Result<Result<ObjectLock, String>, StoreError> {
        let bucket = bucket(&loc.bucket)?;
        if bucket.put_new(loc, Bytes::from(holder.as_bytes().to_vec()))? {
            return Ok(Ok(ObjectLock {
                loc: loc.clone(),
                bucket,
            }));
        }
        let held_by = bucket
            .get(loc, 4096)?
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .unwrap_or_default();
        Ok(Err(held_by))
    }
}

impl Drop for ObjectLock {
    fn drop(&mut self) {
        if let Err(e) = self.bucket.delete(&self.loc) {
            tracing::warn!(lock = %self.loc, error = %e, "could not remove the lock object");
        }
    }
}
