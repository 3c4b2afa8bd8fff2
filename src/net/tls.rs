//! TLS around the wire protocol (rustls, TLS 1.2 and 1.3 with the aws-lc
//! provider). The server presents a certificate and key read from PEM
//! files; the client verifies the server either against a CA file (the
//! usual chain and name check) or against a pinned certificate (the SHA-256
//! of its DER encoding, with the handshake signature still checked). The
//! frames inside are the same as over plain TCP (`docs/protocol.md`).
//!
//! Keys are read from files only and never printed.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream the protocol runs over: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// Why a TLS setting could not be loaded.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("read PEM file {0}")]
    Pem(String, #[source] rustls::pki_types::pem::Error),
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("{0}: a CA certificate was not accepted")]
    BadCa(String, #[source] rustls::Error),
    #[error("TLS configuration")]
    Config(#[from] rustls::Error),
    #[error("tls_pin must be sha256:<64 hex digits>")]
    BadPin,
    #[error("{0:?} is not a server name TLS can check")]
    BadName(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem(path.to_owned(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// The server side: `--tls-cert` (a PEM chain, leaf first) and `--tls-key`
/// (a PEM private key).
pub fn server_config(cert: &str, key: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem(key.to_owned(), e))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// How a client checks the server it reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Chain to one of the CA certificates in this PEM file, and name the
    /// host the client dialled (or `tls_name`).
    Ca(String),
    /// The leaf certificate's SHA-256 is exactly this.
    Pin([u8; 32]),
}

impl Verify {
    /// Parse `sha256:<64 hex digits>` (colons between bytes allowed).
    pub fn pin(text: &str) -> Result<Verify, TlsError> {
        let hex: String = text
            .strip_prefix("sha256:")
            .ok_or(TlsError::BadPin)?
            .chars()
            .filter(|c| *c != ':')
            .collect();
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(TlsError::BadPin);
        }
        let mut pin = [0u8; 32];
        for (i, b) in pin.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| TlsError::BadPin)?;
        }
        Ok(Verify::Pin(pin))
    }
}

/// A client's TLS settings, made once and shared by its connections.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    /// Overrides the host of each `host:port` as the name checked.
    name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish()
    }
}

impl ClientTls {
    pub fn new(verify: &Verify, name: Option<String>) -> Result<ClientTls, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let config = match verify {
            Verify::Ca(path) => {
                let mut roots = RootCertStore::empty();
                for c in certificates(path)? {
                    roots
                        .add(c)
                        .map_err(|e| TlsError::BadCa(path.to_owned(), e))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Verify::Pin(sha256) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    sha256: *sha256,
                    provider: provider(),
                }))
                .with_no_client_auth(),
        };
        Ok(ClientTls {
            config: Arc::new(config),
            name,
        })
    }

    /// Run the TLS handshake over `tcp` to `server` (`host:port`).
    pub async fn connect(
        &self,
        server: &str,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<BoxIo> {
        let host = match &self.name {
            Some(n) => n.clone(),
            None => host_of(server).to_owned(),
        };
        let name = ServerName::try_from(host.clone()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                TlsError::BadName(host.clone()),
            )
        })?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(name, tcp)
            .await?;
        Ok(Box::new(stream))
    }
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Accepts exactly one server certificate, by its SHA-256; the handshake
/// signature is still verified with the certificate's key.
#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons() {
        let hex = "00".repeat(31) + "ff";
        assert_eq!(
            Verify::pin(&format!("sha256:{hex}")).unwrap(),
            Verify::Pin({
                let mut p = [0u8; 32];
                p[31] = 0xff;
                p
            })
        );
        let colons = vec!["ab"; 32].join(":");
        assert!(Verify::pin(&format!("sha256:{colons}")).is_ok());
        assert!(Verify::pin("sha1:00").is_err());
        assert!(Verify::pin("sha256:zz").is_err());
        assert!(Verify::pin(&format!("sha256:{}", "é".repeat(32))).is_err());
    }

    #[test]
    fn hosts_come_from_the_server_address() {
        assert_eq!(host_of("store.example:7000"), "store.example");
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
    }
}
