//! quire's integration tests: one binary, real RocksDB, real nodes on `127.0.0.1:0`, real child
//! processes where a crash must be real. `common` starts nodes and waits on conditions; nothing here
//! sleeps to synchronise.

mod access;
mod api;
mod attack_access;
mod attack_acl;
mod attack_clock;
mod attack_defaults;
mod attack_format;
mod attack_kv_retention;
mod attack_leave;
mod attack_live;
mod attack_load;
mod attack_load2;
mod attack_quota;
mod attack_redact;
mod attack_retention;
mod browser;
mod clock;
mod common;
mod consumer;
mod crash;
mod files;
mod format;
mod hostile;
mod kv;
mod leave;
mod live;
mod malicious;
mod peer_trust;
mod power;
mod private;
mod projections;
mod python;
mod quota;
mod redact;
mod replication;
mod retention;
mod scribe;
mod simulation;
mod sql;
mod subscribe;
mod tidy;
mod verify;
mod versions;
mod ws;
