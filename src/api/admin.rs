//! The `Admin` gRPC service: the node's status (log, streams, projections, peers, memory) and
//! adding and removing peers, rotating the owner's token. A thin impl; errors map in [`super::status`].

// Handlers return `tonic::Status` by design; boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::status::blocking;
use super::{convert, Api};
use crate::log::store::PeerKeyRule;
use crate::pb;
use crate::replication::{PeerAdmission, ReplicationError};
use quire_projection_api::AuthorKey;

#[tonic::async_trait]
impl pb::admin_server::Admin for Api {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let mut payloads = Vec::new();
        if request.into_inner().payloads {
            for state in self.log.streams() {
                if let Some(plan) = self
                    .log
                    .prune_plan(&state.id)
                    .await
                    .map_err(|error| super::status::store_status(&error))?
                {
                    payloads.push(convert::stream_payloads(&plan));
                }
            }
        }
        let projections = self.projections.clone();
        let projections = blocking(move || projections.list(false)).await?;
        Ok(Response::new(pb::StatusReply {
            projections: projections.iter().map(convert::projection_status).collect(),
            node_id: self.log.node_key().to_hex(),
            data_dir: self.facts.data_dir.clone(),
            log_epoch: Bytes::copy_from_slice(&self.log.epoch()),
            head_seq: self.log.head(),
            streams: self
                .log
                .streams()
                .iter()
                .map(convert::stream_info)
                .collect(),
            listeners: self
                .facts
                .listeners
                .iter()
                .map(|(name, addr)| pb::Listener {
                    name: name.clone(),
                    addr: addr.clone(),
                })
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            hlc: self.log.clock().peek(),
            sync_writes: self.facts.sync_writes,
            rules: self.log.rules_version(),
            held_scribes: self.log.held().0,
            held_bytes: self.log.held().1,
            open_copies: self.projections.open_copies().0 as u64,
            max_open_copies: self.projections.open_copies().1 as u64,
            work_searching: self.log.work_searches().0 as u64,
            work_waiting: self.log.work_searches().1 as u64,
            payloads,
            store_memory: Some({
                let (memtables, table_readers, block_cache, pinned) = self.log.store().memory();
                pb::StoreMemory {
                    memtables,
                    table_readers,
                    block_cache,
                    pinned,
                }
            }),
            peers: self
                .replicator
                .peers()
                .iter()
                .map(convert::peer_status)
                .collect(),
        }))
    }

    async fn add_peer(
        &self,
        request: Request<pb::AddPeerRequest>,
    ) -> Result<Response<pb::AddPeerReply>, Status> {
        let addr = self
            .replicator
            .add_peer(&request.into_inner().addr)
            .map_err(|error| match error {
                ReplicationError::BadAddress(_) => Status::invalid_argument(error.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        Ok(Response::new(pb::AddPeerReply { addr }))
    }

    async fn remove_peer(
        &self,
        request: Request<pb::RemovePeerRequest>,
    ) -> Result<Response<pb::RemovePeerReply>, Status> {
        let addr = self
            .replicator
            .remove_peer(&request.into_inner().addr)
            .map_err(|error| match error {
                ReplicationError::BadAddress(_) => Status::invalid_argument(error.to_string()),
                ReplicationError::UnknownPeer(_) => Status::not_found(error.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        Ok(Response::new(pb::RemovePeerReply { addr }))
    }

    async fn allow_peer(
        &self,
        request: Request<pb::PeerKeyRequest>,
    ) -> Result<Response<pb::PeerKeysReply>, Status> {
        self.set_peer_key(request.into_inner(), PeerKeyRule::Allow)
    }

    async fn deny_peer(
        &self,
        request: Request<pb::PeerKeyRequest>,
    ) -> Result<Response<pb::PeerKeysReply>, Status> {
        self.set_peer_key(request.into_inner(), PeerKeyRule::Deny)
    }

    async fn peer_keys(
        &self,
        _request: Request<pb::PeerKeysRequest>,
    ) -> Result<Response<pb::PeerKeysReply>, Status> {
        Ok(Response::new(self.peer_keys_reply()))
    }

    async fn prove(
        &self,
        request: Request<pb::ProveRequest>,
    ) -> Result<Response<pb::ProveReply>, Status> {
        let nonce = request.into_inner().nonce;
        if !(16..=64).contains(&nonce.len()) {
            return Err(Status::invalid_argument(format!(
                "the nonce must be 16 to 64 bytes, got {}",
                nonce.len()
            )));
        }
        Ok(Response::new(pb::ProveReply {
            mac: Bytes::copy_from_slice(&self.access.token().prove(&nonce)),
        }))
    }

    async fn rotate_token(
        &self,
        _request: Request<pb::RotateTokenRequest>,
    ) -> Result<Response<pb::RotateTokenReply>, Status> {
        let access = self.access.clone();
        let token = tokio::task::spawn_blocking(move || access.rotate())
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?
            .map_err(|error| {
                Status::internal(format!("cannot write the new token file: {error}"))
            })?;
        Ok(Response::new(pb::RotateTokenReply {
            token: token.as_str().to_string(),
        }))
    }
}

impl Api {
    fn set_peer_key(
        &self,
        request: pb::PeerKeyRequest,
        rule: PeerKeyRule,
    ) -> Result<Response<pb::PeerKeysReply>, Status> {
        let key = AuthorKey::from_slice(&request.node_id).map_err(|_| {
            Status::invalid_argument(format!(
                "node_id must be a 32-byte Ed25519 node key, got {} bytes",
                request.node_id.len()
            ))
        })?;
        self.replicator
            .set_peer_key(key, rule)
            .map_err(|error| Status::internal(error.to_string()))?;
        Ok(Response::new(self.peer_keys_reply()))
    }

    fn peer_keys_reply(&self) -> pb::PeerKeysReply {
        let (admission, keys) = self.replicator.peer_keys();
        pb::PeerKeysReply {
            admission: match admission {
                PeerAdmission::Open => "open",
                PeerAdmission::Known => "known",
            }
            .to_string(),
            accept_streams: self.log.accept_streams().to_string(),
            keys: keys
                .into_iter()
                .map(|(key, rule)| pb::PeerKey {
                    node_id: Bytes::copy_from_slice(key.as_bytes()),
                    allowed: rule == PeerKeyRule::Allow,
                })
                .collect(),
        }
    }
}
