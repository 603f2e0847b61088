//! Training through a patchflow daemon (started in the test on a free port) equals training
//! in process: the daemon serves batch `k` exactly as the local sampler does, the PGPS stage
//! changes reconfigure the stream, and a resumed run re-opens it at the right batch.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use common::{Made, PhantomStore, make_store};
use patchflow_curriculum::Mode;
use patchflow_server::{RunningServer, ServerConfig};
use patchflow_trainer::metrics::read_records;
use patchflow_trainer::{DeviceChoice, InProcessSource, RemoteSource, TrainConfig, train};
use tch::Tensor;

fn config(out: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(Mode::Pgps, [8, 16, 16], out);
    c.pools = Some([2, 3, 3]);
    c.epochs = 4;
    c.iters_per_epoch = 3;
    c.device = DeviceChoice::Cpu;
    c.threads = Some(1);
    c.base_features = 4;
    c.max_features = 16;
    c.seed = 5;
    c.export_predictions = false;
    c
}

fn weights(out: &Path) -> Vec<(String, Tensor)> {
    let ck = out.join("checkpoint");
    let state = patchflow_trainer::checkpoint::read_state(&ck)
        .unwrap()
        .unwrap();
    let mut t = Tensor::read_safetensors(ck.join(&state.tensors)).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs");
    }
}

/// The daemon names the dataset after the store folder.
const DATASET: &str = "store";

/// A small phantom store and a daemon serving it on a free loopback port.
struct Served {
    made: Made,
    runtime: tokio::runtime::Runtime,
    server: RunningServer,
    endpoint: String,
}

fn serve_small(dir: &Path, workers: usize) -> Served {
    let made = make_store(dir, &PhantomStore::small());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime
        .block_on(patchflow_server::start(ServerConfig {
            stores: vec![made.store.clone()],
            listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            workers,
            ..ServerConfig::default()
        }))
        .unwrap();
    let endpoint = server.endpoint().unwrap();
    Served {
        made,
        runtime,
        server,
        endpoint,
    }
}

#[test]
fn training_through_a_daemon_equals_training_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let Served {
        made,
        runtime,
        server,
        endpoint,
    } = serve_small(dir.path(), 1);

    let local = dir.path().join("local");
    let s = train(
        &config(&local),
        Box::new(InProcessSource::open(&made.store, DATASET, 16 << 20).unwrap()),
    )
    .unwrap();
    let remote = dir.path().join("remote");
    let r = train(
        &config(&remote),
        Box::new(RemoteSource::connect(std::slice::from_ref(&endpoint), DATASET).unwrap()),
    )
    .unwrap();
    assert_same(&weights(&local), &weights(&remote));
    assert_eq!(s.stages.len(), 3);
    assert_eq!(r.stages.len(), 3);
    // Validation volumes came from the daemon: same Dice as from the local store.
    assert_eq!(
        s.validation.as_ref().unwrap().mean_dice,
        r.validation.as_ref().unwrap().mean_dice
    );
    // So did every epoch's validation batches: the same pseudo-Dice, epoch by epoch.
    let pseudo = |dir: &Path| -> Vec<Option<Vec<Option<f64>>>> {
        read_records(&dir.join("metrics.jsonl"))
            .unwrap()
            .into_iter()
            .map(|r| r.pseudo_dice)
            .collect()
    };
    let local_pseudo = pseudo(&local);
    assert_eq!(local_pseudo.len(), 4);
    assert!(local_pseudo.iter().all(Option::is_some));
    assert_eq!(local_pseudo, pseudo(&remote));

    // Stop after one epoch and resume: the stream restarts at batch 3.
    let split = dir.path().join("split");
    let mut first = config(&split);
    first.stop_after_epochs = Some(1);
    train(
        &first,
        Box::new(RemoteSource::connect(std::slice::from_ref(&endpoint), DATASET).unwrap()),
    )
    .unwrap();
    let mut second = config(&split);
    second.resume = true;
    train(
        &second,
        Box::new(RemoteSource::connect(&[endpoint], DATASET).unwrap()),
    )
    .unwrap();
    assert_same(&weights(&local), &weights(&split));

    runtime.block_on(server.shutdown()).unwrap();
}

#[test]
fn augmented_training_through_a_daemon_equals_augmented_training_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let Served {
        made,
        runtime,
        server,
        endpoint,
    } = serve_small(dir.path(), 2);
    let augmented = |out: &Path| {
        let mut c = config(out);
        c.augment = true;
        c
    };

    let local = dir.path().join("local");
    train(
        &augmented(&local),
        Box::new(InProcessSource::open(&made.store, DATASET, 16 << 20).unwrap()),
    )
    .unwrap();
    let remote = dir.path().join("remote");
    train(
        &augmented(&remote),
        Box::new(RemoteSource::connect(&[endpoint], DATASET).unwrap()),
    )
    .unwrap();
    // The daemon augmented every item exactly as the local sampler did.
    assert_same(&weights(&local), &weights(&remote));

    // And augmentation changed the batches: the same run without it ends elsewhere.
    let plain = dir.path().join("plain");
    let mut c = augmented(&plain);
    c.augment = false;
    train(
        &c,
        Box::new(InProcessSource::open(&made.store, DATASET, 16 << 20).unwrap()),
    )
    .unwrap();
    let differs = weights(&local)
        .iter()
        .zip(weights(&plain))
        .any(|((_, a), (_, b))| !a.equal(&b));
    assert!(differs, "augmentation made no difference");

    runtime.block_on(server.shutdown()).unwrap();
}
