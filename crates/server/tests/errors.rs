//! Bad requests get the right status with a clear message, and never disturb other streams.

mod common;

use common::{Fixture, Raw, client_options, first_answer, serve_with, wait_live, within};
use patchflow_client::{Client, StreamConfig};
use patchflow_proto::v1 as pb;
use patchflow_server::Limits;
use tonic::Code;

fn good(fx: &Fixture) -> pb::SampleConfig {
    pb::SampleConfig {
        dataset: fx.name.clone(),
        patch_size: vec![4, 5, 6],
        batch_size: 2,
        ..Default::default()
    }
}

async fn expect_status(raw: &mut Raw, request: pb::SampleRequest, code: Code, needle: &str) {
    let status = first_answer(raw, request)
        .await
        .expect_err("the request is refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} lacks {needle:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses_and_other_streams_keep_working() {
    let fx = Fixture::new();
    let limits = Limits {
        max_batch_bytes: 200_000,
        max_credits: 8,
        ..Limits::default()
    };
    let server = serve_with(&fx, 2, limits).await;
    let endpoint = server.endpoint().unwrap();

    // A healthy stream that runs across every bad request below.
    let client = Client::connect([endpoint.clone()], client_options())
        .await
        .unwrap();
    let mut healthy = client
        .stream(StreamConfig::new(&fx.name, [5, 5, 5], 2))
        .await
        .unwrap();
    let mut expected_index = 0;
    let mut check_healthy = async |healthy: &mut patchflow_client::BatchStream| {
        let batch = within("healthy batch", healthy.next()).await.unwrap();
        assert_eq!(batch.index, expected_index);
        expected_index += 1;
        fx.check_batch(&batch, [5, 5, 5], 2);
    };
    check_healthy(&mut healthy).await;

    let mut raw = Raw::connect(endpoint.clone()).await.unwrap();
    let with = |edit: &dyn Fn(&mut pb::SampleConfig)| {
        let mut config = good(&fx);
        edit(&mut config);
        pb::SampleRequest {
            config: Some(config),
            credits: 1,
            ..Default::default()
        }
    };
    let cases: Vec<(pb::SampleRequest, Code, &str)> = vec![
        (
            with(&|c| c.patch_size = vec![4, 0, 6]),
            Code::InvalidArgument,
            "patch_size: axis 1 ([z, y, x]) is 0, must be at least 1",
        ),
        (
            with(&|c| c.patch_size = vec![-3, 5, 6]),
            Code::InvalidArgument,
            "axis 0 ([z, y, x]) is -3",
        ),
        (
            with(&|c| c.patch_size = vec![4, 5]),
            Code::InvalidArgument,
            "needs 3 values [z, y, x], got 2",
        ),
        // Beyond the per-axis limit is beyond a limit, like a patch of too many voxels.
        (
            with(&|c| c.patch_size = vec![4, 5, 1 << 40]),
            Code::ResourceExhausted,
            "the largest accepted is",
        ),
        (
            with(&|c| c.patch_size = vec![100_000; 3]),
            Code::ResourceExhausted,
            "patch_size: axis 0 ([z, y, x]) is 100000, the largest accepted is 4096",
        ),
        (
            with(&|c| c.patch_size = vec![4096; 3]),
            Code::ResourceExhausted,
            "patch voxels",
        ),
        (
            with(&|c| c.patch_size = vec![4, 4097, 4]),
            Code::ResourceExhausted,
            "axis 1 ([z, y, x]) is 4097",
        ),
        (
            with(&|c| c.patch_size = vec![4, 5, -1]),
            Code::InvalidArgument,
            "axis 2 ([z, y, x]) is -1, must be at least 1",
        ),
        (
            with(&|c| c.patch_size = vec![4000, 4000, 4000]),
            Code::ResourceExhausted,
            "patch voxels",
        ),
        (with(&|c| c.batch_size = 0), Code::InvalidArgument, "batch"),
        (
            with(&|c| c.dataset = "Dataset404_Missing".into()),
            Code::NotFound,
            "unknown dataset \"Dataset404_Missing\"",
        ),
        (
            with(&|c| c.cases = vec!["case_a".into(), "case_zz".into()]),
            Code::NotFound,
            "has no case \"case_zz\"",
        ),
        (
            with(&|c| {
                c.augmentation = Some(pb::Augmentation {
                    preset: "torchio".into(),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "unknown augmentation preset \"torchio\" (known: nnunet)",
        ),
        (
            with(&|c| {
                c.augmentation = Some(pb::Augmentation {
                    spec_json: r#"{"rotation": {"p": 2.0}}"#.into(),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "augment",
        ),
        (
            with(&|c| {
                c.augmentation = Some(pb::Augmentation {
                    preset: "nnunet".into(),
                    no_mirror_axes: vec![3],
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "axis 3 does not exist",
        ),
        (
            // 40 items x (2 channels x 4 bytes + 1) x 8000 voxels = 2.88 MB > 200,000.
            with(&|c| {
                c.patch_size = vec![20, 20, 20];
                c.batch_size = 40;
            }),
            Code::ResourceExhausted,
            "batch bytes",
        ),
        (
            with(&|c| c.dtype = 99),
            Code::InvalidArgument,
            "unknown image dtype 99",
        ),
        (
            pb::SampleRequest {
                config: Some(good(&fx)),
                credits: 9,
                ..Default::default()
            },
            Code::ResourceExhausted,
            "credit balance would be 9, the limit is 8",
        ),
    ];
    for (request, code, needle) in cases {
        expect_status(&mut raw, request, code, needle).await;
        check_healthy(&mut healthy).await;
    }
    // An edge at the per-axis limit is served (the patch is padded around the small cases).
    let ok = first_answer(&mut raw, with(&|c| c.patch_size = vec![1, 1, 4096]))
        .await
        .unwrap();
    assert_eq!(ok.index, 0);
    // An empty augmentation message is no augmentation.
    let ok = first_answer(
        &mut raw,
        with(&|c| c.augmentation = Some(pb::Augmentation::default())),
    )
    .await
    .unwrap();
    assert_eq!(ok.index, 0);

    // A bad reconfiguration in the middle of a good stream ends that stream only.
    let mut bad_later = client
        .stream(StreamConfig::new(&fx.name, [3, 3, 3], 1))
        .await
        .unwrap();
    within("batch", bad_later.next()).await.unwrap();
    bad_later
        .reconfigure(StreamConfig::new(&fx.name, [3, 0, 3], 1))
        .unwrap();
    let err = within("refusal", bad_later.next()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    check_healthy(&mut healthy).await;
    // ... and a good configuration revives it where it stopped.
    bad_later
        .reconfigure(StreamConfig::new(&fx.name, [3, 3, 3], 1))
        .unwrap();
    assert_eq!(within("batch", bad_later.next()).await.unwrap().index, 1);
    drop(bad_later);

    // Errors through the client carry the server's code and message.
    let err = client
        .describe("Dataset404_Missing")
        .await
        .expect_err("unknown dataset");
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(err.to_string().contains("Dataset404_Missing"), "{err}");

    let errors = server.metrics().stream_errors;
    assert!(errors >= 13, "{errors}");
    drop(healthy);
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused() {
    let fx = Fixture::new();
    let limits = Limits {
        max_streams: 2,
        ..Limits::default()
    };
    let server = serve_with(&fx, 1, limits).await;
    let endpoint = server.endpoint().unwrap();
    let client = Client::connect([endpoint.clone()], client_options())
        .await
        .unwrap();
    let mut a = client
        .stream(StreamConfig::new(&fx.name, [3, 3, 3], 1))
        .await
        .unwrap();
    let mut b = client
        .stream(StreamConfig::new(&fx.name, [3, 3, 3], 1))
        .await
        .unwrap();
    within("a", a.next()).await.unwrap();
    within("b", b.next()).await.unwrap();
    wait_live(&server, 2).await;

    let mut raw = Raw::connect(endpoint).await.unwrap();
    let request = pb::SampleRequest {
        config: Some(good(&fx)),
        credits: 1,
        ..Default::default()
    };
    expect_status(
        &mut raw,
        request.clone(),
        Code::ResourceExhausted,
        "too many concurrent sample streams (limit 2)",
    )
    .await;
    assert_eq!(server.metrics().streams_refused, 1);
    // The open streams are unaffected; once one closes, a new stream is accepted.
    within("a", a.next()).await.unwrap();
    drop(b);
    wait_live(&server, 1).await;
    assert_eq!(first_answer(&mut raw, request).await.unwrap().index, 0);
    drop(a);
    wait_live(&server, 0).await;
    server.shutdown().await.unwrap();
}
