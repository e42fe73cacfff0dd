//! The `Log` gRPC service: append (node-signed or client-signed), get, read a range, and
//! subscribe (catch-up then live, from storage; `CaughtUp` always sent). A thin impl over
//! [`crate::log::Log`]; errors map in [`super::status`]. Server streams go through bounded channels.

// Handlers return `tonic::Status` by design; boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

use bytes::Bytes;
use quire_projection_api::Kind;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::access::{self, Caller};
use super::served::not_held;
use super::status::{append_status, blocking, invalid, projections_status, store_status};
use super::{convert, Api, ResponseStream, READ_DEFAULT_LIMIT, READ_MAX_LIMIT, SUBSCRIBE_BUFFER};
use crate::log::subscribe::{metered, LogEvent, READ_BYTES, SUBSCRIPTION_BYTES};
use crate::log::{AppendError, Appended, Draft, NewScribe, Origin};
use crate::pb;
use crate::scribe::{decode_envelope, hash, merkle, Parts, Proof, Seal, MAX_SEAL_COUNT};

fn reply(appended: Appended) -> pb::AppendReply {
    pb::AppendReply {
        id: Bytes::copy_from_slice(appended.id.as_bytes()),
        seq: appended.seq,
        duplicate: appended.duplicate,
        hlc: appended.hlc,
        held: appended.held,
    }
}

