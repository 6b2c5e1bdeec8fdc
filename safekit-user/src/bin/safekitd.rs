//! `safekitd --root DIR`: the safekit daemon of one node.

use anyhow::Context as _;
use clap::Parser as _;
use safekit::{config, daemon, paths::Paths};

fn main() -> anyhow::Result<()> {
    let args = daemon::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SAFEKIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let paths = Paths::from_arg_or_env(args.root);
    if args.guard {
        let me = args.node.unwrap_or_default();
        return daemon::guard::run_guard(&paths, &me).context("safekitd guard");
    }
    let config = match config::load(&paths.etc()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("safekitd: invalid configuration:\n{errors}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime
        .block_on(daemon::run(paths, config, args.node))
        .context("safekitd")?;
    Ok(())
}
