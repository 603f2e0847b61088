//! The HTTP/2 connection under the generated client, one per daemon.
//!
//! Plaintext endpoints (`unix:` paths and `http://`) go through a hyper client built here rather
//! than tonic's `Channel`, because tonic's channel cannot advertise an HTTP/2 frame size: with the
//! protocol's default of 16 KiB a daemon cuts a 128³ `f32` batch into about 1,300 DATA frames,
//! each a send and a wake-up on both sides of the socket. This client advertises
//! [`MAX_FRAME_BYTES`] and receive windows of [`STREAM_WINDOW_BYTES`] /
//! [`CONNECTION_WINDOW_BYTES`], so a batch crosses in a few large frames. `https://` endpoints
//! keep tonic's channel with its TLS set-up.
//!
//! It owns connection set-up only; it must not retry calls or interpret statuses (the lanes and
//! [`crate::error`] do).

use std::path::PathBuf;

use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::{ClientTlsConfig, Endpoint, Uri};
use tower::util::BoxCloneSyncService;

use crate::error::{self, ClientError};
use crate::{ClientOptions, TlsOptions};

/// The service every generated client call goes through. Its errors are statuses (a concrete
/// type keeps the generated futures `Send` for the compiler).
pub(crate) type Transport = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>;

/// Largest HTTP/2 frame the client accepts (the protocol allows up to 16 MiB − 1).
pub const MAX_FRAME_BYTES: u32 = 1 << 20;
/// Receive window of one stream: the bytes a daemon may send ahead of the client's reading.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// Receive window of one connection (every stream to one daemon together).
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// Builds a lazily connecting transport for `endpoint` and the origin its calls are sent to:
/// plaintext for `unix:` and `http://`, TLS for `https://`; without a scheme, TLS when `tls` is
/// set.
pub(crate) fn connect(
    endpoint: &str,
    options: &ClientOptions,
    tls: Option<&ClientTlsConfig>,
) -> Result<(Transport, Uri), ClientError> {
    let invalid = |reason: String| ClientError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    if let Some(path) = endpoint.strip_prefix("unix:") {
        let path = PathBuf::from(path.trim_start_matches("//"));
        if !path.is_absolute() {
            return Err(invalid("a Unix socket path must be absolute".into()));
        }
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            Box::pin(async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            })
        });
        // The authority is not used for Unix sockets but must form a valid URI.
        let origin = Uri::from_static("http://localhost");
        return Ok((plaintext(connector), origin));
    }
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else if tls.is_some() {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    };
    let origin: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
    match origin.scheme_str() {
        Some("https") => {
            let tls = match tls {
                Some(config) => config.clone(),
                None => options.tls.load()?,
            };
            Ok((secure(&url, tls, options, endpoint)?, origin))
        }
        Some("http") => {
            if tls.is_some() {
                return Err(invalid(
                    "TLS options are set but the endpoint is not https:// (use https:// or no \
                     scheme)"
                        .into(),
                ));
            }
            if origin.host().is_none() {
                return Err(invalid("the address names no host".into()));
            }
            if options.token.is_some() && !is_loopback_url(&origin) {
                tracing::warn!(
                    %endpoint,
                    "the bearer token travels in clear text to a non-loopback address; use https://"
                );
            }
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.set_connect_timeout(Some(options.connect_timeout));
            Ok((plaintext(http), origin))
        }
        _ => Err(invalid(
            "the scheme must be http://, https:// or unix: (or none)".into(),
        )),
    }
}

/// A hyper HTTP/2 client over `connector` with large frames and windows. Failures to connect or
/// of the connection surface as UNAVAILABLE (the daemon cannot be reached), which the lanes
/// retry and fail over.
fn plaintext<C>(connector: C) -> Transport
where
    C: tower::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read
        + hyper::rt::Write
        + hyper_util::client::legacy::connect::Connection
        + Unpin
        + Send
        + 'static,
    C::Future: Send + Unpin + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client: HyperClient<C, Body> = HyperClient::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_max_frame_size(MAX_FRAME_BYTES)
        .http2_initial_stream_window_size(STREAM_WINDOW_BYTES)
        .http2_initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .build(connector);
    let service = tower::service_fn(move |request: http::Request<Body>| {
        let client = client.clone();
        async move {
            match client.request(request).await {
                Ok(response) => Ok(response.map(Body::new)),
                Err(e) => Err(Status::unavailable(format!(
                    "connection to the daemon failed: {}",
                    error::chain(&e)
                ))),
            }
        }
    });
    BoxCloneSyncService::new(service)
}

/// tonic's channel with TLS for an `https://` endpoint.
fn secure(
    url: &str,
    tls: ClientTlsConfig,
    options: &ClientOptions,
    endpoint: &str,
) -> Result<Transport, ClientError> {
    let tls_origin = |opts: &TlsOptions| {
        opts.ca.as_ref().map_or_else(
            || "the system's trusted certificates".to_owned(),
            |ca| format!("TLS CA file {}", ca.display()),
        )
    };
    let channel = Endpoint::from_shared(url.to_owned())
        .map_err(|e| ClientError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_adaptive_window(true)
        .tls_config(tls)
        .map_err(|e| ClientError::Credentials {
            origin: tls_origin(&options.tls),
            reason: error::chain(&e),
        })?
        .connect_lazy();
    Ok(BoxCloneSyncService::new(tower::ServiceExt::map_err(
        channel,
        |e: tonic::transport::Error| Status::from_error(Box::new(e)),
    )))
}

/// Whether `endpoint` is a Unix socket or a loopback address (a daemon on this host).
pub(crate) fn is_local(endpoint: &str) -> bool {
    if endpoint.starts_with("unix:") {
        return true;
    }
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    url.parse::<Uri>().is_ok_and(|uri| is_loopback_url(&uri))
}

/// Whether `uri` names this host.
fn is_loopback_url(uri: &Uri) -> bool {
    match uri.host() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback()),
        None => false,
    }
}
