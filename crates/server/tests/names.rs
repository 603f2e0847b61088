//! Names in requests are identifiers, never paths: dataset names and case ids that break the
//! store's identifier rule are INVALID_ARGUMENT naming the field, before any lookup, and the
//! daemon keeps serving.

mod common;

use common::{Fixture, Raw, client_options, config, first_answer, serve, within};
use patchflow_client::{Client, StreamConfig};
use patchflow_proto::v1 as pb;
use patchflow_server::{Limits, ServerError};
use patchflow_store::MAX_CASE_ID_LEN;
use tonic::Code;

/// One name of every kind the rule refuses, with what it is.
fn bad_names() -> Vec<(&'static str, String)> {
    vec![
        ("parent folder", "../x".into()),
        ("parent folder inside", "Dataset900_Synthetic/../x".into()),
        ("absolute path", "/etc/passwd".into()),
        ("separator", "a/b".into()),
        ("backslash", "a\\b".into()),
        ("NUL", "a\0b".into()),
        ("ASCII control", "a\u{1}b".into()),
        ("non-ASCII control", "a\u{85}b".into()),
        ("non-ASCII letter", "caf\u{e9}".into()),
        ("space", "a b".into()),
        ("hidden", ".x".into()),
        ("dot", ".".into()),
        ("empty", String::new()),
        ("over-long", "a".repeat(MAX_CASE_ID_LEN + 1)),
        ("much too long", "b".repeat(100_000)),
    ]
}

/// Opens a Sample stream with `config` and returns its first answer.
async fn sample_once(raw: &mut Raw, config: pb::SampleConfig) -> Result<(), tonic::Status> {
    let first = pb::SampleRequest {
        config: Some(config),
        credits: 1,
        ..Default::default()
    };
    first_answer(raw, first).await.map(drop)
}

fn assert_invalid(what: &str, result: Result<(), tonic::Status>, field: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert!(
        status.message().contains(&format!("{field}: ")),
        "{what}: message {:?} does not name {field}",
        status.message()
    );
    assert!(
        status.message().contains("is not a valid name"),
        "{what}: {:?}",
        status.message()
    );
    assert!(
        status.message().len() < 1024,
        "{what}: the message stays short ({} bytes)",
        status.message().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_invalid_arguments_and_the_server_stays_up() {
    let fx = Fixture::new();
    let server = serve(&fx, 1).await;
    let endpoint = server.endpoint().unwrap();
    let mut raw = Raw::connect(endpoint.clone()).await.unwrap();
    let good = || pb::SampleConfig {
        dataset: fx.name.clone(),
        patch_size: vec![4, 5, 6],
        batch_size: 2,
        ..Default::default()
    };
    // A stream that runs across every refusal below.
    let client = Client::connect([endpoint], client_options()).await.unwrap();
    let mut healthy = client
        .stream(StreamConfig::new(&fx.name, [5, 5, 5], 2))
        .await
        .unwrap();
    for (next_index, (what, name)) in (0u64..).zip(bad_names()) {
        let described = raw
            .describe_dataset(pb::DescribeDatasetRequest {
                dataset: name.clone(),
            })
            .await
            .map(drop);
        assert_invalid(&format!("describe {what}"), described, "dataset");

        let mut config = good();
        config.dataset = name.clone();
        let sampled = sample_once(&mut raw, config).await;
        assert_invalid(&format!("sample dataset {what}"), sampled, "dataset");

        let mut config = good();
        config.cases = vec!["case_a".into(), name.clone()];
        let sampled = sample_once(&mut raw, config).await;
        assert_invalid(&format!("sample case {what}"), sampled, "cases[1]");

        let batch = within("healthy batch", healthy.next()).await.unwrap();
        assert_eq!(batch.index, next_index);
        fx.check_batch(&batch, [5, 5, 5], 2);
    }

    // Well-formed names go on to the lookup as before.
    let status = raw
        .describe_dataset(pb::DescribeDatasetRequest {
            dataset: "Dataset404_Missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let mut config = good();
    config.cases = vec!["case_zz".into()];
    let status = sample_once(&mut raw, config).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let mut config = good();
    config.cases = vec!["case_b".into()];
    sample_once(&mut raw, config).await.unwrap();
    let listing = raw
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listing.datasets.len(), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_folder_whose_name_is_not_an_identifier_is_refused_at_start() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("Dataset 901 spaced");
    std::fs::rename(fx.add_store("tmp_odd"), &odd).unwrap();
    let err = patchflow_server::start(config(vec![odd.clone()], 1, Limits::default()))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ServerError::DatasetName { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&odd.display().to_string()), "{text}");
    assert!(text.contains("rename the folder"), "{text}");
}
