//! `quire join`, `status`, `peer` and `token`: the node, its peers, the streams it joins and
//! the owner's token, over the `Admin` and `Streams` services.

use anyhow::Result;
use bytes::Bytes;

use super::client::{channel, status_error, streams_client, Node};
use super::JoinArgs;
use crate::pb;
use quire_projection_api::AuthorKey;

pub(crate) async fn join(url: &Node, args: JoinArgs) -> Result<()> {
    let mut client = streams_client(url).await?;
    if args.cancel {
        client
            .cancel_join(pb::CancelJoinRequest {
                stream: Bytes::copy_from_slice(args.stream.as_bytes()),
            })
            .await
            .map_err(status_error)?;
        println!("the join of {} is cancelled", args.stream);
        return Ok(());
    }
    let info = client
        .join(pb::JoinStreamRequest {
            stream: Bytes::copy_from_slice(args.stream.as_bytes()),
            timeout_ms: args.timeout.saturating_mul(1000),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "joined {} ({}); catching up from peers — `quire status` shows progress",
        hex::encode(&info.stream),
        info.name
    );
    Ok(())
}

fn print_peers(peers: &[pb::PeerStatus], rules: u32) {
    if peers.is_empty() {
        println!("no peers; add one with `quire peer add HOST:PORT`");
    }
    for peer in peers {
        println!(
            "peer {:<22} {} {}{}",
            peer.addr,
            if peer.connected {
                "connected   "
            } else {
                "disconnected"
            },
            if peer.node_id.is_empty() {
                "node ?".to_string()
            } else {
                format!("node {}", &peer.node_id[..16])
            },
            if peer.dialed { "" } else { " (dialed in)" },
        );
        if peer.rules != 0 && peer.rules != rules {
            println!(
                "    judges scribes by rules version {} (this node: {}); what this node's rules refuse of it is kept aside",
                peer.rules, rules
            );
        }
        if peer.refused > 0 {
            println!("    refused {} invalid scribes", peer.refused);
        }
        if !peer.last_error.is_empty() {
            println!("    last error: {}", peer.last_error);
        }
        for stream in &peer.streams {
            println!(
                "    stream {}  cursor {}  lag {}  sent {}  received {}  duplicates {}  refused {}{}{}{}",
                hex::encode(&stream.stream),
                stream.cursor,
                stream.lag,
                stream.sent,
                stream.received,
                stream.duplicates,
                stream.refused,
                if stream.held > 0 { format!("  held (dated ahead) {}", stream.held) } else { String::new() },
                if stream.redacted_refused > 0 { format!("  redacted payloads refused {}", stream.redacted_refused) } else { String::new() },
                if stream.caught_up { "  caught up" } else { "" }
            );
        }
    }
}

/// The node's `Admin.Status`.
async fn node_status(url: &Node, payloads: bool) -> Result<pb::StatusReply> {
    let mut client = pb::admin_client::AdminClient::new(channel(url).await?);
    Ok(client
        .status(pb::StatusRequest { payloads })
        .await
        .map_err(status_error)?
        .into_inner())
}

pub(crate) async fn status(url: &Node) -> Result<()> {
    let status = node_status(url, true).await?;
    println!("node        {}", status.node_id);
    println!("version     {}", status.version);
    println!("data dir    {}", status.data_dir);
    println!("log epoch   {}", hex::encode(&status.log_epoch));
    println!("head seq    {}", status.head_seq);
    println!("rules       version {}", status.rules);
    println!(
        "writes      {}",
        if status.sync_writes {
            "fsync per group commit (--sync)"
        } else {
            "survive a process crash; a power loss may take the newest (peers give back what they hold)"
        }
    );
    if status.held_scribes > 0 {
        println!(
            "held        {} scribes ({} KiB) dated ahead of this node's clock, kept aside until it catches up",
            status.held_scribes,
            status.held_bytes / 1024
        );
    }
    for listener in &status.listeners {
        println!("listener    {:<6} {}", listener.name, listener.addr);
    }
    println!(
        "copies      {} projection slots open of at most {} (quiet ones are closed, reopened when used)",
        status.open_copies, status.max_open_copies
    );
    if status.work_searching + status.work_waiting > 0 {
        println!(
            "work        {} node-signed appends searching for a work token, {} waiting for a turn",
            status.work_searching, status.work_waiting
        );
    }
    if let Some(memory) = &status.store_memory {
        println!(
            "store memory {} KiB memtables, {} KiB table readers, {} KiB block cache ({} KiB pinned)",
            memory.memtables / 1024,
            memory.table_readers / 1024,
            memory.block_cache / 1024,
            memory.pinned / 1024
        );
    }
    println!("streams     {}", status.streams.len());
    for info in &status.streams {
        println!(
            "  {}  {:<20} {:>8} scribes  head seq {}",
            hex::encode(&info.stream),
            info.name,
            info.scribes,
            info.head_seq
        );
    }
    println!("payloads    live and reclaimable by each stream's retention rule");
    for payloads in &status.payloads {
        println!("  {}", super::stream::payloads_line(payloads, false));
    }
    println!("projections {}", status.projections.len());
    for projection in &status.projections {
        let scope = if projection.stream.is_empty() {
            "log".to_string()
        } else {
            hex::encode(&projection.stream[..4])
        };
        let mut state = format!(
            "checkpoint {} lag {}",
            projection.checkpoint, projection.lag
        );
        if projection.quarantined > 0 {
            state.push_str(&format!(", {} parked", projection.quarantined));
        }
        if projection.rebuild.is_some() {
            state.push_str(", rebuilding");
        }
        if !projection.halted.is_empty() {
            state.push_str(&format!(", HALTED at seq {}", projection.halted_seq));
        }
        if !projection.error.is_empty() {
            state.push_str(&format!(", FAILING: {}", projection.error));
        }
        println!(
            "  {:<20} {:<9} {:<9} {state}",
            projection.name, projection.kind, scope
        );
    }
    print_peers(&status.peers, status.rules);
    Ok(())
}

pub(crate) async fn peer_add(url: &Node, addr: String) -> Result<()> {
    let mut client = pb::admin_client::AdminClient::new(channel(url).await?);
    let reply = client
        .add_peer(pb::AddPeerRequest { addr })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "peer {} added; it is dialed now and after every restart",
        reply.addr
    );
    Ok(())
}

