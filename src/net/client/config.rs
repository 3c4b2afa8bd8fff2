//! The settings of a `pohmel://` volume and the parsing of its URL:
//! servers, volume, credential and secret file, TLS verification,
//! timeouts. The secret is read from a file here and never printed.

use std::time::Duration;

use crate::net::credentials::{read_secret, Secret, DEFAULT_CREDENTIAL};
use crate::net::tls::{ClientTls, Verify};
use crate::store::OpenError;

/// Settings of a remote volume.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// `host:port` of each server, in failover order.
    pub servers: Vec<String>,
    pub volume: String,
    /// The server credential this client proves (`default` unless named).
    pub credential: String,
    pub secret: Secret,
    /// TLS and how the server is verified; `None` is plain TCP.
    pub tls: Option<ClientTls>,
    /// How long one request may wait for its answer before it is resent.
    pub request_timeout: Duration,
    /// How long a request is retried across servers before it fails.
    pub give_up_after: Duration,
    /// Requests in flight at most, whatever the server allows.
    pub max_in_flight: u32,
    /// A claimed client sends a frame at least this often (`keepalive_ms`),
    /// so the server's writer lease sees it alive.
    pub keepalive: Duration,
}

impl RemoteConfig {
    /// Parse `pohmel://a:7000,b:7000/volume?secret_file=PATH&timeout_ms=N`.
    /// Without `secret_file`, `$POHMELFS_SECRET_FILE` is used if set.
    /// `credential=NAME` names the server credential the secret is for;
    /// `tls_ca=PEM` or `tls_pin=sha256:HEX` turn on TLS and say how the
    /// server is verified, `tls_name=NAME` the name its certificate must
    /// carry (default: the host of each server); `keepalive_ms=N` how
    /// often a claimed client makes itself heard (5000).
    pub fn from_url(url: &str) -> Result<RemoteConfig, OpenError> {
        let rest = url
            .strip_prefix("pohmel://")
            .ok_or_else(|| OpenError::BadUrl(url.to_string()))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hosts, volume) = rest
            .split_once('/')
            .ok_or_else(|| OpenError::BadOption(format!("{url}: no /VOLUME after the servers")))?;
        if !crate::net::proto::msg::valid_volume_name(volume) {
            return Err(OpenError::BadOption(format!(
                "{url}: bad volume name {volume:?}"
            )));
        }
        let servers: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        if servers.is_empty() || servers.iter().any(|s| !s.contains(':')) {
            return Err(OpenError::BadOption(format!(
                "{url}: servers must be HOST:PORT[,HOST:PORT...]"
            )));
        }
        let mut cfg = RemoteConfig {
            servers,
            volume: volume.to_string(),
            credential: DEFAULT_CREDENTIAL.to_owned(),
            secret: Secret::default(),
            tls: None,
            request_timeout: Duration::from_secs(10),
            give_up_after: Duration::from_secs(120),
            max_in_flight: 64,
            keepalive: Duration::from_secs(5),
        };
        let mut secret_file = std::env::var("POHMELFS_SECRET_FILE").ok();
        let (mut verify, mut tls_name) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("secret_file", v)) => secret_file = Some(v.to_string()),
                Some(("credential", v)) if crate::net::proto::msg::valid_volume_name(v) => {
                    cfg.credential = v.to_owned();
                }
                Some(("tls_ca", v)) if verify.is_none() => verify = Some(Verify::Ca(v.to_owned())),
                Some(("tls_pin", v)) if verify.is_none() => {
                    verify = Some(
                        Verify::pin(v)
                            .map_err(|e| OpenError::BadOption(format!("tls_pin: {e}")))?,
                    );
                }
                Some(("tls_name", v)) => tls_name = Some(v.to_owned()),
                Some(("timeout_ms", v)) => {
                    let ms: u64 = v
                        .parse()
                        .map_err(|_| OpenError::BadOption(pair.to_string()))?;
                    cfg.request_timeout = Duration::from_millis(ms.max(1));
                }
                Some(("give_up_ms", v)) => {
                    let ms: u64 = v
                        .parse()
                        .map_err(|_| OpenError::BadOption(pair.to_string()))?;
                    cfg.give_up_after = Duration::from_millis(ms);
                }
                Some(("keepalive_ms", v)) => {
                    let ms: u64 = v
                        .parse()
                        .ok()
                        .filter(|ms| (1..=3_600_000).contains(ms))
                        .ok_or_else(|| OpenError::BadOption(pair.to_string()))?;
                    cfg.keepalive = Duration::from_millis(ms);
                }
                _ => return Err(OpenError::BadOption(pair.to_string())),
            }
        }
        if let Some(path) = secret_file {
            cfg.secret = read_secret(&path)
                .map_err(|e| OpenError::BadOption(crate::ErrorChain(&e).to_string()))?;
        }
        match verify {
            Some(v) => {
                let tls = ClientTls::new(&v, tls_name)
                    .map_err(|e| OpenError::BadOption(crate::ErrorChain(&e).to_string()))?;
                cfg.tls = Some(tls);
            }
            None if tls_name.is_some() => {
                return Err(OpenError::BadOption(
                    "tls_name needs tls_ca= or tls_pin=".into(),
                ))
            }
            None => {}
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_debug_output_hides_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "hunter2-hunter2\n").unwrap();
        let pin = format!("sha256:{}", "0f".repeat(32));
        let url = format!(
            "pohmel://a:1,b:2/vol?credential=vm1&secret_file={}&tls_pin={pin}",
            file.display()
        );
        let cfg = RemoteConfig::from_url(&url).unwrap();
        assert_eq!(cfg.servers, ["a:1", "b:2"]);
        assert_eq!(cfg.credential, "vm1");
        assert_eq!(cfg.secret.expose(), b"hunter2-hunter2");
        assert!(cfg.tls.is_some());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        for bad in [
            "tls_name=x",
            "credential=a/b",
            "tls_pin=sha256:00",
            "nope=1",
        ] {
            let url = format!("pohmel://a:1/vol?{bad}");
            assert!(RemoteConfig::from_url(&url).is_err(), "{bad}");
        }
    }
}
