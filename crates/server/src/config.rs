//! Server configuration: what to serve, where to listen, and the limits every request is held to.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::ServerError;
use crate::auth::{Secret, TlsFiles};

/// Port the daemon listens on when none is given.
pub const DEFAULT_PORT: u16 = 50051;

/// Everything [`crate::start`] needs. Plain fields, so that a command line parser can fill them.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Store folders to serve. Each path is either a store (a folder holding `manifest.json`;
    /// the dataset is named after the folder) or a folder whose sub-folders are stores. A path
    /// `s3://bucket/prefix` names the same in object storage (see
    /// [`patchflow_store::StoreLocation`]).
    pub stores: Vec<PathBuf>,
    /// TCP address to listen on (`None`: no TCP listener). Port 0 picks a free port; see
    /// [`crate::RunningServer::local_addr`].
    pub listen: Option<SocketAddr>,
    /// Unix socket path to listen on (`None`: no Unix listener). A stale socket file at that
    /// path is replaced; any other kind of file is an error.
    pub unix: Option<PathBuf>,
    /// Sampling worker threads; 0 = one per available core.
    pub workers: usize,
    /// Capacity of the chunk cache shared by every dataset, in MiB; 0 turns the cache off (every
    /// read decodes its chunks from the mapped file).
    pub cache_mb: u64,
    /// Folder of a local disk cache beneath the chunk cache, for stores in object storage:
    /// fetched chunk payloads are kept there within [`disk_cache_gb`](Self::disk_cache_gb) and
    /// survive restarts (`None`: no disk cache).
    pub disk_cache: Option<PathBuf>,
    /// Budget of the disk cache, GB (10^9 bytes).
    pub disk_cache_gb: f64,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`), or `None` for none.
    pub metrics: Option<SocketAddr>,
    /// Request limits.
    pub limits: Limits,
    /// How long a shutdown waits for open streams and connections to close before it drops them.
    pub shutdown_grace: Duration,
    /// Bearer token every RPC must carry (`authorization: Bearer <token>`), on every listener
    /// and every service (health checking and reflection included). `None`: no token needed.
    pub token: Option<Secret>,
    /// TLS for the TCP listener (`None`: plaintext). The Unix socket is always plaintext.
    pub tls: Option<TlsFiles>,
    /// Allow a TCP listener on a non-loopback address without any authentication (no token and
    /// no client certificates). Off by default: such a configuration is refused.
    pub insecure: bool,
    /// Folder for the shared-memory slots of clients on this host (`None`: shared memory is not
    /// offered). The default is `/dev/shm` where it exists. See the proto's
    /// `SharedMemoryRequest`.
    pub shared_memory: Option<PathBuf>,
    /// Most MiB of shared memory all slot files together may hold. Shared memory is not
    /// reclaimed under memory pressure like the page cache, so it is bounded for the whole
    /// daemon; beyond it, batches of shared-memory streams go inside the messages.
    pub shared_memory_mb: u64,
}

/// `/dev/shm` where this system has it.
pub fn default_shared_memory_dir() -> Option<PathBuf> {
    let dir = PathBuf::from("/dev/shm");
    dir.is_dir().then_some(dir)
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            stores: Vec::new(),
            listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT))),
            unix: None,
            workers: 0,
            cache_mb: 1024,
            disk_cache: None,
            disk_cache_gb: 10.0,
            metrics: None,
            limits: Limits::default(),
            shutdown_grace: Duration::from_secs(10),
            token: None,
            tls: None,
            insecure: false,
            shared_memory: default_shared_memory_dir(),
            shared_memory_mb: 4096,
        }
    }
}

/// Limits applied to every stream. Requests beyond them fail with `RESOURCE_EXHAUSTED` (sizes)
/// or `INVALID_ARGUMENT` (malformed values), never by degrading other streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest patch, in voxels (`z * y * x`).
    pub max_patch_voxels: u64,
    /// Largest batch, image + label bytes.
    pub max_batch_bytes: u64,
    /// Largest number of items per batch.
    pub max_batch_size: usize,
    /// Sample streams served at once; further streams are refused.
    pub max_streams: usize,
    /// Largest message the server sends; larger batches are split into parts. At least 64 KiB.
    /// The default, 16 MiB, holds a compact 128³ batch of two `i16` patches in one message, so
    /// that the client converts it without first joining parts (about 10% less CPU per patch
    /// than 4 MiB on that path); much larger messages cost the daemon a fresh mapping, page
    /// faults and an unmap per message (benches/RESULTS.md).
    pub max_message_bytes: usize,
    /// Largest credit balance a stream may hold.
    pub max_credits: u32,
    /// Sampling jobs one stream may have on the worker pool at once (fair sharing).
    pub jobs_per_stream: usize,
    /// Finished batches one stream may hold while the transport is busy.
    pub queued_batches_per_stream: usize,
    /// Shared-memory slots one stream may hold (each holds one batch; memory per stream is at
    /// most this many batches).
    pub max_shared_slots: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_patch_voxels: 256 * 256 * 256,
            max_batch_bytes: 1 << 30,
            max_batch_size: 512,
            max_streams: 256,
            max_message_bytes: 16 << 20,
            max_credits: 64,
            jobs_per_stream: 2,
            queued_batches_per_stream: 2,
            max_shared_slots: 16,
        }
    }
}

/// Smallest accepted [`Limits::max_message_bytes`]: room for a batch header and some payload.
pub const MIN_MESSAGE_BYTES: usize = 64 << 10;

impl Limits {
    /// The sampler's view of these limits.
    pub(crate) fn sampler_limits(&self) -> patchflow_sampler::Limits {
        patchflow_sampler::Limits {
            max_patch_voxels: self.max_patch_voxels,
            max_batch_bytes: self.max_batch_bytes,
            max_batch: self.max_batch_size,
        }
    }

    /// Checks that every limit is usable.
    pub(crate) fn check(&self) -> Result<(), ServerError> {
        let positive: [(&'static str, u64); 8] = [
            ("max_patch_voxels", self.max_patch_voxels),
            ("max_batch_bytes", self.max_batch_bytes),
            ("max_batch_size", self.max_batch_size as u64),
            ("max_streams", self.max_streams as u64),
            ("max_credits", u64::from(self.max_credits)),
            ("jobs_per_stream", self.jobs_per_stream as u64),
            (
                "queued_batches_per_stream",
                self.queued_batches_per_stream as u64,
            ),
            ("max_shared_slots", u64::from(self.max_shared_slots)),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ServerError::Config {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if self.max_message_bytes < MIN_MESSAGE_BYTES {
            return Err(ServerError::Config {
                field: "max_message_bytes",
                reason: format!(
                    "{} is below the minimum of {MIN_MESSAGE_BYTES} bytes",
                    self.max_message_bytes
                ),
            });
        }
        Ok(())
    }
}

impl ServerConfig {
    /// Checks the configuration before anything is opened or bound.
    pub(crate) fn check(&self) -> Result<(), ServerError> {
        if self.stores.is_empty() {
            return Err(ServerError::Config {
                field: "stores",
                reason: "no store folder given".into(),
            });
        }
        if self.disk_cache.is_some()
            && !(self.disk_cache_gb.is_finite() && self.disk_cache_gb > 0.0)
        {
            return Err(ServerError::Config {
                field: "disk_cache_gb",
                reason: format!("{} is not a positive number of GB", self.disk_cache_gb),
            });
        }
        if self.listen.is_none() && self.unix.is_none() {
            return Err(ServerError::Config {
                field: "listen",
                reason: "neither a TCP address nor a Unix socket path to listen on".into(),
            });
        }
        if let Some(address) = self.unprotected_listener()
            && !self.insecure
        {
            return Err(ServerError::Unprotected { address });
        }
        self.limits.check()
    }

    /// Whether every client of the TCP listener must present the token. Client certificates
    /// add to the token on an open address; they do not replace it.
    pub(crate) fn authenticated(&self) -> bool {
        self.token.is_some()
    }

    /// The TCP address, when it is reachable from other hosts and nothing authenticates its
    /// clients.
    pub(crate) fn unprotected_listener(&self) -> Option<SocketAddr> {
        self.listen
            .filter(|addr| !addr.ip().to_canonical().is_loopback() && !self.authenticated())
    }

    /// Number of worker threads this configuration asks for.
    pub(crate) fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_once_a_store_is_named() {
        let mut config = ServerConfig::default();
        assert!(matches!(
            config.check(),
            Err(ServerError::Config {
                field: "stores",
                ..
            })
        ));
        config.stores.push(PathBuf::from("/data/store"));
        config.check().map_err(|e| e.to_string()).unwrap();
    }

    #[test]
    fn zero_limits_are_rejected_by_name() {
        let limits = Limits {
            max_credits: 0,
            ..Limits::default()
        };
        let err = limits.check().unwrap_err();
        assert!(err.to_string().contains("max_credits"), "{err}");
        let limits = Limits {
            max_message_bytes: 1000,
            ..Limits::default()
        };
        let err = limits.check().unwrap_err();
        assert!(err.to_string().contains("max_message_bytes"), "{err}");
    }

    #[test]
    fn open_addresses_need_authentication_or_an_explicit_opt_out() {
        let mut config = ServerConfig {
            stores: vec![PathBuf::from("/data/store")],
            listen: Some("0.0.0.0:50051".parse().unwrap()),
            ..ServerConfig::default()
        };
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("0.0.0.0:50051"), "{err}");
        assert!(
            err.contains("--token-file") && err.contains("--insecure"),
            "{err}"
        );
        config.insecure = true;
        config.check().map_err(|e| e.to_string()).unwrap();
        config.insecure = false;
        config.token = Some(Secret::new("t").map_err(|e| e.to_string()).unwrap());
        config.check().map_err(|e| e.to_string()).unwrap();
        config.token = None;
        config.tls = Some(TlsFiles {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            client_ca: None,
        });
        assert!(
            config.check().is_err(),
            "TLS alone does not authenticate clients"
        );
        if let Some(tls) = &mut config.tls {
            tls.client_ca = Some("ca.pem".into());
        }
        assert!(
            config.check().is_err(),
            "client certificates add to a token, they do not replace it"
        );
        for local in [
            "127.0.0.1:0",
            "[::1]:0",
            "[::ffff:127.0.0.1]:0",
            "127.3.2.1:9",
        ] {
            let config = ServerConfig {
                stores: vec![PathBuf::from("/data/store")],
                listen: Some(local.parse().unwrap()),
                ..ServerConfig::default()
            };
            config.check().map_err(|e| e.to_string()).unwrap();
        }
        let config = ServerConfig {
            stores: vec![PathBuf::from("/data/store")],
            listen: None,
            unix: Some("/run/patchflow.sock".into()),
            ..ServerConfig::default()
        };
        config.check().map_err(|e| e.to_string()).unwrap();
    }

    #[test]
    fn no_listener_is_rejected() {
        let config = ServerConfig {
            stores: vec![PathBuf::from("/data/store")],
            listen: None,
            unix: None,
            ..ServerConfig::default()
        };
        assert!(config.check().unwrap_err().to_string().contains("listen"));
    }
}
