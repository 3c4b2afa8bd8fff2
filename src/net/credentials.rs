//! Who may open which volume on a store server: named credentials, each a
//! secret and the volumes it grants (`docs/protocol.md`, "Credentials").
//!
//! A server reads them from files only (`--secret-file`: one secret for
//! every volume, the credential `default`; `--credentials-file`: one line
//! per credential), never from its command line. A [`Secret`] never
//! prints: its `Debug` is redacted, and nothing here formats one.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use thiserror::Error;

use super::proto::msg::valid_volume_name;

/// The credential a client uses when its URL names none, and the one a
/// `--secret-file` defines.
pub const DEFAULT_CREDENTIAL: &str = "default";
/// The shortest secret a credentials file accepts.
pub const SECRET_MIN: usize = 16;

/// A shared secret. Its `Debug` says only how long it is.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    /// The key bytes, for HMAC only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// Which volumes a credential opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    All,
    Volumes(BTreeSet<String>),
}

/// One named credential.
#[derive(Clone, Debug)]
pub struct Credential {
    pub name: String,
    pub secret: Secret,
    pub grant: Grant,
}

impl Credential {
    pub fn grants(&self, volume: &str) -> bool {
        match &self.grant {
            Grant::All => true,
            Grant::Volumes(v) => v.contains(volume),
        }
    }
}

/// Why credentials could not be read.
#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("{0}: the secret file is empty")]
    Empty(String),
    #[error("{file} line {line}: {why}")]
    Line {
        file: String,
        line: usize,
        why: &'static str,
    },
    #[error("credential {0:?} is defined twice")]
    Duplicate(String),
}

/// Every credential a server accepts; empty means no authentication.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    by_name: HashMap<String, Credential>,
}

impl Credentials {
    /// No authentication: the credential `default` with the empty secret
    /// for every volume (a server allows this on loopback only).
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// One secret for every volume, as the credential `default`.
    pub fn single(secret: Secret) -> Credentials {
        let mut c = Credentials::default();
        c.by_name.insert(
            DEFAULT_CREDENTIAL.to_owned(),
            Credential {
                name: DEFAULT_CREDENTIAL.to_owned(),
                secret,
                grant: Grant::All,
            },
        );
        c
    }

    /// True when no credential is configured: every client passes.
    pub fn is_open(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Add the credentials of another set; a name defined twice is an error.
    pub fn merge(mut self, other: Credentials) -> Result<Credentials, CredentialsError> {
        for (name, c) in other.by_name {
            if self.by_name.contains_key(&name) {
                return Err(CredentialsError::Duplicate(name));
            }
            self.by_name.insert(name, c);
        }
        Ok(self)
    }

    /// The credential a client names. Without any configured, every name
    /// maps to the empty secret with every volume.
    pub fn get(&self, name: &str) -> Option<Credential> {
        if self.is_open() {
            return Some(Credential {
                name: name.to_owned(),
                secret: Secret::default(),
                grant: Grant::All,
            });
        }
        self.by_name.get(name).cloned()
    }

    /// Parse a credentials file: one credential a line, `NAME VOLUMES
    /// SECRET` separated by whitespace; VOLUMES is `*` or a comma-separated
    /// list of volume names; SECRET at least 16 bytes without whitespace.
    /// Empty lines and lines starting with `#` are skipped.
    pub fn parse(file: &str, text: &str) -> Result<Credentials, CredentialsError> {
        let mut c = Credentials::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why| CredentialsError::Line {
                file: file.to_owned(),
                line: i + 1,
                why,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, volumes, secret] = fields[..] else {
                return Err(bad("expected NAME VOLUMES SECRET"));
            };
            if !valid_volume_name(name) {
                return Err(bad("credential names are 1-64 of [A-Za-z0-9._-]"));
            }
            let grant = if volumes == "*" {
                Grant::All
            } else {
                let set: BTreeSet<String> = volumes.split(',').map(str::to_owned).collect();
                if set.iter().any(|v| !valid_volume_name(v)) {
                    return Err(bad(
                        "VOLUMES is * or a comma-separated list of volume names",
                    ));
                }
                Grant::Volumes(set)
            };
            if secret.len() < SECRET_MIN {
                return Err(bad("secrets are at least 16 bytes"));
            }
            let cred = Credential {
                name: name.to_owned(),
                secret: Secret::new(secret.as_bytes().to_vec()),
                grant,
            };
            if c.by_name.insert(name.to_owned(), cred).is_some() {
                return Err(CredentialsError::Duplicate(name.to_owned()));
            }
        }
        Ok(c)
    }

    /// Read a credentials file (see [`Credentials::parse`]).
    pub fn read_file(path: &str) -> Result<Credentials, CredentialsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CredentialsError::Read(path.to_owned(), e))?;
        Credentials::parse(path, &text)
    }
}

/// Read a secret file: the file's bytes, trailing newline dropped.
pub fn read_secret(path: &str) -> Result<Secret, CredentialsError> {
    let mut s = std::fs::read(path).map_err(|e| CredentialsError::Read(path.to_owned(), e))?;
    while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        s.pop();
    }
    if s.is_empty() {
        return Err(CredentialsError::Empty(path.to_owned()));
    }
    Ok(Secret::new(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credentials_file_grants_named_volumes() {
        let text =
            "# comment\n\nalice vol-a,vol-b 0123456789abcdef-alice\nops * 0123456789abcdef-ops\n";
        let c = Credentials::parse("f", text).unwrap();
        let alice = c.get("alice").unwrap();
        assert!(alice.grants("vol-a") && alice.grants("vol-b"));
        assert!(!alice.grants("vol-c"));
        assert!(c.get("ops").unwrap().grants("anything"));
        assert!(c.get("mallory").is_none());
        assert!(!c.is_open());
    }

    #[test]
    fn bad_lines_are_refused_by_number() {
        for (text, line) in [
            ("alice vol-a\n", 1),
            ("\nalice vol-a short\n", 2),
            ("alice ../x 0123456789abcdef0\n", 1),
            ("a/b * 0123456789abcdef0\n", 1),
        ] {
            match Credentials::parse("f", text) {
                Err(CredentialsError::Line { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(
            Credentials::parse("f", "a * 0123456789abcdef0\na * 0123456789abcdef1\n"),
            Err(CredentialsError::Duplicate(_))
        ));
    }

    #[test]
    fn secrets_never_print() {
        let c = Credentials::single(Secret::new(b"hunter2-hunter2-hunter2".to_vec()));
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