pub(crate) async fn peer_list(url: &Node) -> Result<()> {
    let status = node_status(url, false).await?;
    print_peers(&status.peers, status.rules);
    let mut client = pb::admin_client::AdminClient::new(channel(url).await?);
    let keys = client
        .peer_keys(pb::PeerKeysRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    print_peer_keys(&keys);
    Ok(())
}

/// `quire peer allow` (`allow`) or `quire peer deny`.
pub(crate) async fn peer_key(url: &Node, node: AuthorKey, allow: bool) -> Result<()> {
    let mut client = pb::admin_client::AdminClient::new(channel(url).await?);
    let request = pb::PeerKeyRequest {
        node_id: Bytes::copy_from_slice(node.as_bytes()),
    };
    let reply = if allow {
        client.allow_peer(request).await
    } else {
        client.deny_peer(request).await
    }
    .map_err(status_error)?
    .into_inner();
    if allow {
        println!("node {node} is allowed to replicate with this node");
    } else {
        println!("node {node} is denied: its connections ended and it is refused from now on");
    }
    print_peer_keys(&reply);
    Ok(())
}

fn print_peer_keys(keys: &pb::PeerKeysReply) {
    match keys.admission.as_str() {
        "known" => {
            println!("peers: known only (--peers known): these node keys may replicate, no other")
        }
        _ => println!("peers: open (--peers open): any node key may replicate but those denied"),
    }
    match keys.accept_streams.as_str() {
        "known" => println!(
            "streams: known owners only (--accept-streams known): this node's and the allowed keys'"
        ),
        _ => println!("streams: any (--accept-streams any)"),
    }
    for key in &keys.keys {
        println!(
            "  {} {}",
            if key.allowed { "allow" } else { "deny " },
            hex::encode(&key.node_id)
        );
    }
}

pub(crate) async fn peer_remove(url: &Node, addr: String) -> Result<()> {
    let mut client = pb::admin_client::AdminClient::new(channel(url).await?);
    let reply = client
        .remove_peer(pb::RemovePeerRequest { addr })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("peer {} removed; it is no longer dialed", reply.addr);
    Ok(())
}

pub(crate) async fn token_rotate(
    url: &Node,
    data_dir: &std::path::Path,
    print: bool,
) -> Result<()> {
    let mut client = pb::admin_client::AdminClient::new(channel(url).await?);
    let reply = client
        .rotate_token(pb::RotateTokenRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if print {
        println!("{}", reply.token);
    } else {
        println!(
            "the owner's token is replaced; the node wrote the new one to api.token in its data directory{}",
            if data_dir.join(crate::api::access::TOKEN_FILE).exists() {
                format!(" ({})", data_dir.display())
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
