//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use patchflow_ingest::DatasetPlan;
use patchflow_volume::{CaseInput, read_label, read_nifti};
use std::process::{Command, Output};

/// The real data folder `../shared/data`, or `None` (with a message) when it is absent.
pub fn shared_data(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if dir.join("pairs.tsv").is_file() {
        Some(dir)
    } else {
        eprintln!("skipping {test}: {} not found", dir.display());
        None
    }
}

/// The `patchflow` binary built for these tests.
pub fn patchflow() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchflow"));
    cmd.arg("--quiet");
    cmd
}

/// Runs `patchflow ARGS` and returns its output.
pub fn run(args: &[&str]) -> Output {
    patchflow().args(args).output().expect("patchflow runs")
}

/// Runs `patchflow ARGS`, asserting success; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    stdout_of_success(args, run(args))
}

/// The stdout of a finished `patchflow ARGS`, asserting that it succeeded.
pub fn stdout_of_success(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "patchflow {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Generates `cases` phantom cases of `shape` (`"z,y,x"`) under `dir/raw` and ingests them
/// into `dir/store` (a dataset named `store`); returns the store folder.
pub fn phantom_store(dir: &Path, cases: usize, shape: &str) -> PathBuf {
    let raw = dir.join("raw");
    let store = dir.join("store");
    run_ok(&[
        "phantom",
        s(&raw),
        "--cases",
        &cases.to_string(),
        "--shape",
        shape,
    ]);
    run_ok(&["ingest", s(&raw), "--out", s(&store)]);
    store
}

/// Path as &str for argument lists.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `patchflow inspect STORE --json`, parsed.
pub fn inspect_json(store: &Path) -> serde_json::Value {
    serde_json::from_str(&run_ok(&["inspect", s(store), "--json"])).expect("inspect prints JSON")
}

/// The rows of `pairs.tsv`: (image, label, modality).
pub fn pairs(data: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(data.join("pairs.tsv")).unwrap();
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_string(), f[1].to_string(), f[2].to_string())
        })
        .collect()
}

/// The case id ingest gives an image path.
pub fn case_id(image: &str) -> String {
    let file = Path::new(image).file_name().unwrap().to_str().unwrap();
    file.trim_end_matches(".gz")
        .trim_end_matches(".nii")
        .to_string()
}

/// Reads the whole preprocessed case again in memory, exactly as ingest did, using the stored plan.
pub fn preprocess_in_memory(
    data: &Path,
    image: &str,
    label: &str,
    modality: &str,
    plan: &DatasetPlan,
) -> patchflow_volume::PreprocessedCase {
    let img = read_nifti(&data.join(image)).unwrap();
    let (label_geometry, lab) = read_label(&data.join(label)).unwrap();
    let names = vec![modality.to_string()];
    let input = CaseInput {
        id: case_id(image),
        channels: vec![img],
        channel_names: names.clone(),
        label: lab,
        label_geometry,
    };
    patchflow_volume::preprocess(&input, &plan.case_plan(&names)).unwrap()
}

/// Naive crop with padding of a C-order volume.
#[allow(unused_imports)]
pub use patchflow_testkit::synthetic::crop_ref;

/// The pairs of `../shared/data` (`data`) ingested at their own spacing into `dir/name`.
#[allow(dead_code)]
pub fn ingest_pairs(data: &Path, dir: &Path, name: &str) -> PathBuf {
    let store = dir.join(name);
    run_ok(&[
        "ingest",
        s(&data.join("pairs.tsv")),
        "--out",
        s(&store),
        "--keep-spacing",
    ]);
    store
}

/// A daemon serving `stores` on a free loopback port with two sampling workers and a chunk cache
/// of `cache_mb`, and a client connected to it with the default options.
pub async fn serve_and_connect(
    stores: Vec<PathBuf>,
    cache_mb: u64,
) -> (patchflow_server::RunningServer, patchflow_client::Client) {
    let server = patchflow_server::start(patchflow_server::ServerConfig {
        stores,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        workers: 2,
        cache_mb,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = patchflow_client::Client::connect(
        [server.endpoint().unwrap()],
        patchflow_client::ClientOptions::default(),
    )
    .await
    .unwrap();
    (server, client)
}

/// The image of a served batch as `f32` values. The wire buffers carry no alignment guarantee:
/// the little-endian values are decoded.
pub fn batch_image(batch: &patchflow_client::Batch) -> Vec<f32> {
    batch
        .image
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The labels of a served batch, widened to `u16`.
pub fn batch_labels(batch: &patchflow_client::Batch) -> Vec<u16> {
    match batch.label_dtype {
        patchflow_client::LabelDtype::U8 => batch.label.iter().map(|&x| u16::from(x)).collect(),
        patchflow_client::LabelDtype::U16 => batch
            .label
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
        other => panic!("unexpected label dtype {other:?}"),
    }
}

/// The expected label of one served item of `patch` at `origin` of the preprocessed case, as
/// `u16` values: `ignore` outside the volume.
pub fn expected_label(
    pre: &patchflow_volume::PreprocessedCase,
    origin: [i64; 3],
    patch: [usize; 3],
    ignore: u16,
) -> Vec<u16> {
    match &pre.label {
        patchflow_volume::LabelData::U8(v) => {
            let wide: Vec<u16> = v.iter().map(|&x| u16::from(x)).collect();
            crop_ref(&wide, pre.shape, origin, patch, ignore)
        }
        patchflow_volume::LabelData::U16(v) => crop_ref(v, pre.shape, origin, patch, ignore),
    }
}

/// `patchflow serve STORE` on the Unix socket `sock` only, with 2 workers and the `extra`
/// arguments; its stdout discarded, its stderr shown.
pub fn unix_daemon(store: &Path, sock: &Path, extra: &[&str]) -> std::process::Child {
    patchflow()
        .args([
            "serve",
            s(store),
            "--no-tcp",
            "--unix",
            s(sock),
            "--workers",
            "2",
        ])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("daemon starts")
}

/// What identifies a batch: its index, each item's case, origin and forced flag, and a hash of
/// the bytes.
pub type Fingerprint = (u64, Vec<(String, [i64; 3], bool)>, u64);

/// The [`Fingerprint`] of a batch (FNV-1a over its image and label bytes).
pub fn fingerprint(b: &patchflow_client::Batch) -> Fingerprint {
    let items = b
        .items
        .iter()
        .map(|i| (i.case_id.clone(), i.origin, i.forced_foreground))
        .collect();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for byte in b.image.iter().chain(b.label.iter()) {
        h = (h ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    (b.index, items, h)
}
