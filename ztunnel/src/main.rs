use clap::Parser;
use std::sync::Arc;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, reload};
use ztunnel::config::Config;

fn main() {
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        eprintln!("ztunnel: invalid configuration: {e}");
        std::process::exit(2);
    }
    let filter = EnvFilter::try_new(&cfg.log_level).unwrap_or_else(|e| {
        eprintln!("ztunnel: invalid log level {:?}: {e}", cfg.log_level);
        std::process::exit(2);
    });
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    if cfg.log_format == "json" {
        registry.with(fmt.json().flatten_event(true)).init();
    } else {
        registry.with(fmt).init();
    }
    let log_reload: ztunnel::admin::LogReload = Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    });
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting ztunnel");
    raise_open_files_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads)
        .thread_name("ztunnel-worker")
        .enable_all()
        .build()
        .expect("cannot start the Tokio runtime");
    if let Err(e) = rt.block_on(ztunnel::app::run(cfg, log_reload)) {
        tracing::error!("ztunnel failed: {e}");
        std::process::exit(1);
    }
}

/// Every proxied connection holds one or two descriptors, so the default soft limit
/// (often 1024) would cap a node at a few hundred connections: raise it to the hard limit.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!(soft, hard, "cannot raise the open files limit: {e}"),
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "open files limit"),
        Err(e) => tracing::warn!("cannot read the open files limit: {e}"),
    }
}
