use clap::Parser;
use std::sync::Arc;
use ztunnel::config::Config;

fn main() {
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        eprintln!("ztunnel: invalid configuration: {e}");
        std::process::exit(2);
    }
    let format = if cfg.log_format == "json" {
        mesh_log::Format::Json
    } else {
        mesh_log::Format::Text
    };
    let reload = mesh_log::init_or_exit("ztunnel", &cfg.log_level, format);
    let log_reload: ztunnel::admin::LogReload =
        Arc::new(move |level: &str| reload(level).map_err(|e| e.to_string()));
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting ztunnel");
    raise_open_files_limit();
    // Control work (xDS, certificates, DNS, admin) runs on this thread; connections run on
    // `--worker-threads` data threads of their own (see `mesh_threads`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the Tokio runtime");
    // Freed memory goes back to the system after load (see `mesh_memory`).
    mesh_memory::spawn_trimmer();
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
