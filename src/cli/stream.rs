//! `quire stream`, `append`, `get` and `log`: streams and their scribes, over the `Streams` and
//! `Log` services.

use std::io::{IsTerminal, Read as _, Write as _};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use quire_projection_api::{AuthorKey, Kind, ScribeId};

use super::client::Node;
use super::client::{log_client, status_error, streams_client};
use super::{
    AclCommand, AppendArgs, GetArgs, LogArgs, PruneArgs, RedactArgs, RetainArgs, StreamCommand,
};
use crate::membership::Role;
use crate::pb;

fn parse_allow(rule: &str) -> Result<pb::KindRule> {
    let (kind, who) = rule
        .split_once('=')
        .with_context(|| format!("--allow {rule:?}: write KIND=WHO, e.g. file.put=anyone"))?;
    crate::genesis::check_rule_kind(kind).with_context(|| format!("--allow {rule:?}"))?;
    let mut authors = pb::Authors::default();
    for part in who
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        match part {
            "anyone" => authors.anyone = true,
            "owner" => authors.owner = true,
            "writers" => authors.writers = true,
            key => {
                let key: AuthorKey = key.parse().with_context(|| {
                    format!(
                        "--allow {rule:?}: {key:?} is not anyone, owner, writers or a 64-hex key"
                    )
                })?;
                authors.keys.push(Bytes::copy_from_slice(key.as_bytes()));
            }
        }
    }
    Ok(pb::KindRule {
        kind: kind.to_string(),
        authors: Some(authors),
    })
}

