//! `quire serve` and `quire verify`: the commands that open a data directory themselves (the
//! others are gRPC clients of a running node).

use std::io::{IsTerminal, Write as _};

use anyhow::{Context, Result};

use super::{ServeArgs, VerifyArgs};
use crate::node::{self, NodeConfig};
use crate::projection::Registry;

pub(crate) async fn serve(args: ServeArgs, registry: Registry) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIRE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let data_dir = args.data_dir.unwrap_or_else(node::default_data_dir);
    let config = NodeConfig {
        data_dir: data_dir.clone(),
        sync: args.sync,
        wall: None,
        peers: args.peers.clone(),
        registry,
        sql_limits: quire_projection_sql::Limits {
            time: std::time::Duration::from_millis(args.sql_time_limit_ms),
            rows: args.sql_max_rows,
        },
    };
    let log = node::open_log(&config)
        .with_context(|| format!("opening data directory {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick another address with --api",
                args.api
            )
        })?;
    let addr = listener.local_addr()?;
    let peer_listener = if args.no_listen {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen for peers on {}; pick another address with --listen (or --no-listen)", args.listen))?,
        )
    };
    println!("quire node {}", log.node_key());
    println!("data directory {}", data_dir.display());
    println!("client API listening on http://{addr}");
    if let Some(peer_listener) = &peer_listener {
        println!("peer listener on {}", peer_listener.local_addr()?);
    }
    std::io::stdout().flush()?;
    let shutdown = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match terminate.as_mut() { Some(signal) => { signal.recv().await; } None => std::future::pending().await } } => {},
        }
        tracing::info!("shutting down");
    };
    node::serve(&config, log, listener, peer_listener, shutdown).await?;
    Ok(())
}

pub(crate) fn verify(args: VerifyArgs) -> Result<std::process::ExitCode> {
    let data_dir = args.data_dir.unwrap_or_else(node::default_data_dir);
    let report = crate::verify::verify(&data_dir)
        .with_context(|| format!("opening {}", data_dir.display()))?;
    for line in &report.damage {
        println!("DAMAGE {line}");
    }
    println!(
        "checked {} scribes in {} streams up to seq {}: {}",
        report.scribes,
        report.streams,
        report.head,
        match report.damage.len() {
            0 => "no damage".to_string(),
            1 => "1 problem".to_string(),
            n => format!("{n} problems"),
        }
    );
    Ok(if report.damage.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}
