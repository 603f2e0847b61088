//! Hostile and careless clients against the daemon: every field of a stream configuration at
//! its extremes, credits beyond the limit, undecodable and oversized messages from a raw gRPC
//! client, and bytes that are not HTTP/2 at all. Each gets an error status (or a normal answer
//! where the value is legal), nothing panics, and the server keeps serving afterwards.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, BufMut};
use common::phantom_store;
use patchflow_proto::v1 as pb;
use patchflow_proto::v1::patchflow_client::PatchflowClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Sends and receives message bodies as raw bytes, whatever they hold.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

/// Longest a single answer may take; far beyond what any of them needs.
const ANSWER: Duration = Duration::from_secs(60);

fn valid() -> pb::SampleConfig {
    pb::SampleConfig {
        dataset: "store".into(),
        patch_size: vec![16, 24, 24],
        batch_size: 2,
        ..Default::default()
    }
}

/// Opens a Sample stream with `config` and `credits` and returns the first answer: `Ok(())`
/// for a batch part, or the status.
async fn first_answer(
    client: &mut PatchflowClient<tonic::transport::Channel>,
    config: pb::SampleConfig,
    credits: u32,
) -> Result<(), tonic::Status> {
    let request = pb::SampleRequest {
        config: Some(config),
        credits,
        ..Default::default()
    };
    // The request stream stays open (as a client waiting for batches would).
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(request).await.unwrap();
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let answer = async {
        let mut inbound = client.sample(outbound).await?.into_inner();
        match inbound.message().await? {
            Some(_) => Ok(()),
            None => Err(tonic::Status::unknown("stream ended without an answer")),
        }
    };
    let out = tokio::time::timeout(ANSWER, answer)
        .await
        .expect("an answer in time");
    drop(tx);
    out
}