pub(crate) async fn stream(url: &Node, command: StreamCommand) -> Result<()> {
    let mut client = streams_client(url).await?;
    match command {
        StreamCommand::Create(args) => {
            let policy = pb::Policy {
                rules: args
                    .allow
                    .iter()
                    .map(|rule| parse_allow(rule))
                    .collect::<Result<_>>()?,
                max_file_bytes: args.max_file_bytes.unwrap_or(0),
                max_stream_bytes: args.max_stream_bytes.unwrap_or(0),
                leasing_disabled: args.no_leasing,
                lease_ms: args.lease_secs.map_or(0, |secs| secs.saturating_mul(1000)),
                work_bits: args.work_bits,
                author_max_bytes: args.author_max_bytes.unwrap_or(0),
                author_max_scribes_per_day: args.author_max_scribes_per_day.unwrap_or(0),
                // The node writes the newest defaults into every stream it creates.
                defaults_version: 0,
            };
            let mut members = std::collections::BTreeMap::new();
            for (keys, role) in [
                (&args.readers, Role::Reader),
                (&args.writers, Role::Writer),
                (&args.admins, Role::Admin),
            ] {
                for key in keys {
                    if let Some(other) = members.insert(*key, role) {
                        bail!("{key} is given two roles ({other} and {role}): give each key one");
                    }
                }
            }
            let access = (args.private || !members.is_empty())
                .then(|| crate::genesis::access_to_proto(args.private, &members));
            let info = client
                .create(pb::CreateStreamRequest {
                    name: args.name,
                    policy: Some(policy),
                    owner: args
                        .owner
                        .map(|key| Bytes::copy_from_slice(key.as_bytes()))
                        .unwrap_or_default(),
                    access,
                    retention: Some(args.retention.to_proto()),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", hex::encode(&info.stream));
        }
        StreamCommand::List => {
            let streams = client
                .list(pb::ListStreamsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .streams;
            if streams.is_empty() {
                println!("no streams; create one with `quire stream create NAME`");
            }
            for info in streams {
                println!(
                    "{}  {:<20} {:>8} scribes  head seq {}",
                    hex::encode(&info.stream),
                    info.name,
                    info.scribes,
                    info.head_seq
                );
            }
        }
        StreamCommand::Get { stream } => {
            let info = client
                .get(pb::GetStreamRequest {
                    stream: Bytes::copy_from_slice(stream.as_bytes()),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_stream(&info);
        }
        StreamCommand::Leave { stream, yes } => {
            let id = Bytes::copy_from_slice(stream.as_bytes());
            let info = client
                .get(pb::GetStreamRequest { stream: id.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            if !yes {
                confirm_leave(&info)?;
            }
            let left = client
                .leave(pb::LeaveStreamRequest { stream: id })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "left {} ({}): deleted {} scribes, {} payloads ({} bytes), {} seals and {} projection copies",
                stream, info.name, left.scribes, left.payloads, left.payload_bytes, left.seals, left.projections
            );
            if !left.rebuilding.is_empty() {
                println!(
                    "rebuilding whole-log projections without it: {} (`quire projections` shows progress)",
                    left.rebuilding.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// Asks on the terminal before a leave; refuses when stdin is not a terminal.
fn confirm_leave(info: &pb::StreamInfo) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    let what = format!(
        "leave stream {} ({}) and delete this node's {} scribes of it and its projections?",
        hex::encode(&info.stream),
        info.name,
        info.scribes
    );
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("refusing to {what} Pass --yes to confirm (stdin is not a terminal)");
    }
    print!("{}{} [y/N] ", what[..1].to_uppercase(), &what[1..]);
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        anyhow::bail!("not confirmed: nothing was deleted");
    }
    Ok(())
}

fn print_stream(info: &pb::StreamInfo) {
    println!("stream      {}", hex::encode(&info.stream));
    println!(
        "access      {} ({} members; `quire acl list` names them)",
        if info.private { "private" } else { "public" },
        info.members.len()
    );
    println!("name        {}", info.name);
    println!("owner       {}", hex::encode(&info.owner));
    println!(
        "scribes     {} ({} bytes), genesis at seq {}, newest at seq {}",
        info.scribes, info.bytes, info.genesis_seq, info.head_seq
    );
    println!(
        "retention   {}",
        crate::genesis::describe_retention(&info.retention.unwrap_or_default())
    );
    if let Some(policy) = &info.policy {
        println!(
            "limits      {} bytes per scribe, {} bytes per stream",
            policy.max_file_bytes, policy.max_stream_bytes
        );
        println!(
            "leasing     {}",
            if policy.leasing_disabled {
                "off (last writer wins)".to_string()
            } else {
                format!("on, {} s", policy.lease_ms / 1000)
            }
        );
        println!("work bits   {}", policy.work_bits);
        if let Ok(mut decoded) = crate::genesis::policy_from_proto(policy.clone()) {
            decoded.private = info.private;
            let defaults: Vec<String> = [
                ("file.*", Kind::FilePut),
                ("record.*", Kind::RecordAdd),
                ("kv.*", Kind::KvSet),
                ("x.*", Kind::Custom("x.*".into())),
            ]
            .iter()
            .map(|(name, kind)| format!("{name} {}", decoded.default_authors(kind)))
            .collect();
            println!("defaults    {} (where no rule says)", defaults.join("; "));
        }
        if policy.author_max_bytes > 0 || policy.author_max_scribes_per_day > 0 {
            let quota = |value: u64| {
                if value == 0 {
                    "no limit".to_string()
                } else {
                    value.to_string()
                }
            };
            println!(
                "per author  {} bytes, {} scribes a day (the owner is exempt)",
                quota(policy.author_max_bytes),
                quota(policy.author_max_scribes_per_day)
            );
        }
        for rule in &policy.rules {
            let authors = rule.authors.clone().unwrap_or_default();
            let mut who = Vec::new();
            if authors.anyone {
                who.push("anyone".to_string());
            }
            if authors.owner {
                who.push("owner".to_string());
            }
            who.extend(authors.keys.iter().map(hex::encode));
            if authors.writers {
                who.push("writers".to_string());
            }
            println!(
                "allow       {} = {}",
                rule.kind,
                if who.is_empty() {
                    "nobody".to_string()
                } else {
                    who.join(",")
                }
            );
        }
    }
}

pub(crate) async fn acl(url: &Node, command: AclCommand) -> Result<()> {
    use prost::Message as _;
    let (stream, kind, payload, said) = match command {
        AclCommand::Excluded { stream, limit } => {
            let reply = streams_client(url)
                .await?
                .excluded(pb::ExcludedRequest {
                    stream: Bytes::copy_from_slice(stream.as_bytes()),
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if reply.scribes.is_empty() {
                println!("no scribe of {stream} is excluded");
            }
            for scribe in &reply.scribes {
                println!(
                    "seq {:<8} {} {:<12} by {} (hlc {})",
                    scribe.seq,
                    hex::encode(&scribe.id),
                    scribe.kind,
                    hex::encode(&scribe.author),
                    scribe.hlc
                );
            }
            if reply.more {
                println!("... and more (raise --limit)");
            }
            return Ok(());
        }
        AclCommand::List { stream } => {
            let info = streams_client(url)
                .await?
                .get(pb::GetStreamRequest {
                    stream: Bytes::copy_from_slice(stream.as_bytes()),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_members(&info);
            return Ok(());
        }
        AclCommand::Grant { stream, key, role } => (
            stream,
            "acl.grant",
            pb::AclGrant {
                key: Bytes::copy_from_slice(key.as_bytes()),
                role: role.to_proto(),
            }
            .encode_to_vec(),
            format!("{key} is now a {role} of {stream}"),
        ),
        AclCommand::Revoke { stream, key } => (
            stream,
            "acl.revoke",
            pb::AclRevoke {
                key: Bytes::copy_from_slice(key.as_bytes()),
            }
            .encode_to_vec(),
            format!("{key} holds no role in {stream} from now on (what it received stays with it)"),
        ),
    };
    let reply = log_client(url)
        .await?
        .append(pb::AppendRequest {
            stream: Bytes::copy_from_slice(stream.as_bytes()),
            kind: kind.to_string(),
            content_type: crate::membership::ACL_CONTENT_TYPE.to_string(),
            payload: Bytes::from(payload),
            parents: vec![],
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "{said} (scribe {}, seq {})",
        hex::encode(&reply.id),
        reply.seq
    );
    Ok(())
}

fn print_members(info: &pb::StreamInfo) {
    println!(
        "{} stream {}",
        if info.private { "private" } else { "public" },
        hex::encode(&info.stream)
    );
    for member in &info.members {
        let role = Role::from_proto(member.role).map_or("?", Role::as_str);
        println!("  {role:<6} {}", hex::encode(&member.key));
    }
}

pub(crate) async fn append(url: &Node, args: AppendArgs) -> Result<()> {
    let payload = match (&args.data, &args.file) {
        (Some(data), _) => data.clone().into_bytes(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buffer = Vec::new();
            std::io::stdin().read_to_end(&mut buffer)?;
            buffer
        }
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => Vec::new(),
    };
    let mut client = log_client(url).await?;
    let reply = client
        .append(pb::AppendRequest {
            stream: Bytes::copy_from_slice(args.stream.as_bytes()),
            kind: args.kind,
            content_type: args.content_type,
            payload: Bytes::from(payload),
            parents: args
                .parents
                .iter()
                .map(|id| Bytes::copy_from_slice(id.as_bytes()))
                .collect(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "{} seq {}{}",
        hex::encode(&reply.id),
        reply.seq,
        if reply.duplicate {
            " (already stored)"
        } else {
            ""
        }
    );
    Ok(())
}

pub(crate) async fn get(url: &Node, args: GetArgs) -> Result<()> {
    let mut client = log_client(url).await?;
    let entry = client
        .get(pb::GetScribeRequest {
            id: Bytes::copy_from_slice(args.id.as_bytes()),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    // Verify what the node sent instead of trusting it: envelope, payload, proof and seal.
    let parts = crate::scribe::Parts {
        envelope: entry.envelope.clone(),
        payload: entry.payload.clone(),
        seal: entry.seal.clone(),
        proof: crate::scribe::Proof::from_proto(entry.proof.clone())
            .context("the node sent a malformed proof")?,
        leaves: None,
        redacted_by: (!entry.redacted_by.is_empty()).then(|| entry.redacted_by.clone()),
    };
    let scribe = crate::scribe::Scribe::decode_claimed(parts, args.id)
        .context("the node sent a scribe that does not verify")?;
    if args.payload {
        std::io::stdout().write_all(&scribe.body.payload)?;
        return Ok(());
    }
    println!("id            {}", args.id);
    println!("seq           {}", entry.seq);
    println!("stream        {}", scribe.stream_id());
    println!("kind          {}", scribe.body.kind);
    println!("author        {}", scribe.body.author);
    println!(
        "hlc           {} (unix ms {}, counter {})",
        scribe.body.hlc,
        scribe.body.hlc >> 16,
        scribe.body.hlc & 0xffff
    );
    println!("content type  {}", scribe.body.content_type);
    println!(
        "size          {} bytes ({} envelope, {} payload)",
        scribe.size(),
        scribe.envelope.len(),
        scribe.body.payload.len()
    );
    println!(
        "seal          {} (verified; covers {} scribe{}, this one at {})",
        hex::encode(&scribe.seal.id[..8]),
        scribe.seal.count,
        if scribe.seal.count == 1 { "" } else { "s" },
        scribe.proof.index
    );
    for parent in &scribe.body.parents {
        println!("parent        {parent}");
    }
    if let Some(redaction) = &scribe.redacted_by {
        let sealed = <crate::pb::SealedScribe as prost::Message>::decode(redaction.clone()).ok();
        let by = sealed
            .as_ref()
            .map(|sealed| crate::scribe::hash(&sealed.envelope).to_string())
            .unwrap_or_else(|| "an undecodable scribe".into());
        let pruned = sealed
            .and_then(|sealed| crate::scribe::decode_stored_envelope(&sealed.envelope).ok())
            .is_some_and(|(body, ..)| body.kind == Kind::Prune);
        println!(
            "payload       {} by {by} ({} bytes deleted)",
            if pruned {
                "pruned (the stream's retention rule)"
            } else {
                "redacted"
            },
            scribe.payload_len
        );
        return Ok(());
    }
    match std::str::from_utf8(&scribe.body.payload) {
        Ok(text) if scribe.body.kind != Kind::StreamCreate => println!("payload       {text}"),
        _ => println!(
            "payload       ({} bytes; `quire get --payload` writes them raw)",
            scribe.body.payload.len()
        ),
    }
    Ok(())
}

pub(crate) async fn redact(url: &Node, args: RedactArgs) -> Result<()> {
    let mut client = streams_client(url).await?;
    let reply = client
        .redact(pb::RedactRequest {
            stream: Bytes::copy_from_slice(args.stream.as_bytes()),
            target: Bytes::copy_from_slice(args.id.as_bytes()),
            reason: args.reason,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "redacted {} by {} at seq {}: its payload is gone from this node's disk; every node holding the stream deletes it when the redaction reaches it",
        args.id,
        hex::encode(&reply.id),
        reply.seq
    );
    Ok(())
}

pub(crate) async fn retain(url: &Node, args: RetainArgs) -> Result<()> {
    let mut client = streams_client(url).await?;
    let retention = args.retention.to_proto();
    let reply = client
        .retain(pb::RetainRequest {
            stream: Bytes::copy_from_slice(args.stream.as_bytes()),
            retention: Some(retention),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "stream {} retains: {} (retain scribe {} at seq {}); the owner's node prunes by it from now on",
        args.stream,
        crate::genesis::describe_retention(&retention),
        hex::encode(&reply.id),
        reply.seq
    );
    Ok(())
}

pub(crate) async fn prune(url: &Node, args: PruneArgs) -> Result<()> {
    let mut client = streams_client(url).await?;
    let reply = client
        .prune(pb::PruneRequest {
            stream: args
                .stream
                .map(|id| Bytes::copy_from_slice(id.as_bytes()))
                .unwrap_or_default(),
            dry_run: args.dry_run,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    for stream in &reply.streams {
        println!("{}", payloads_line(stream, args.dry_run));
    }
    Ok(())
}

/// One stream's payloads and retention, for `quire prune` and `quire status`.
pub(crate) fn payloads_line(stream: &pb::StreamPayloads, dry_run: bool) -> String {
    let rule = stream.retention.unwrap_or_default();
    let mut line = format!(
        "{}  {}: live {} payloads ({}), reclaimable {} ({})",
        hex::encode(&stream.stream),
        crate::genesis::describe_retention(&rule),
        stream.live_payloads,
        human_bytes(stream.live_bytes),
        stream.reclaimable_payloads,
        human_bytes(stream.reclaimable_bytes),
    );
    if stream.pruned_payloads > 0 {
        line += &format!(
            ", pruned {} ({})",
            stream.pruned_payloads,
            human_bytes(stream.pruned_bytes)
        );
    }
    if stream.redacted_payloads > 0 {
        line += &format!(
            ", redacted {} ({})",
            stream.redacted_payloads,
            human_bytes(stream.redacted_bytes)
        );
    }
    if stream.pruned_now > 0 {
        line += &format!(
            "; pruned now {} ({}), gone from this node's disk",
            stream.pruned_now,
            human_bytes(stream.pruned_now_bytes)
        );
    } else if dry_run && stream.reclaimable_payloads > 0 {
        line += if stream.owner_here {
            "; `quire prune` reclaims them now"
        } else {
            "; the owner's key is not on this node: they go when the owner's node prunes them"
        };
    } else if !stream.owner_here && stream.reclaimable_payloads > 0 {
        line += "; the owner's key is not on this node: they go when the owner's node prunes them";
    }
    line
}

/// Bytes for people: 512 B, 1.5 KiB, 3.2 MiB, 1.1 GiB.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub(crate) async fn log(url: &Node, args: LogArgs) -> Result<()> {
    let stream = if args.stream == "all" {
        Bytes::new()
    } else {
        let id: ScribeId = args
            .stream
            .parse()
            .with_context(|| format!("{:?} is neither a stream id nor `all`", args.stream))?;
        Bytes::copy_from_slice(id.as_bytes())
    };
    let mut client = log_client(url).await?;
    let mut events = client
        .subscribe(pb::SubscribeRequest {
            stream,
            from_seq: args.from,
            consumer: String::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let colour = stdout.is_terminal();
    while let Some(event) = events.message().await.map_err(status_error)? {
        match event.event {
            Some(pb::subscribe_event::Event::Scribe(entry)) => {
                writeln!(
                    stdout,
                    "{:>8}  {}  {:<14} {}  {} B",
                    entry.seq,
                    hex::encode(&entry.id),
                    entry.kind,
                    hex::encode(entry.author.get(..4).unwrap_or_default()),
                    entry.envelope.len() + entry.payload.len()
                )?;
            }
            Some(pb::subscribe_event::Event::CaughtUp(caught_up)) => {
                if colour {
                    writeln!(
                        stdout,
                        "\x1b[2m-- caught up at seq {} --\x1b[0m",
                        caught_up.seq
                    )?;
                } else {
                    writeln!(stdout, "caught up at seq {}", caught_up.seq)?;
                }
                if !args.follow {
                    return Ok(());
                }
            }
            None => {}
        }
        stdout.flush()?;
    }
    if args.follow {
        bail!("the node closed the subscription (shutting down?)");
    }
    Ok(())
}
