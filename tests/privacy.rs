//! NIfTI header text fields (`descrip`, `aux_file`, `intent_name`, `db_name`, `data_type`) and
//! header extensions can carry patient information. None of it reaches the store, `inspect`, or
//! anything the daemon serves.

mod common;

use std::io::{Read, Write};
use std::path::Path;

use common::{run_ok, s};
use patchflow_proto::v1 as pb;

const MARKERS: [&str; 6] = [
    "DESCRIP-Jane-Roe-1970",
    "AUX-MRN-0042",
    "INTENT-PHI",
    "DBNAME-WARD9",
    "DTYPE-PHI",
    "EXTENSION-Jane-Roe-birth-1970-01-01",
];

/// Rewrites the gzip'd NIfTI file at `path` with the marker texts in every header text field
/// and a comment extension holding the last marker.
fn plant_markers(path: &Path) {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    let mut header = raw[..348].to_vec();
    let vox_offset = f32::from_le_bytes(header[108..112].try_into().unwrap()) as usize;
    let data = raw[vox_offset..].to_vec();
    let put = |h: &mut Vec<u8>, at: usize, len: usize, text: &str| {
        h[at..at + len].fill(0);
        let n = text.len().min(len);
        h[at..at + n].copy_from_slice(&text.as_bytes()[..n]);
    };
    put(&mut header, 148, 80, MARKERS[0]);
    put(&mut header, 228, 24, MARKERS[1]);
    put(&mut header, 328, 16, MARKERS[2]);
    put(&mut header, 14, 18, MARKERS[3]);
    put(&mut header, 4, 10, MARKERS[4]);
    // Extension: esize (multiple of 16, including its 8 header bytes), ecode 6 (comment).
    let mut ext = MARKERS[5].as_bytes().to_vec();
    ext.resize(48 - 8, 0);
    let esize = 48i32;
    let new_offset = 348 + 4 + esize as usize;
    header[108..112].copy_from_slice(&(new_offset as f32).to_le_bytes());
    let mut out = header;
    out.extend_from_slice(&[1, 0, 0, 0]);
    out.extend_from_slice(&esize.to_le_bytes());
    out.extend_from_slice(&6i32.to_le_bytes());
    out.extend_from_slice(&ext);
    out.extend_from_slice(&data);
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(&out).unwrap();
    gz.finish().unwrap();
}

fn assert_clean(what: &str, bytes: &[u8]) {
    for m in MARKERS {
        assert!(
            !bytes.windows(m.len()).any(|w| w == m.as_bytes()),
            "{what} contains {m:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_text_and_extensions_never_reach_the_store_or_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    run_ok(&["phantom", s(&raw), "--cases", "2", "--shape", "16,24,24"]);
    for sub in ["imagesTr", "labelsTr"] {
        for entry in std::fs::read_dir(raw.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            plant_markers(&path);
            // The planted file carries the markers (the check below can fail).
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
                .read_to_end(&mut plain)
                .unwrap();
            assert!(
                plain
                    .windows(MARKERS[5].len())
                    .any(|w| w == MARKERS[5].as_bytes())
            );
        }
    }
    let store = dir.path().join("store");
    run_ok(&["ingest", s(&raw), "--out", s(&store)]);

    // Every byte of the store.
    let mut files = 0;
    for entry in std::fs::read_dir(&store).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            assert_clean(&path.display().to_string(), &std::fs::read(&path).unwrap());
            files += 1;
        }
    }
    assert!(files >= 3, "manifest and two cases expected");
    // What inspect prints.
    assert_clean(
        "inspect --json",
        run_ok(&["inspect", s(&store), "--json"]).as_bytes(),
    );
    assert_clean("inspect", run_ok(&["inspect", s(&store)]).as_bytes());

    // What the daemon serves: listing, description and batch metadata.
    let server = patchflow_server::start(patchflow_server::ServerConfig {
        stores: vec![store.clone()],
        listen: Some(([127, 0, 0, 1], 0).into()),
        workers: 1,
        cache_mb: 16,
        ..Default::default()
    })
    .await
    .unwrap();
    let endpoint = server.endpoint().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw_client = pb::patchflow_client::PatchflowClient::new(channel);
    let list = raw_client
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_clean("ListDatasets", format!("{list:?}").as_bytes());
    let description = raw_client
        .describe_dataset(pb::DescribeDatasetRequest {
            dataset: "store".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(description.cases.len(), 2);
    assert_clean("DescribeDataset", format!("{description:?}").as_bytes());
    let client = patchflow_client::Client::connect([endpoint], Default::default())
        .await
        .unwrap();
    let mut stream = client
        .stream(patchflow_client::StreamConfig::new("store", [8, 16, 16], 2))
        .await
        .unwrap();
    for _ in 0..4 {
        let batch = stream.next().await.unwrap();
        assert_clean("batch metadata", format!("{:?}", batch.items).as_bytes());
    }
    server.shutdown().await.unwrap();
}
