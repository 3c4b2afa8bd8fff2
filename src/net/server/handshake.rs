//! The server's side of the handshake: Hello → Challenge → Auth → Welcome
//! (`docs/protocol.md`, "Handshake"). Frames are capped at
//! [`HANDSHAKE_MAX_PAYLOAD`] before their payload is read; a peer of
//! another protocol version is told both versions in a frame it can read;
//! the session is issued here or resumed with its ticket; the volume must
//! be granted by the client's credential; and the connection takes its
//! slot only once authenticated.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;

use super::writer::Served;
use super::{ConnError, Shared};
use crate::net::credentials::{Credential, Grant, Secret};
use crate::net::proto::auth::{self, Side, Transcript};
use crate::net::proto::msg::{ErrorCode, Request, Response, TICKET_LEN};
use crate::net::proto::{
    read_frame, write_frame, ProtoError, HANDSHAKE_MAX_PAYLOAD, MAX_PAYLOAD, VERSION,
};

/// An authenticated connection's standing.
pub struct Session {
    /// The session id the volume keeps exactly-once records under.
    pub stored: u64,
    /// The session id on the wire (for logs).
    pub session: u64,
    pub credential: String,
    pub volume_name: String,
    pub volume: Arc<Served>,
    /// The connection's slot among `--max-connections`.
    pub _slot: OwnedSemaphorePermit,
}

async fn refuse<W: AsyncWrite + Unpin>(
    wr: &mut W,
    id: u64,
    code: ErrorCode,
    why: String,
) -> Result<Session, ConnError> {
    write_frame(wr, &Response::error(code, why.clone()).to_frame(id)).await?;
    Err(ConnError::Handshake(why))
}

/// Read one handshake frame, answering a frame that cannot be one.
async fn next<R, W>(rd: &mut R, wr: &mut W) -> Result<(u64, Request), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let err = match read_frame(rd, HANDSHAKE_MAX_PAYLOAD).await {
        Ok(Some(f)) => match Request::from_frame(&f) {
            Ok(r) => return Ok((f.request_id, r)),
            Err(e) => e,
        },
        Ok(None) => return Err(ConnError::Handshake("closed during the handshake".into())),
        Err(e) => e,
    };
    let answer = Response::error(ErrorCode::BadRequest, err.to_string()).to_frame(0);
    let bytes = match err {
        // Answer in the peer's version, so that it can read why.
        ProtoError::BadVersion(v) => Response::error(
            ErrorCode::Version,
            format!("client speaks protocol version {v}, this server speaks version {VERSION}"),
        )
        .to_frame(0)
        .encode_as(v),
        ProtoError::Io(e) => return Err(ConnError::Proto(ProtoError::Io(e))),
        _ => answer.encode(),
    };
    use tokio::io::AsyncWriteExt;
    let _ = wr.write_all(&bytes).await;
    Err(err.into())
}

/// A new session, or `session` resumed when `ticket` is the one issued for
/// it to this credential and volume.
fn issue_session(
    secret: &[u8],
    credential: &str,
    volume: &str,
    session: u64,
    ticket: &[u8; TICKET_LEN],
) -> Result<u64, String> {
    if session == 0 {
        return auth::new_session().map_err(|e| format!("cannot draw a session id: {e}"));
    }
    if auth::ticket_valid(secret, credential, volume, session, ticket) {
        return Ok(session);
    }
    Err(format!(
        "session {session:016x}: ticket not valid; a session is resumed only by the client it was \
         issued to"
    ))
}

/// Run the handshake; on success the connection holds a slot and knows its
/// session and volume.
pub async fn handshake<R, W>(rd: &mut R, wr: &mut W, shared: &Shared) -> Result<Session, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (id, hello) = next(rd, wr).await?;
    let Request::Hello {
        version,
        credential,
        session,
        ticket,
        volume,
        client_nonce,
        ..
    } = hello
    else {
        return refuse(wr, id, ErrorCode::BadRequest, "expected hello".into()).await;
    };
    if version != VERSION {
        let why = format!(
            "client speaks protocol version {version}, this server speaks version {VERSION}"
        );
        return refuse(wr, id, ErrorCode::Version, why).await;
    }
    // An unknown credential fails exactly as a wrong secret does, at Auth,
    // so that names cannot be probed.
    let cred = shared
        .cfg
        .credentials
        .get(&credential)
        .unwrap_or(Credential {
            name: credential.clone(),
            secret: Secret::new(auth::nonce().map_err(ProtoError::Io)?.to_vec()),
            grant: Grant::Volumes(Default::default()),
        });
    let secret = cred.secret.expose();
    let server_nonce = auth::nonce().map_err(ProtoError::Io)?;
    write_frame(wr, &Response::Challenge { server_nonce }.to_frame(id)).await?;
    let (id, Request::Auth { proof }) = next(rd, wr).await? else {
        return refuse(wr, id, ErrorCode::BadRequest, "expected auth".into()).await;
    };
    let asked = Transcript {
        client_nonce: &client_nonce,
        server_nonce: &server_nonce,
        credential: &credential,
        volume: &volume,
        session,
        ticket: &ticket,
    };
    if !auth::verify(secret, Side::Client, &asked, &proof) {
        return refuse(
            wr,
            id,
            ErrorCode::AuthFailed,
            "authentication failed".into(),
        )
        .await;
    }
    if !cred.grants(&volume) {
        let why = format!("credential {credential} does not grant volume {volume}");
        return refuse(wr, id, ErrorCode::AuthFailed, why).await;
    }
    let session = match issue_session(secret, &credential, &volume, session, &ticket) {
        Ok(s) => s,
        Err(why) => return refuse(wr, id, ErrorCode::AuthFailed, why).await,
    };
    let Ok(slot) = Arc::clone(&shared.connections).try_acquire_owned() else {
        let why = format!(
            "connection limit of {} reached (--max-connections)",
            shared.cfg.max_connections
        );
        return refuse(wr, id, ErrorCode::Busy, why).await;
    };
    let store = match shared.volumes.get(&volume).await {
        Ok(s) => s,
        Err(e) => {
            // The slot is free before the peer hears why: a client that
            // reads the refusal and connects again finds it.
            drop(slot);
            return refuse(wr, id, ErrorCode::NoSuchVolume, e.to_string()).await;
        }
    };
    let ticket = auth::ticket(secret, &credential, &volume, session);
    let issued = Transcript {
        session,
        ticket: &ticket,
        ..asked
    };
    let welcome = Response::Welcome {
        proof: auth::prove(secret, Side::Server, &issued),
        session,
        ticket,
        epoch: store.store.epoch(),
        max_payload: MAX_PAYLOAD,
        max_in_flight: shared.cfg.max_in_flight,
    };
    write_frame(wr, &welcome.to_frame(id)).await?;
    Ok(Session {
        stored: auth::stored_session(&credential, session),
        session,
        credential,
        volume_name: volume,
        volume: store,
        _slot: slot,
    })
}
