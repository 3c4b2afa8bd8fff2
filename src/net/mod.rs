//! The network path: volumes served by `pohmelfs store` servers and reached
//! by the daemon over the wire protocol. It sits beside the local stores
//! and depends on the store seam, never the other way round
//! (`device → fs → writeback → store ← net`).
//!
//! * `proto` — frames, messages, their validation and the authenticated
//!   handshake (`docs/protocol.md`);
//! * `client` — the `pohmel://` client: a [`crate::store::Store`] for reads,
//!   and the sending of transactions with their resends;
//! * `sink` — the client as the write-back layer's
//!   [`crate::store::sink::Sink`];
//! * `server` — `pohmelfs store`, which serves local volumes to clients;
//! * `credentials` — who may open which volume (secrets never print);
//! * `tls` — TLS around the frames: the server's certificate, the client's
//!   CA file or pinned certificate.

pub mod buffers;
pub mod client;
#[cfg(test)]
mod conformance_tests;
pub mod credentials;
pub mod proto;
pub mod server;
pub mod sink;
pub mod tls;

use std::sync::Arc;

use crate::store::{OpenError, Store, StoreError};

/// Open any store by URL, without the write-back layer: `pohmel://` store
/// servers through [`client`], every other scheme through
/// [`crate::store::open`]. A `pohmel://` volume is claimed for writing
/// (`docs/protocol.md`, "Writer claim"). The daemon opens its store through
/// [`crate::writeback::open`] instead, which puts the layer in front.
pub fn open(url: &str) -> Result<Arc<dyn Store>, OpenError> {
    if !url.starts_with("pohmel:") {
        return crate::store::open(url);
    }
    let cfg = client::RemoteConfig::from_url(url)?;
    let connect = |source: StoreError| OpenError::Connect {
        url: url.to_string(),
        source,
    };
    let store = client::RemoteStore::connect(cfg).map_err(connect)?;
    // A tool that opens a volume may write to it: it claims the volume,
    // which is refused while a daemon serves it.
    store.claim(false).map_err(|e| claim_error(url, e))?;
    Ok(Arc::new(store))
}

/// How a store server's refusal of a claim (`ErrorCode::WriterAlive`)
/// begins; the writer's session and address follow.
pub const WRITER_ALIVE: &str = "the volume's writer is alive: ";

/// A failed claim of `url` as an open error: a live writer as
/// [`OpenError::Claimed`], which a migration's open waits on.
pub fn claim_error(url: &str, e: client::ClaimError) -> OpenError {
    match e {
        client::ClaimError::WriterAlive(writer) => OpenError::Claimed {
            url: redact_url(url),
            writer,
        },
        client::ClaimError::Store(source) => OpenError::Connect {
            url: url.to_string(),
            source,
        },
    }
}

/// As [`open`], without claiming a `pohmel://` volume: for reading only
/// (its writes are refused unless this session claimed the volume).
pub fn open_reader(url: &str) -> Result<Arc<dyn Store>, OpenError> {
    if !url.starts_with("pohmel:") {
        return crate::store::open(url);
    }
    let cfg = client::RemoteConfig::from_url(url)?;
    let store = client::RemoteStore::connect(cfg).map_err(|source| OpenError::Connect {
        url: url.to_string(),
        source,
    })?;
    Ok(Arc::new(store))
}

/// `url` fit for logs and error messages: its query (which may carry
/// object-store keys) replaced by `?…`.
pub fn redact_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}
