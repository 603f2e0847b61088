//! `patchflow serve`: the daemon's arguments and the [`ServerConfig`] they resolve to.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use patchflow_server::{Secret, ServerConfig, TlsFiles};

/// `patchflow serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Store folders (each a dataset named after its folder), or folders of stores; local
    /// paths or `s3://bucket/prefix` (credentials, region and endpoint from the AWS_*
    /// environment variables).
    #[arg(required = true)]
    pub stores: Vec<PathBuf>,
    /// TCP address to listen on, HOST:PORT (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Also (or, with --no-tcp, only) listen on this Unix socket, for trainers on this host.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Do not listen on TCP (requires --unix).
    #[arg(long, requires = "unix")]
    pub no_tcp: bool,
    /// Sampling worker threads [default: number of cores].
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Chunk cache capacity in MiB, shared by every dataset (0: no cache, every read decodes).
    #[arg(long, default_value_t = 1024)]
    pub cache_mb: u64,
    /// Keep chunks fetched from object storage in this local folder too, so that a restarted
    /// daemon reads them from there (bounded by --disk-cache-gb).
    #[arg(long, value_name = "DIR")]
    pub disk_cache: Option<PathBuf>,
    /// Budget of --disk-cache in GB.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10.0,
        requires = "disk_cache"
    )]
    pub disk_cache_gb: f64,
    /// Serve Prometheus text metrics on HOST:PORT (GET /metrics).
    #[arg(long)]
    pub metrics: Option<String>,
    /// Largest patch in voxels (z*y*x).
    #[arg(long)]
    pub max_patch_voxels: Option<u64>,
    /// Largest batch in bytes (image + label).
    #[arg(long)]
    pub max_batch_bytes: Option<u64>,
    /// Most sample streams served at once.
    #[arg(long)]
    pub max_streams: Option<usize>,
    /// Largest message sent, bytes; larger batches go out in several parts (at least 65536).
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// File holding the bearer token every client must send (one trailing line break is
    /// ignored). The token can also be given in the PATCHFLOW_TOKEN environment variable (kept
    /// off the command line, where other users of the host could read it), not both.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Serve TLS on the TCP listener with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require TCP clients to present a certificate signed by this CA (PEM); needs --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Allow listening on a non-loopback address without a token.
    /// Anyone who reaches the address can then read every served dataset.
    #[arg(long)]
    pub insecure: bool,
    /// Folder for the shared-memory slots of clients on this host (default: /dev/shm). Clients
    /// on this host then get batches without a byte on the socket.
    #[arg(long, value_name = "DIR", conflicts_with = "no_shared_memory")]
    pub shm_dir: Option<PathBuf>,
    /// Do not offer shared memory: every batch travels inside the messages.
    #[arg(long)]
    pub no_shared_memory: bool,
    /// Most shared-memory slots (batches) one stream may hold.
    #[arg(long)]
    pub max_shared_slots: Option<u32>,
    /// Most MiB of shared memory all streams together may hold; beyond it, batches go inside
    /// the messages.
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub shm_mb: u64,
}

impl TryFrom<ServeArgs> for ServerConfig {
    type Error = anyhow::Error;

    /// Resolves the addresses, reads the token (file or environment) and applies the limits
    /// given; the daemon checks the result when it starts.
    fn try_from(a: ServeArgs) -> Result<ServerConfig> {
        let token = Secret::from_file_or_env(a.token_file.as_deref())?;
        let tls = match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: a.tls_client_ca,
            }),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together"),
        };
        let mut config = ServerConfig {
            stores: a.stores,
            listen: if a.no_tcp {
                None
            } else {
                Some(resolve("--listen", &a.listen)?)
            },
            unix: a.unix,
            workers: a.workers,
            cache_mb: a.cache_mb,
            disk_cache: a.disk_cache,
            disk_cache_gb: a.disk_cache_gb,
            metrics: a
                .metrics
                .as_deref()
                .map(|m| resolve("--metrics", m))
                .transpose()?,
            token,
            tls,
            insecure: a.insecure,
            shared_memory: if a.no_shared_memory {
                None
            } else {
                a.shm_dir
                    .or_else(patchflow_server::default_shared_memory_dir)
            },
            shared_memory_mb: a.shm_mb,
            ..Default::default()
        };
        let limits = &mut config.limits;
        if let Some(v) = a.max_shared_slots {
            limits.max_shared_slots = v;
        }
        if let Some(v) = a.max_patch_voxels {
            limits.max_patch_voxels = v;
        }
        if let Some(v) = a.max_batch_bytes {
            limits.max_batch_bytes = v;
        }
        if let Some(v) = a.max_streams {
            limits.max_streams = v;
        }
        if let Some(v) = a.max_message_bytes {
            limits.max_message_bytes = v;
        }
        Ok(config)
    }
}

/// Resolves HOST:PORT (a name or an address) to one socket address.
fn resolve(what: &str, addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("{what} {addr:?}: expected HOST:PORT"))?
        .next()
        .with_context(|| format!("{what} {addr:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn config(args: &[&str]) -> Result<ServerConfig> {
        let wrap = Wrap::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))?;
        ServerConfig::try_from(wrap.serve)
    }

    #[test]
    fn arguments_resolve_to_the_server_configuration() {
        let c = config(&[
            "/data/a",
            "/data/b",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:9464",
            "--max-streams",
            "3",
            "--max-message-bytes",
            "65536",
            "--no-shared-memory",
        ])
        .unwrap();
        assert_eq!(
            c.stores,
            [PathBuf::from("/data/a"), PathBuf::from("/data/b")]
        );
        assert_eq!(c.listen, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.limits.max_streams, 3);
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert_eq!(
            c.limits.max_patch_voxels,
            patchflow_server::Limits::default().max_patch_voxels
        );
        assert!(c.shared_memory.is_none());
        let c = config(&["/s", "--unix", "/run/p.sock", "--no-tcp"]).unwrap();
        assert_eq!(
            (c.listen, c.unix),
            (None, Some(PathBuf::from("/run/p.sock")))
        );
        assert!(config(&["/s", "--listen", "no port"]).is_err());
        assert!(
            config(&["/s", "--no-tcp"]).is_err(),
            "--no-tcp needs --unix"
        );
    }
}