async fn still_serves(client: &mut PatchflowClient<tonic::transport::Channel>) {
    let list = client
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .expect("list after the hostile requests");
    assert_eq!(list.into_inner().datasets.len(), 1);
    first_answer(client, valid(), 1)
        .await
        .expect("a normal stream after the hostile requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_errors_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = phantom_store(dir.path(), 2, "24,40,40");
    let server = patchflow_server::start(patchflow_server::ServerConfig {
        stores: vec![store.clone()],
        listen: Some(([127, 0, 0, 1], 0).into()),
        workers: 2,
        cache_mb: 16,
        ..Default::default()
    })
    .await
    .expect("server starts");
    let addr = server.local_addr().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = PatchflowClient::new(channel.clone()).max_decoding_message_size(256 << 20);

    // The sanity case first: the valid configuration streams.
    first_answer(&mut client, valid(), 1)
        .await
        .expect("valid config");

    // Every field at its extremes. `None` = the value is legal and must be served; indices at
    // the end of the u64 range may instead be refused as OUT_OF_RANGE (the sequence cannot go
    // on), but never with anything else.
    let mut cases: Vec<(&str, pb::SampleConfig, Option<&[Code]>)> = Vec::new();
    const REQ: &[Code] = &[Code::InvalidArgument, Code::ResourceExhausted];
    const NF: &[Code] = &[Code::NotFound, Code::InvalidArgument];
    const END: &[Code] = &[Code::OutOfRange];
    let with = |f: &dyn Fn(&mut pb::SampleConfig)| {
        let mut c = valid();
        f(&mut c);
        c
    };
    for patch in [
        vec![],
        vec![16, 24],
        vec![16, 24, 24, 24],
        vec![0, 24, 24],
        vec![-1, 24, 24],
        vec![i64::MIN, 24, 24],
        vec![i64::MAX, 24, 24],
        vec![i64::MAX, i64::MAX, i64::MAX],
        vec![1 << 20, 1 << 20, 1],
        vec![4097, 1, 1],
    ] {
        cases.push((
            "patch_size",
            with(&|c| c.patch_size = patch.clone()),
            Some(REQ),
        ));
    }
    cases.push(("batch_size 0", with(&|c| c.batch_size = 0), Some(REQ)));
    cases.push((
        "batch_size max",
        with(&|c| c.batch_size = u32::MAX),
        Some(REQ),
    ));
    cases.push(("dataset empty", with(&|c| c.dataset.clear()), Some(NF)));
    cases.push((
        "dataset unknown",
        with(&|c| c.dataset = "nope".into()),
        Some(NF),
    ));
    cases.push((
        "dataset path",
        with(&|c| c.dataset = "../store".into()),
        Some(NF),
    ));
    cases.push((
        "dataset huge",
        with(&|c| c.dataset = "x".repeat(1 << 20)),
        Some(NF),
    ));
    cases.push(("dtype unknown", with(&|c| c.dtype = 99), Some(REQ)));
    cases.push(("dtype negative", with(&|c| c.dtype = -5), Some(REQ)));
    for fraction in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.5, 1.5] {
        cases.push((
            "foreground fraction",
            with(&|c| {
                c.policy = Some(pb::sample_config::Policy::Foreground(
                    pb::ForegroundOversample { fraction },
                ))
            }),
            Some(REQ),
        ));
    }
    for weights in [
        HashMap::new(),
        HashMap::from([(1, f64::NAN)]),
        HashMap::from([(1, -1.0)]),
        HashMap::from([(1, f64::INFINITY)]),
        HashMap::from([(1, 0.0), (2, 0.0)]),
        HashMap::from([(70_000, 1.0)]),
        HashMap::from([(u32::MAX, 1.0)]),
    ] {
        cases.push((
            "class weights",
            with(&|c| {
                c.policy = Some(pb::sample_config::Policy::ClassWeights(pb::ClassWeights {
                    weights: weights.clone(),
                }))
            }),
            Some(REQ),
        ));
    }
    cases.push((
        "crops_per_case max",
        with(&|c| c.crops_per_case = u32::MAX),
        None,
    ));
    cases.push(("seed max", with(&|c| c.seed = u64::MAX), None));
    cases.push((
        "start_index max",
        with(&|c| c.start_index = Some(u64::MAX)),
        Some(END),
    ));
    cases.push((
        "index_stride max",
        with(&|c| c.index_stride = u64::MAX),
        Some(END),
    ));
    cases.push((
        "start and stride max",
        with(&|c| {
            c.start_index = Some(u64::MAX - 1);
            c.index_stride = u64::MAX;
        }),
        Some(END),
    ));
    cases.push(("config_id max", with(&|c| c.config_id = u64::MAX), None));
    cases.push((
        "case unknown",
        with(&|c| c.cases = vec!["nope".into()]),
        Some(NF),
    ));
    cases.push((
        "case path",
        with(&|c| c.cases = vec!["../../etc/passwd".into()]),
        Some(NF),
    ));
    cases.push((
        "case NUL",
        with(&|c| c.cases = vec!["a\0b".into()]),
        Some(NF),
    ));
    cases.push((
        "many cases",
        with(&|c| c.cases = (0..100_000).map(|i| format!("c{i}")).collect()),
        Some(NF),
    ));
    cases.push((
        "augmentation preset",
        with(&|c| {
            c.augmentation = Some(pb::Augmentation {
                preset: "nope".into(),
                ..Default::default()
            })
        }),
        Some(REQ),
    ));
    for spec_json in [
        "{",
        "null",
        "7",
        "{\"rotation\": {\"probability\": 7}}",
        &"[".repeat(100_000),
    ] {
        cases.push((
            "augmentation spec_json",
            with(&|c| {
                c.augmentation = Some(pb::Augmentation {
                    spec_json: spec_json.to_owned(),
                    ..Default::default()
                })
            }),
            Some(REQ),
        ));
    }
    cases.push((
        "no_mirror_axes",
        with(&|c| {
            c.augmentation = Some(pb::Augmentation {
                preset: "nnunet".into(),
                no_mirror_axes: vec![3, u32::MAX],
                ..Default::default()
            })
        }),
        Some(REQ),
    ));
    for (what, config, expect) in cases {
        let got = first_answer(&mut client, config.clone(), 1).await;
        match (expect, got) {
            (None, Ok(())) => {}
            (None, Err(status)) => panic!("{what}: legal value refused: {status:?}"),
            (Some(codes), Err(status)) => assert!(
                codes.contains(&status.code()),
                "{what}: {:?} (message {:?}) not in {codes:?}",
                status.code(),
                status.message()
            ),
            (Some(codes), Ok(())) if codes == END => {}
            (Some(_), Ok(())) => panic!("{what}: served {config:?}"),
        }
    }

    // Credits beyond the limit.
    let err = first_answer(&mut client, valid(), u32::MAX)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    still_serves(&mut client).await;

    // Raw message bodies that are not the messages they claim to be, and one beyond the
    // request size limit.
    let mut raw = tonic::client::Grpc::new(channel.clone());
    let garbage: Vec<Vec<u8>> = vec![
        vec![0xff; 64],
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        b"\x12\x05hello-not-a-valid-submessage".to_vec(),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect(),
        vec![0u8; 5 << 20],
    ];
    for path in ["ListDatasets", "DescribeDataset"] {
        for body in &garbage {
            raw.ready().await.unwrap();
            let answer = raw
                .unary(
                    tonic::Request::new(body.clone()),
                    format!("/patchflow.v1.Patchflow/{path}").parse().unwrap(),
                    RawCodec,
                )
                .await;
            // ListDatasets ignores unknown fields only when they decode; either way no panic.
            if let Err(status) = answer {
                assert_ne!(status.code(), Code::Ok);
            }
        }
    }
    for body in &garbage {
        raw.ready().await.unwrap();
        let outbound = tokio_stream::iter(vec![body.clone()]);
        let answer = tokio::time::timeout(ANSWER, async {
            let mut inbound = raw
                .streaming(
                    tonic::Request::new(outbound),
                    "/patchflow.v1.Patchflow/Sample".parse().unwrap(),
                    RawCodec,
                )
                .await?
                .into_inner();
            inbound.message().await
        })
        .await
        .expect("an answer in time");
        let status = answer.expect_err("garbage on Sample must fail");
        assert!(
            [Code::InvalidArgument, Code::ResourceExhausted].contains(&status.code()),
            "{status:?} for {:?}",
            &body[..body.len().min(16)]
        );
    }
    raw.ready().await.unwrap();
    let oversized = raw
        .unary(
            tonic::Request::new(vec![0u8; 5 << 20]),
            "/patchflow.v1.Patchflow/DescribeDataset".parse().unwrap(),
            RawCodec,
        )
        .await
        .unwrap_err();
    // Unary messages are refused by the transport before any handler runs (OUT_OF_RANGE).
    assert!(
        [Code::OutOfRange, Code::ResourceExhausted].contains(&oversized.code()),
        "{oversized:?}"
    );

    // Bytes that are not HTTP/2: the connection is dropped, nothing else happens.
    for junk in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0x55; 70_000],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = tcp.write_all(&junk).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(ANSWER, tcp.read_to_end(&mut sink)).await;
    }

    still_serves(&mut client).await;
    server
        .shutdown()
        .await
        .expect("clean shutdown after the hostile requests");
}
