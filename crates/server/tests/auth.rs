//! Access control: the bearer token on every RPC and listener, TLS with a private CA and with
//! client certificates, and the refusal to listen openly without authentication.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Fixture, client_options, config, metrics_text, within};
use patchflow_client::{Client, ClientError, ClientOptions, Secret, StreamConfig, TlsOptions};
use patchflow_proto::v1 as pb;
use patchflow_server::{Limits, RunningServer, ServerConfig, ServerError, TlsFiles};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

const TOKEN: &str = "pf-test-token_0123456789";

fn server_token() -> patchflow_server::Secret {
    patchflow_server::Secret::new(TOKEN).unwrap()
}

/// A request carrying `token` as a bearer token, when given.
fn request<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Every kind of RPC the server offers, with `token`; returns the status of each failure.
async fn every_rpc(channel: Channel, token: Option<&str>, dataset: &str) -> Vec<(String, Code)> {
    let mut out = Vec::new();
    let mut raw = pb::patchflow_client::PatchflowClient::new(channel.clone());
    let mut record = |what: &str, result: Result<(), tonic::Status>| {
        out.push((
            what.to_owned(),
            result.map_or_else(|s| s.code(), |()| Code::Ok),
        ));
    };
    let r = raw
        .list_datasets(request(pb::ListDatasetsRequest {}, token))
        .await;
    record("ListDatasets", r.map(drop));
    let r = raw
        .describe_dataset(request(
            pb::DescribeDatasetRequest {
                dataset: dataset.to_owned(),
            },
            token,
        ))
        .await;
    record("DescribeDataset", r.map(drop));
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(pb::SampleRequest {
        config: Some(pb::SampleConfig {
            dataset: dataset.to_owned(),
            patch_size: vec![4, 4, 4],
            batch_size: 1,
            ..Default::default()
        }),
        credits: 1,
        ..Default::default()
    })
    .unwrap();
    let r = raw
        .sample(request(UnboundedReceiverStream::new(rx), token))
        .await;
    let r = match r {
        Ok(response) => within("first batch", response.into_inner().message())
            .await
            .map(drop),
        Err(status) => Err(status),
    };
    drop(tx);
    record("Sample", r);
    let r = HealthClient::new(channel.clone())
        .check(request(HealthCheckRequest::default(), token))
        .await;
    record("health Check", r.map(drop));
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    })
    .unwrap();
    let r = ServerReflectionClient::new(channel)
        .server_reflection_info(request(UnboundedReceiverStream::new(rx), token))
        .await;
    let r = match r {
        Ok(response) => within("reflection answer", response.into_inner().message())
            .await
            .map(drop),
        Err(status) => Err(status),
    };
    drop(tx);
    record("reflection", r);
    out
}

fn codes(results: &[(String, Code)]) -> Vec<Code> {
    results.iter().map(|(_, c)| *c).collect()
}

/// Streams one batch through the Rust client and checks every voxel of it.
async fn stream_one(fx: &Fixture, endpoint: &str, options: ClientOptions) {
    let client = within("connect", Client::connect([endpoint], options))
        .await
        .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"));
    let mut stream = client
        .stream(StreamConfig::new(&fx.name, [5, 4, 6], 2))
        .await
        .unwrap();
    let batch = within("batch", stream.next()).await.unwrap();
    assert_eq!(batch.index, 0);
    fx.check_batch(&batch, [5, 4, 6], 2);
}

fn with_token(token: &str) -> ClientOptions {
    ClientOptions {
        token: Some(Secret::new(token).unwrap()),
        ..client_options()
    }
}

