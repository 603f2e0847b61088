//! A real S3-compatible server for tests: moto's server mode (`moto_server`, from the Python
//! package `moto[server]`), started on 127.0.0.1 with a port it picks itself.
//!
//! The test command installs moto into the project's Python environment
//! (`target/pyenv`, or the one of the interpreter named by `PATCHFLOW_PYTHON`); tests that need
//! it call [`MotoServer::shared`] and skip with a message when it is not installed. One server
//! serves every test of a test binary (each test makes its own bucket); it is stopped when the
//! test process ends, however it ends (a watchdog shell kills it when the pipe from the test
//! process closes).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use patchflow_store::object_store::aws::AmazonS3Builder;
use patchflow_store::object_store::{ClientOptions, ObjectStore};

/// Credentials and region given to moto (it accepts any).
pub const TEST_ACCESS_KEY: &str = "testing";
/// See [`TEST_ACCESS_KEY`].
pub const TEST_REGION: &str = "us-east-1";

/// Longest wait for the server to say it listens.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A running moto server.
pub struct MotoServer {
    port: u16,
    _child: Mutex<Child>,
}

/// Where `moto_server` is: beside `$PATCHFLOW_PYTHON`, else in `<repo>/target/pyenv/bin`.
pub fn moto_server_path() -> PathBuf {
    if let Some(python) = std::env::var_os("PATCHFLOW_PYTHON") {
        let python = PathBuf::from(python);
        if let Some(dir) = python.parent() {
            return dir.join("moto_server");
        }
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv/bin/moto_server")
}

impl MotoServer {
    /// The test binary's server, started on first use; `None` (after printing why, naming
    /// `test`) when moto is not installed or does not start.
    pub fn shared(test: &str) -> Option<&'static MotoServer> {
        static SERVER: OnceLock<Result<MotoServer, String>> = OnceLock::new();
        match SERVER.get_or_init(MotoServer::start) {
            Ok(server) => Some(server),
            Err(why) => {
                eprintln!("skipping {test}: {why}");
                None
            }
        }
    }

    /// Starts a server of its own (most tests use [`shared`](Self::shared)).
    pub fn start() -> Result<MotoServer, String> {
        let exe = moto_server_path();
        if !exe.is_file() {
            return Err(format!(
                "moto_server not found at {} (install it with `pip install 'moto[server]==5.2.5'` \
                 into target/pyenv, as `cargo xtask test` does)",
                exe.display()
            ));
        }
        // The shell waits on its standard input, which only this process writes: when this
        // process ends the pipe closes and the server is killed.
        let script = r#""$0" -H 127.0.0.1 -p 0 & pid=$!; read -r _; kill $pid; wait $pid"#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                let port = line
                    .split("http://127.0.0.1:")
                    .nth(1)
                    .and_then(|p| p.trim().parse::<u16>().ok());
                if let Some(port) = port {
                    let _ = tx.send(Ok(port));
                    break;
                }
                let _ = tx.send(Err(line));
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let deadline = Instant::now() + START_DEADLINE;
        let mut seen = Vec::new();
        let port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(port)) => break port,
                Ok(Err(line)) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    return Err(format!(
                        "moto_server did not report its port within {START_DEADLINE:?}; it said: {}",
                        seen.join(" | ")
                    ));
                }
            }
        };
        Ok(MotoServer {
            port,
            _child: Mutex::new(child),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The environment a `patchflow` child process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        Self::env_for(&self.endpoint())
    }

    /// The environment that points the standard AWS variables at `endpoint`.
    pub fn env_for(endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", endpoint.to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY.to_owned()),
            ("AWS_REGION", TEST_REGION.to_owned()),
            ("AWS_DEFAULT_REGION", TEST_REGION.to_owned()),
        ]
    }

    /// A client of `bucket` on `endpoint` (this server, or a proxy in front of it).
    pub fn client_for(endpoint: &str, bucket: &str) -> Arc<dyn ObjectStore> {
        patchflow_store::install_crypto_provider();
        let store = AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_region(TEST_REGION)
            .with_access_key_id(TEST_ACCESS_KEY)
            .with_secret_access_key(TEST_ACCESS_KEY)
            .with_bucket_name(bucket)
            .with_retry(patchflow_store::retry_config())
            .with_client_options(ClientOptions::new().with_allow_http(true))
            .build()
            .expect("S3 client for moto");
        Arc::new(store)
    }

    /// Creates a bucket with a name unique in this process (prefix `stem`), makes it the
    /// store crate's client for that bucket, and returns its name.
    pub fn bucket(&self, stem: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}-{}-{}",
            stem.to_ascii_lowercase().replace('_', "-"),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.create_bucket(&name);
        patchflow_store::set_bucket_client(&name, Self::client_for(&self.endpoint(), &name));
        name
    }

    /// Creates `name` with a plain `PUT /name` (moto needs no signature).
    pub fn create_bucket(&self, name: &str) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        write!(
            stream,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("send CreateBucket");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("read CreateBucket answer");
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "CreateBucket {name}: {}",
            answer.lines().next().unwrap_or("")
        );
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        if let Ok(mut child) = self._child.lock() {
            if let Some(stdin) = child.stdin.as_mut() {
                let _ = stdin.write_all(b"\n");
            }
            let _ = child.wait();
        }
    }
}
