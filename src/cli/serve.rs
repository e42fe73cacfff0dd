//! `quire serve` and `quire verify`: the commands that open a data directory themselves (the
//! others are gRPC clients of a running node).

use std::io::{IsTerminal, Write as _};
use std::path::Path;

use anyhow::{Context, Result};

use super::ServeArgs;
use crate::net::ConnectionLimits;
use crate::node::{self, NodeConfig};
use crate::projection::Registry;

pub(crate) async fn serve(args: ServeArgs, data_dir: &Path, registry: Registry) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIRE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let data_dir = data_dir.to_path_buf();
    check_api_exposure(&args)?;
    raise_open_files_limit();
    let config = NodeConfig {
        data_dir: data_dir.clone(),
        api_hosts: args.api_hosts.clone(),
        api_tls: args.api_tls_cert.clone().zip(args.api_tls_key.clone()),
        sync: args.sync,
        wall: None,
        peers: args.peers.clone(),
        registry,
        sql_limits: quire_projection_sql::Limits {
            time: std::time::Duration::from_millis(args.sql_time_limit_ms),
            rows: args.sql_max_rows,
        },
        api_limits: ConnectionLimits {
            max_connections: args.max_api_connections as usize,
            max_per_address: args.max_api_connections_per_address as usize,
            ..ConnectionLimits::API
        },
        peer_limits: ConnectionLimits {
            max_connections: args.max_peer_connections as usize,
            max_per_address: args.max_peer_connections_per_address as usize,
            ..ConnectionLimits::PEER
        },
        // After raising the open-files limit: the budget is its shares.
        fds: crate::fds::FdBudget::from_limit(),
        rules: None,
        without_access_checks: None,
        accept_streams: args.accept_streams,
        prune_every: (args.prune_every > 0)
            .then(|| std::time::Duration::from_millis(args.prune_every)),
        peer_options: crate::replication::PeerOptions {
            admission: args.peer_admission,
            ..crate::replication::PeerOptions::new()
                .map_err(|error| anyhow::anyhow!("the peer transport's TLS identity: {error}"))?
        },
    };
    let log = node::open_log(&config)
        .with_context(|| format!("opening data directory {}", data_dir.display()))?;
    // Made before the API listens, so a client that sees the address finds the token.
    crate::api::access::Token::load_or_create(&data_dir).with_context(|| {
        format!(
            "the owner's token file {}",
            data_dir.join(crate::api::access::TOKEN_FILE).display()
        )
    })?;
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
    let scheme = if args.api_tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    println!("client API listening on {scheme}://{addr}");
    println!(
        "owner's token in {} (the CLI reads it there)",
        data_dir.join(crate::api::access::TOKEN_FILE).display()
    );
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

/// Refuses an API address others can reach unless `--insecure-api` says so (and then warns).
fn check_api_exposure(args: &ServeArgs) -> Result<()> {
    if args.api.ip().is_loopback() || args.api_tls_cert.is_some() {
        return Ok(());
    }
    if !args.insecure_api {
        anyhow::bail!(
            "--api {} can be reached from other machines, and without TLS the owner's token would cross the network in clear text. Keep it on 127.0.0.1, serve TLS (--api-tls-cert/--api-tls-key), or pass --insecure-api (e.g. behind a TLS-terminating proxy)",
            args.api
        );
    }
    eprintln!(
        "warning: the client API on {} is reachable from other machines without TLS (--insecure-api): the owner's token and every answer cross the network in clear text",
        args.api
    );
    Ok(())
}

/// Raises the soft limit of open files to the hard limit: every stream keeps its projection
/// copies open (about 11 descriptors a stream), and the common soft default of 1,024 would stop a
/// node of about 100 streams.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let below = match (limit.current, limit.maximum) {
        (Some(current), Some(maximum)) => current < maximum,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if !below {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(
            from = ?limit.current,
            to = ?limit.maximum,
            "raised the open files limit to the hard limit"
        ),
        Err(error) => {
            tracing::warn!(%error, current = ?limit.current, "could not raise the open files limit")
        }
    }
}

pub(crate) fn verify(data_dir: &Path) -> Result<std::process::ExitCode> {
    let report = crate::verify::verify(data_dir)
        .with_context(|| format!("opening {}", data_dir.display()))?;
    for line in &report.damage {
        println!("DAMAGE {line}");
    }
    println!(
        "checked {} scribes in {} streams up to seq {}{}{}{}: {}",
        report.scribes,
        report.streams,
        report.head,
        match report.vacated {
            0 => String::new(),
            n => format!(" ({n} seqs vacated by leaving their streams)"),
        },
        match report.redacted {
            0 => String::new(),
            n => format!(" ({n} payloads redacted)"),
        },
        match report.pruned {
            0 => String::new(),
            n => format!(" ({n} payloads pruned)"),
        },
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
