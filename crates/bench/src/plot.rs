//! The benchmark's picture: delivered MB/s and read amplification by patch size.

use std::path::Path;

use patchflow_plot::{PALETTE, Panel, Series, draw_panels};

use crate::BenchError;
use crate::measure::{CacheState, Measurement, Transport};
use crate::suite::SuiteReport;

/// One series: the measurements of one transport, state and client count, by patch edge.
fn series(
    ms: &[Measurement],
    transport: Transport,
    state: CacheState,
    clients: usize,
    value: impl Fn(&Measurement) -> f64,
) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = ms
        .iter()
        .filter(|m| m.transport == transport && m.state == state && m.clients == clients)
        .map(|m| (m.edge, value(m)))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts
}

/// Draws the report's plot into `path` (PNG).
pub fn write_plot(report: &SuiteReport, path: &Path) -> Result<(), BenchError> {
    let ms = &report.measurements;
    let mut clients: Vec<usize> = ms
        .iter()
        .filter(|m| m.transport == Transport::Grpc)
        .map(|m| m.clients)
        .collect();
    clients.sort_unstable();
    clients.dedup();
    // Delivered bytes per second stay within one order of magnitude from 32³ to 192³, where
    // patches per second span three; the table has both.
    let rate = |m: &Measurement| m.mb_per_s;
    let mut warm = vec![Series::new(
        "in-process",
        PALETTE[0],
        series(ms, Transport::InProcess, CacheState::Warm, 1, rate),
    )];
    for (i, &c) in clients.iter().enumerate() {
        warm.push(Series::new(
            format!("gRPC, {c} client(s)"),
            PALETTE[(i + 1) % PALETTE.len()],
            series(ms, Transport::Grpc, CacheState::Warm, c, rate),
        ));
    }
    warm.push(Series::new(
        "gRPC + shared memory",
        PALETTE[(clients.len() + 1) % PALETTE.len()],
        series(ms, Transport::GrpcShared, CacheState::Warm, 1, rate),
    ));
    let cold = vec![
        Series::new(
            "in-process",
            PALETTE[0],
            series(ms, Transport::InProcess, CacheState::Cold, 1, rate),
        ),
        Series::new(
            "gRPC, 1 client",
            PALETTE[1],
            series(ms, Transport::Grpc, CacheState::Cold, 1, rate),
        ),
    ];
    let amp = |m: &Measurement| m.read_amplification;
    let reads = vec![
        Series::new(
            "in-process",
            PALETTE[0],
            series(ms, Transport::InProcess, CacheState::Cold, 1, amp),
        ),
        Series::new(
            "gRPC daemon",
            PALETTE[1],
            series(ms, Transport::Grpc, CacheState::Cold, 1, amp),
        ),
    ];
    let x = "patch edge (cube root of voxels)".to_owned();
    let panel = |title: &str, series: Vec<Series>| Panel {
        title: title.to_owned(),
        x_desc: x.clone(),
        series: series
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect(),
        markers: true,
        y_from_zero: true,
    };
    let panels = [
        panel("MB/s delivered (image + label), warm", warm),
        panel("MB/s delivered (image + label), cold start", cold),
        panel("storage bytes read per stored patch byte, cold", reads),
    ];
    let title = format!(
        "patchflow bench: batch {}, foreground {}, {} workers — {} cores, {:.0} GiB",
        report.batch,
        report.foreground,
        report.workers,
        report.machine.cores,
        report.machine.memory_bytes as f64 / f64::from(1u32 << 30)
    );
    draw_panels(path, &title, &panels, 1000)?;
    Ok(())
}
