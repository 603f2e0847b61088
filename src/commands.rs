//! Each subcommand: its resolved configuration handed to the library that does the work, and
//! what it prints.

use std::process::ExitCode;

use anyhow::{Context, Result};
use patchflow_ingest::IngestOptions;
use patchflow_server::ServerConfig;

use crate::flags::demo::DemoArgs;
use crate::flags::ingest::{IngestArgs, InspectArgs};
use crate::flags::{Cli, Command, PhantomArgs, ScheduleArgs};
use crate::signals::stop_flag;

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let progress = !cli.quiet;
    match cli.command {
        Command::Ingest(a) => ingest(&a, progress),
        Command::Inspect(a) => inspect(a),
        Command::Phantom(a) => phantom(&a),
        Command::Schedule(a) => schedule(a),
        Command::Serve(a) => serve(ServerConfig::try_from(a)?),
        Command::Demo(a) => demo(a, progress),
        Command::Bench(a) => crate::bench::run(*a, progress),
    }
}

fn ingest(a: &IngestArgs, progress: bool) -> Result<ExitCode> {
    let opts = IngestOptions {
        progress,
        ..IngestOptions::try_from(a)?
    };
    let stop = stop_flag()?;
    if a.watch {
        patchflow_ingest::watch(&a.input, &a.out, &opts, a.poll_seconds, &stop, |report| {
            eprintln!("{}", report.summary())
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = patchflow_ingest::ingest(&a.input, &a.out, &opts, &stop)?;
    eprintln!("{}", report.summary());
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let report = patchflow_ingest::inspect(&a.store, a.case.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", patchflow_ingest::render_text(&report));
    }
    if !a.verify {
        return Ok(ExitCode::SUCCESS);
    }
    let failures = patchflow_ingest::verify(&a.store, a.case.as_deref())?;
    for (id, e) in &failures {
        eprintln!("damaged: {id}: {e}");
    }
    if failures.is_empty() {
        eprintln!(
            "verified {} case(s): every chunk intact",
            report.cases.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{} of {} case(s) damaged",
            failures.len(),
            report.cases.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

fn phantom(a: &PhantomArgs) -> Result<ExitCode> {
    patchflow_volume::write_phantom_dataset(&a.out, a.cases, &a.into())
        .with_context(|| format!("writing the phantom dataset to {}", a.out.display()))?;
    eprintln!("wrote {} phantom cases to {}", a.cases, a.out.display());
    Ok(ExitCode::SUCCESS)
}

fn serve(config: ServerConfig) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("patchflow-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(patchflow_server::serve(
        config,
        patchflow_server::shutdown_signal(),
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn schedule(a: ScheduleArgs) -> Result<ExitCode> {
    let plan = a.store.as_deref().map(store_plan).transpose()?;
    let final_patch = a
        .final_patch
        .or(plan.map(|p| p.0))
        .context("--final-patch")?;
    let pools = a.pools.or(plan.map(|p| p.1)).context("--pools")?;
    let batch = a.batch.or(plan.map(|p| p.2)).unwrap_or(2);
    let schedule =
        patchflow_curriculum::Schedule::build(final_patch, pools, a.epochs, batch, a.mode)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&schedule.to_json())?);
    } else {
        print!("{}", schedule.render_table());
    }
    Ok(ExitCode::SUCCESS)
}

/// The patch, poolings and batch of the nnU-Net plan a store was ingested with.
fn store_plan(store: &std::path::Path) -> Result<([usize; 3], [u32; 3], usize)> {
    let manifest = patchflow_store::Manifest::load(store)?
        .with_context(|| format!("{}: not a patchflow store", store.display()))?;
    let plan = patchflow_ingest::NnunetStorePlan::from_manifest(&manifest).with_context(|| {
        format!(
            "{}: not a store of nnU-Net's preprocessed folder",
            store.display()
        )
    })?;
    plan.schedule_inputs().with_context(|| {
        format!(
            "{}: the plan's patch {:?} is not 3D",
            store.display(),
            plan.nnunet.patch_size
        )
    })
}

fn demo(a: DemoArgs, progress: bool) -> Result<ExitCode> {
    let cfg = a.config(progress);
    let stop = stop_flag()?;
    let prepared = patchflow_demo::prepare(&cfg, &stop)?;
    eprintln!("{}", prepared.ingest.summary());
    print!("{}", prepared.store_text);
    let report_dir = cfg.report_dir();
    let Some(trainer) = cfg.trainer() else {
        println!(
            "\nno patchflow-train binary found (build it with `cargo xtask demo`): stopped after ingest"
        );
        println!("report: {}", report_dir.display());
        return Ok(ExitCode::SUCCESS);
    };
    patchflow_demo::train(&cfg, &prepared, &trainer)?;
    println!("\nreport: {}", report_dir.display());
    println!(
        "  store: store.txt, store.json; ingest: ingest.json; training: train/ (metrics.jsonl, \
         plot.png, predictions/, summary.json)"
    );
    Ok(ExitCode::SUCCESS)
}