/// Options that give up at once on a daemon that stays unreachable.
fn impatient(options: ClientOptions) -> ClientOptions {
    ClientOptions {
        max_attempts: 1,
        initial_backoff: Duration::from_millis(1),
        ..options
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_needs_the_token_on_tcp_and_unix_sockets() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("patchflow.sock");
    let mut cfg = config(vec![fx.store.clone()], 1, Limits::default());
    cfg.unix = Some(socket.clone());
    cfg.token = Some(server_token());
    assert!(
        !format!("{cfg:?}").contains(TOKEN),
        "the token is never printed"
    );
    let server = patchflow_server::start(cfg).await.unwrap();
    let endpoint = server.endpoint().unwrap();
    let channel = Channel::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let all_refused = vec![Code::Unauthenticated; 5];
    let missing = every_rpc(channel.clone(), None, &fx.name).await;
    assert_eq!(codes(&missing), all_refused, "{missing:?}");
    let wrong = every_rpc(channel.clone(), Some("pf-test-token_012345678"), &fx.name).await;
    assert_eq!(codes(&wrong), all_refused, "{wrong:?}");
    let right = every_rpc(channel.clone(), Some(TOKEN), &fx.name).await;
    assert_eq!(codes(&right), vec![Code::Ok; 5], "{right:?}");
    assert_eq!(server.metrics().auth_refused, 10);

    // Messages explain the refusal and never repeat what was sent.
    let mut raw = pb::patchflow_client::PatchflowClient::new(channel);
    let status = raw
        .list_datasets(request(pb::ListDatasetsRequest {}, Some("guess-123")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("invalid bearer token"),
        "{status:?}"
    );
    assert!(!status.message().contains("guess-123"), "{status:?}");
    let status = raw
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .unwrap_err();
    assert!(
        status.message().contains("authorization: Bearer"),
        "{status:?}"
    );

    // The Rust client: refused without or with a wrong token (no retries), served with it.
    for options in [client_options(), with_token("not-the-token")] {
        let err = within("refused connect", Client::connect([&endpoint], options))
            .await
            .err()
            .expect("refused");
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    }
    stream_one(&fx, &endpoint, with_token(TOKEN)).await;

    // The Unix socket is plaintext but holds clients to the same token.
    let unix = format!("unix:{}", socket.display());
    let err = within(
        "refused connect",
        Client::connect([&unix], client_options()),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    stream_one(&fx, &unix, with_token(TOKEN)).await;

    let text = metrics_text(&server).await;
    let refused = server.metrics().auth_refused;
    assert_eq!(refused, 15);
    assert!(
        text.contains(&format!("patchflow_auth_refused_total {refused}\n")),
        "{text}"
    );
    server.shutdown().await.unwrap();
}

/// A CA, a server certificate for `patchflow.test` and a client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();

        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "patchflow test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, stem: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, stem);
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            write(
                &format!("{stem}.pem"),
                params.signed_by(&key, &issuer).unwrap().pem(),
            );
            write(&format!("{stem}.key"), key.serialize_pem());
        };
        leaf(
            vec!["patchflow.test".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(
            vec!["trainer.patchflow.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_files(&self, client_ca: bool) -> TlsFiles {
        TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: client_ca.then(|| self.path("ca.pem")),
        }
    }

    /// Client TLS options: trust the CA, check the name `patchflow.test`.
    fn trusting(&self) -> TlsOptions {
        TlsOptions {
            ca: Some(self.path("ca.pem")),
            domain: Some("patchflow.test".into()),
            ..TlsOptions::default()
        }
    }
}

fn tls_options(tls: TlsOptions) -> ClientOptions {
    ClientOptions {
        tls,
        ..client_options()
    }
}

async fn tls_server(fx: &Fixture, files: TlsFiles) -> RunningServer {
    let mut cfg = config(vec![fx.store.clone()], 1, Limits::default());
    cfg.tls = Some(files);
    patchflow_server::start(cfg).await.unwrap()
}

/// Connecting with `options` fails with an error (not a hang); returns it.
async fn refused(endpoint: &str, options: ClientOptions) -> ClientError {
    within(
        "a refused TLS connection",
        Client::connect([endpoint], impatient(options)),
    )
    .await
    .err()
    .expect("the connection is refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let fx = Fixture::new();
    let pki = Pki::new();
    let server = tls_server(&fx, pki.server_files(false)).await;
    let endpoint = server.endpoint().unwrap();
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");

    stream_one(&fx, &endpoint, tls_options(pki.trusting())).await;
    // Without a scheme, TLS options mean TLS.
    let bare = endpoint.trim_start_matches("https://").to_owned();
    stream_one(&fx, &bare, tls_options(pki.trusting())).await;

    // Not trusting the CA (system roots only), or checking the wrong name: refused.
    let err = refused(
        &endpoint,
        tls_options(TlsOptions {
            domain: Some("patchflow.test".into()),
            ..TlsOptions::default()
        }),
    )
    .await;
    // Certificate failures are final at once (no retries), with a hint at the fix. (A host
    // without any system roots fails before connecting, naming them.)
    match &err {
        ClientError::Tls { .. } => {
            assert!(err.to_string().contains(&endpoint), "{err}");
            assert!(err.to_string().contains("--tls-ca"), "{err}");
        }
        ClientError::Credentials { .. } => {
            assert!(err.to_string().contains("system"), "{err}");
        }
        other => panic!("unexpected error {other}"),
    }
    let err = refused(
        &endpoint,
        tls_options(TlsOptions {
            domain: None,
            ..pki.trusting()
        }),
    )
    .await;
    assert!(matches!(err, ClientError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("--tls-domain"), "{err}");
    // Plaintext to a TLS listener fails too.
    let plain = endpoint.replace("https://", "http://");
    refused(&plain, client_options()).await;
    // http:// with TLS options is a contradiction, refused before connecting.
    let err = refused(&plain, tls_options(pki.trusting())).await;
    assert!(matches!(err, ClientError::InvalidEndpoint { .. }), "{err}");

    // The daemon still serves after the failed handshakes.
    stream_one(&fx, &endpoint, tls_options(pki.trusting())).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_with_a_client_ca() {
    let fx = Fixture::new();
    let pki = Pki::new();
    let server = tls_server(&fx, pki.server_files(true)).await;
    let endpoint = server.endpoint().unwrap();

    let err = refused(&endpoint, tls_options(pki.trusting())).await;
    assert!(err.to_string().contains(&endpoint), "{err}");
    // The server's certificate: signed by the CA, but not for client authentication.
    let err = refused(
        &endpoint,
        tls_options(TlsOptions {
            cert: Some(pki.path("server.pem")),
            key: Some(pki.path("server.key")),
            ..pki.trusting()
        }),
    )
    .await;
    assert!(err.to_string().contains(&endpoint), "{err}");

    let with_cert = TlsOptions {
        cert: Some(pki.path("client.pem")),
        key: Some(pki.path("client.key")),
        ..pki.trusting()
    };
    stream_one(&fx, &endpoint, tls_options(with_cert.clone())).await;

    // Client certificates and a token together.
    server.shutdown().await.unwrap();
    let mut cfg = config(vec![fx.store.clone()], 1, Limits::default());
    cfg.tls = Some(pki.server_files(true));
    cfg.token = Some(server_token());
    let server = patchflow_server::start(cfg).await.unwrap();
    let endpoint = server.endpoint().unwrap();
    let err = refused(&endpoint, tls_options(with_cert.clone())).await;
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    stream_one(
        &fx,
        &endpoint,
        ClientOptions {
            tls: with_cert,
            ..with_token(TOKEN)
        },
    )
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_or_malformed_tls_files_are_named() {
    let fx = Fixture::new();
    let pki = Pki::new();
    let junk = pki.path("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnot base64 !\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let cases: [(TlsFiles, &Path); 4] = [
        (
            TlsFiles {
                cert: pki.path("absent.pem"),
                ..pki.server_files(false)
            },
            &pki.path("absent.pem"),
        ),
        (
            TlsFiles {
                cert: junk.clone(),
                ..pki.server_files(false)
            },
            &junk,
        ),
        (
            TlsFiles {
                key: pki.path("server.pem"),
                ..pki.server_files(false)
            },
            &pki.path("server.pem"),
        ),
        (
            TlsFiles {
                client_ca: Some(pki.path("server.key")),
                ..pki.server_files(false)
            },
            &pki.path("server.key"),
        ),
    ];
    for (files, named) in cases {
        let mut cfg = config(vec![fx.store.clone()], 1, Limits::default());
        cfg.tls = Some(files);
        let err = patchflow_server::start(cfg).await.err().expect("refused");
        assert!(matches!(err, ServerError::Tls { .. }), "{err}");
        assert!(
            err.to_string().contains(&named.display().to_string()),
            "{err}"
        );
    }
    // A key that does not belong to the certificate.
    let mut cfg = config(vec![fx.store.clone()], 1, Limits::default());
    cfg.tls = Some(TlsFiles {
        key: pki.path("client.key"),
        ..pki.server_files(false)
    });
    let err = patchflow_server::start(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("client.key"), "{err}");

    // The client names its files too.
    let err = Client::connect(
        ["https://127.0.0.1:1"],
        tls_options(TlsOptions {
            ca: Some(junk.clone()),
            ..TlsOptions::default()
        }),
    )
    .await
    .err()
    .expect("refused");
    assert!(matches!(err, ClientError::Credentials { .. }), "{err}");
    assert!(err.to_string().contains("junk.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_addresses_need_a_token_or_an_explicit_opt_out() {
    let fx = Fixture::new();
    let open = |cfg: &mut ServerConfig| {
        cfg.listen = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
        cfg.metrics = None;
    };
    let mut cfg = config(vec![fx.store.clone()], 1, Limits::default());
    open(&mut cfg);
    let err = patchflow_server::start(cfg.clone())
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ServerError::Unprotected { .. }), "{err}");
    let text = err.to_string();
    for needle in ["0.0.0.0:0", "--token-file", "PATCHFLOW_TOKEN", "--insecure"] {
        assert!(text.contains(needle), "{needle:?} missing from {text}");
    }

    // Reach the open listeners over loopback only.
    let local = |server: &RunningServer| {
        let port = server.local_addr().unwrap().port();
        format!("http://127.0.0.1:{port}")
    };
    let mut insecure = cfg.clone();
    insecure.insecure = true;
    let server = patchflow_server::start(insecure).await.unwrap();
    stream_one(&fx, &local(&server), client_options()).await;
    server.shutdown().await.unwrap();

    let mut guarded = cfg;
    guarded.token = Some(server_token());
    let server = patchflow_server::start(guarded).await.unwrap();
    let err = Client::connect([local(&server)], client_options())
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    stream_one(&fx, &local(&server), with_token(TOKEN)).await;
    server.shutdown().await.unwrap();
}