fn new_scribe(request: pb::AppendRequest) -> Result<Draft, Status> {
    let stream = convert::id_field(&request.stream, "stream")?;
    let kind: Kind = request
        .kind
        .parse()
        .map_err(|error| invalid(format!("{error}")))?;
    if kind == Kind::StreamCreate {
        return Err(invalid(
            "stream.create scribes are made by Streams.Create, not appended".into(),
        ));
    }
    crate::scribe::check_shape(
        &request.content_type,
        request.parents.len(),
        request.payload.len() as u64,
    )
    .map_err(|error| append_status(&AppendError::Scribe(error)))?;
    let parents = request
        .parents
        .iter()
        .map(|parent| convert::id_field(parent, "parent"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Draft::New(NewScribe {
        stream: Some(stream),
        kind,
        content_type: request.content_type,
        payload: request.payload,
        parents,
    }))
}

fn signed(request: pb::AppendSignedRequest) -> Result<Draft, Status> {
    let claimed_id = if request.id.is_empty() {
        None
    } else {
        Some(convert::id_field(&request.id, "id")?)
    };
    if request.envelope.is_empty() || request.seal.is_empty() {
        return Err(invalid(
            "envelope and seal are required: send the encoded quire.v1.Envelope, its payload and a quire.v1.Seal over its id".into(),
        ));
    }
    Ok(Draft::Signed {
        parts: Parts {
            envelope: request.envelope,
            payload: request.payload,
            seal: request.seal,
            proof: Proof::from_proto(request.proof)
                .map_err(|error| append_status(&AppendError::Scribe(error)))?,
            leaves: None,
            redacted_by: None,
        },
        claimed_id,
    })
}

/// The drafts of a batch the client sealed once: each envelope gets its proof in the seal's tree of
/// the batch's ids, in order. Whether the seal's root and signature match is the log's check.
///
/// The proofs cost far more memory than the envelopes they are for (a million 2-byte empty
/// envelopes would need a gigabyte of audit paths), so the cheap checks come first: the seal
/// decodes and seals exactly as many ids as the batch holds, and every envelope decodes.
fn sealed_batch(batch: pb::SealedBatch) -> Result<Vec<Draft>, Status> {
    if batch.scribes.is_empty() {
        return Err(invalid("a sealed batch needs at least one scribe".into()));
    }
    if batch.scribes.len() as u64 > MAX_SEAL_COUNT {
        return Err(invalid(format!(
            "a sealed batch holds at most {MAX_SEAL_COUNT} scribes, got {}",
            batch.scribes.len()
        )));
    }
    let seal = Seal::decode(batch.seal.clone())
        .map_err(|error| append_status(&AppendError::Scribe(error)))?;
    if seal.count != batch.scribes.len() as u64 {
        return Err(invalid(format!(
            "the seal does not cover this batch: it seals {} ids, the batch holds {} scribes",
            seal.count,
            batch.scribes.len()
        )));
    }
    for (index, unsealed) in batch.scribes.iter().enumerate() {
        decode_envelope(&unsealed.envelope).map_err(|error| {
            let status = append_status(&AppendError::Scribe(error));
            Status::new(
                status.code(),
                format!("scribes[{index}]: {}", status.message()),
            )
        })?;
    }
    let ids: Vec<_> = batch
        .scribes
        .iter()
        .map(|unsealed| hash(&unsealed.envelope))
        .collect();
    let (_, proofs) = merkle::tree(&ids);
    Ok(batch
        .scribes
        .into_iter()
        .zip(proofs)
        .map(|(unsealed, proof)| Draft::Signed {
            parts: Parts {
                envelope: unsealed.envelope,
                payload: unsealed.payload,
                seal: batch.seal.clone(),
                proof,
                leaves: None,
                redacted_by: None,
            },
            claimed_id: None,
        })
        .collect())
}

/// A client-signed genesis makes the node hold, project and serve a new stream: that is the
/// owner's call, whoever signed it.
#[allow(clippy::result_large_err)]
fn genesis_needs_owner(caller: access::Caller, drafts: &[Draft]) -> Result<(), Status> {
    if caller == access::Caller::Owner {
        return Ok(());
    }
    let creates = drafts.iter().any(|draft| match draft {
        Draft::Signed { parts, .. } => decode_envelope(&parts.envelope)
            .is_ok_and(|(body, _, _)| body.kind == Kind::StreamCreate),
        Draft::New(_) | Draft::Worked(_) => false,
    });
    if creates {
        return Err(access::Refusal::Unauthenticated(access::needs_token(
            "a stream.create (a genesis makes this node hold a new stream)",
        ))
        .status());
    }
    Ok(())
}

impl Api {
    async fn append_draft(
        &self,
        draft: Draft,
        caller: Caller,
    ) -> Result<Response<pb::AppendReply>, Status> {
        let appended = self
            .log
            .append_one(draft)
            .await
            .map_err(|error| refusal_status(&self.log, caller, &error))?;
        Ok(Response::new(reply(appended)))
    }
}

#[tonic::async_trait]
impl pb::log_server::Log for Api {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendReply>, Status> {
        // Owner-only (the access rules let no one else call it).
        self.append_draft(new_scribe(request.into_inner())?, Caller::Owner)
            .await
    }

    async fn append_signed(
        &self,
        request: Request<pb::AppendSignedRequest>,
    ) -> Result<Response<pb::AppendReply>, Status> {
        let caller = access::caller_of(&request);
        let draft = signed(request.into_inner())?;
        genesis_needs_owner(caller, std::slice::from_ref(&draft))?;
        self.append_draft(draft, caller).await
    }

    async fn append_batch(
        &self,
        request: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchReply>, Status> {
        if !request.get_ref().appends.is_empty() {
            access::require_owner(&request, "a batch with node-signed `appends`")?;
        }
        let caller = access::caller_of(&request);
        let request = request.into_inner();
        let mut drafts = Vec::with_capacity(request.appends.len() + request.signed.len());
        for (index, append) in request.appends.into_iter().enumerate() {
            drafts
                .push(new_scribe(append).map_err(|status| {
                    invalid(format!("appends[{index}]: {}", status.message()))
                })?);
        }
        for (index, append) in request.signed.into_iter().enumerate() {
            drafts.push(
                signed(append)
                    .map_err(|status| invalid(format!("signed[{index}]: {}", status.message())))?,
            );
        }
        for (index, batch) in request.sealed.into_iter().enumerate() {
            drafts.extend(sealed_batch(batch).map_err(|status| {
                Status::new(
                    status.code(),
                    format!("sealed[{index}]: {}", status.message()),
                )
            })?);
        }
        genesis_needs_owner(caller, &drafts)?;
        let appended = self
            .log
            .append(drafts, Origin::Local)
            .await
            .map_err(|error| refusal_status(&self.log, caller, &error))?;
        Ok(Response::new(pb::AppendBatchReply {
            results: appended.into_iter().map(reply).collect(),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetScribeRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let caller = access::caller_of(&request);
        let id = convert::id_field(&request.into_inner().id, "id")?;
        let log = self.log.clone();
        let found = tokio::task::spawn_blocking(move || log.get(&id))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| store_status(&error))?;
        let entry = found
            .filter(|entry| visible(&self.log, caller, entry))
            .ok_or_else(|| Status::not_found(format!("scribe {id} is not stored on this node")))?;
        Ok(Response::new(convert::entry(entry)))
    }

    type ReadStream = ResponseStream<pb::Entry>;

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let caller = request.remote_addr();
        let admitted = access::caller_of(&request);
        let request = request.into_inner();
        let stream = convert::optional_stream(&request.stream)?;
        if let Some(stream) = stream {
            match self.log.stream(&stream) {
                Some(state) if access::may_read(admitted, &state) => {}
                _ => return Err(not_held(&stream)),
            }
        }
        let limit = match request.limit {
            0 => READ_DEFAULT_LIMIT,
            limit => limit.min(READ_MAX_LIMIT),
        } as usize;
        let (entries, receiver) = metered(64, SUBSCRIPTION_BYTES, self.log.reader_share(caller));
        let log = self.log.clone();
        let mut next = request.from_seq.max(1);
        tokio::spawn(async move {
            let mut left = limit;
            while left > 0 {
                let Some(mut ticket) = entries.ticket(READ_BYTES).await else {
                    return;
                };
                let reader = log.clone();
                let chunk = left.min(1000);
                let read =
                    tokio::task::spawn_blocking(move || reader.read(stream.as_ref(), next, chunk))
                        .await;
                let batch = match read {
                    Ok(Ok(batch)) => batch,
                    Ok(Err(error)) => {
                        let _ = entries.send(Err(store_status(&error)), 0).await;
                        return;
                    }
                    Err(_) => return,
                };
                ticket.keep(batch.entries.iter().map(|e| e.parts.size() as usize).sum());
                let done = !batch.more;
                left -= batch.entries.len();
                for entry in batch.entries {
                    next = entry.seq + 1;
                    if !visible(&log, admitted, &entry) {
                        continue;
                    }
                    let size = entry.parts.size() as usize;
                    let sent = entries.send_read(Ok(convert::entry(entry)), size, &mut ticket);
                    if sent.await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(receiver)))
    }

    type SubscribeStream = ResponseStream<pb::SubscribeEvent>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        if !request.get_ref().consumer.is_empty() {
            access::require_owner(
                &request,
                "a durable consumer (its cursor is kept on the node)",
            )?;
        }
        let caller = request.remote_addr();
        let admitted = access::caller_of(&request);
        let request = request.into_inner();
        let stream = convert::optional_stream(&request.stream)?;
        if let Some(stream) = stream {
            match self.log.stream(&stream) {
                Some(state) if access::may_read(admitted, &state) => {}
                _ => return Err(not_held(&stream)),
            }
        }
        let from = if request.consumer.is_empty() {
            request.from_seq
        } else {
            if request.from_seq != 0 {
                return Err(invalid(format!(
                    "consumer {:?} resumes after its last ack; leave from_seq at 0 (or use `quire rebuild {}` to start it over)",
                    request.consumer, request.consumer
                )));
            }
            let projections = self.projections.clone();
            let consumer = request.consumer.clone();
            tokio::task::spawn_blocking(move || {
                projections.consumer_start(&consumer, stream.as_ref())
            })
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?
            .map_err(|error| projections_status(&error))?
        };
        let events = self.log.subscribe(stream, from, SUBSCRIBE_BUFFER, caller);
        let log = self.log.clone();
        let events = events.filter(move |event| match event {
            Ok(LogEvent::Entry(entry)) => visible(&log, admitted, entry),
            _ => true,
        });
        let events = events.map(|event| match event {
            Ok(LogEvent::Entry(entry)) => Ok(pb::SubscribeEvent {
                event: Some(pb::subscribe_event::Event::Scribe(convert::entry(entry))),
            }),
            Ok(LogEvent::CaughtUp(seq)) => Ok(pb::SubscribeEvent {
                event: Some(pb::subscribe_event::Event::CaughtUp(pb::CaughtUp { seq })),
            }),
            Err(error) => Err(store_status(&error)),
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckReply>, Status> {
        let request = request.into_inner();
        let projections = self.projections.clone();
        let consumer = blocking(move || projections.ack(&request.consumer, request.seq)).await?;
        Ok(Response::new(pb::AckReply {
            acked: consumer.acked,
        }))
    }
}

/// Whether `caller` may see `entry`: its stream is public, or `caller` may read it (the owner, or
/// the private stream's own app). A whole-log read or subscription skips what it may not.
fn visible(log: &crate::log::Log, caller: Caller, entry: &crate::log::store::StoredEntry) -> bool {
    if caller == Caller::Owner {
        return true;
    }
    let Ok((body, ..)) = decode_envelope(&entry.parts.envelope) else {
        return false;
    };
    let stream = body.stream.unwrap_or(entry.id);
    log.is_private(&stream)
        .is_some_and(|private| access::may_read_stream(caller, &stream, private))
}

/// The status of a refused append. A key that holds no role in a private stream, writing into it
/// as anyone but the owner or the stream's app, is told the stream is not here (as for a stream
/// this node does not hold): a refusal naming its writers would confirm the stream to a stranger
/// who guessed or overheard its id.
fn refusal_status(log: &crate::log::Log, caller: Caller, error: &AppendError) -> Status {
    let (stream, author) = match error.root() {
        AppendError::PermissionDenied { stream, author, .. }
        | AppendError::Membership { stream, author, .. } => (*stream, *author),
        _ => return append_status(error),
    };
    match log.stream(&stream) {
        Some(state)
            if !access::may_read(caller, &state)
                && !state.membership.roles().contains_key(&author) =>
        {
            not_held(&stream)
        }
        _ => append_status(error),
    }
}
