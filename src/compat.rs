//! pohmelfs started the way VMM managers start a virtio-fs backend: QEMU's
//! vhost-user "Backend program conventions" (`--fd`, `--socket-path`,
//! `--print-capabilities`) and virtiofsd's command line as libvirt
//! generates it, old style (`--fd=N -o source=DIR,cache=…,xattr`, libvirt
//! 9.0 of Debian bookworm) and new (`--fd=N --shared-dir DIR --cache
//! never --xattr …`, once `--print-capabilities` lists
//! `separate-options`).
//!
//! A command line whose first word is an option (no subcommand) is
//! rewritten into `pohmelfs serve …`. The shared directory names a volume:
//! a directory holding `pohmelfs.conf` (`store = URL` and more `serve`
//! options, one `key = value` a line), or else a `file://` volume's own
//! directory. Options that only make sense for a passthrough daemon are
//! accepted with one warning line on stderr; the rest are refused like any
//! bad option. This module only rewrites arguments: it opens nothing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// What `--print-capabilities` prints (QEMU's docs/interop/vhost-user.json):
/// a virtio-fs backend that takes virtiofsd's separate options
/// (`--shared-dir`, `--cache`), and no migration.
pub const CAPABILITIES: &str =
    "{\n  \"type\": \"fs\",\n  \"features\": [\n    \"separate-options\"\n  ]\n}\n";

/// The file in a shared directory that names the volume behind it.
pub const CONF_FILE: &str = "pohmelfs.conf";

/// The command line to parse: `args` itself, or (for a backend-convention
/// command line) the `pohmelfs serve` one it means. `None`: it was
/// `--print-capabilities`, answered already.
pub fn rewrite(args: Vec<OsString>) -> Result<Option<Vec<OsString>>> {
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let is_flag = first.starts_with('-') && !matches!(first, "-h" | "--help" | "-V" | "--version");
    if !is_flag {
        return Ok(Some(args));
    }
    let words: Vec<String> = args
        .iter()
        .skip(1)
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .with_context(|| format!("argument {a:?} is not UTF-8"))
        })
        .collect::<Result<_>>()?;
    if words.iter().any(|w| w == "--print-capabilities") {
        print!("{CAPABILITIES}");
        return Ok(None);
    }
    let parsed = Convention::parse(&words)?;
    if !parsed.ignored.is_empty() {
        eprintln!(
            "pohmelfs: warning: ignoring passthrough-only options ({}): pohmelfs serves a volume, not a host directory",
            parsed.ignored.join(", ")
        );
    }
    Ok(Some(parsed.serve_args()?))
}

/// A backend-convention command line, taken apart.
#[derive(Debug, Default, PartialEq, Eq)]
struct Convention {
    fd: Option<String>,
    socket_path: Option<String>,
    shared_dir: Option<String>,
    /// `--readonly`: `serve --readonly`.
    readonly: bool,
    /// `serve` options that mean what they meant to virtiofsd.
    serve: Vec<String>,
    /// Options accepted and ignored, as given.
    ignored: Vec<String>,
}

/// Options of virtiofsd that take a value and mean nothing to pohmelfs.
const IGNORED_WITH_VALUE: &[&str] = &[
    "--sandbox",
    "--rlimit-nofile",
    "--uid-map",
    "--gid-map",
    "--inode-file-handles",
    "--modcaps",
    "--xattrmap",
    "--translate-uid",
    "--translate-gid",
    "--migration-mode",
    "--migration-on-error",
];

/// Options of virtiofsd without a value that mean nothing to pohmelfs.
const IGNORED_FLAGS: &[&str] = &[
    "--xattr",
    "--posix-acl",
    "--announce-submounts",
    "--allow-direct-io",
    "--killpriv-v2",
    "--no-killpriv-v2",
    "--security-label",
    "--allow-mmap",
    "--writeback",
    "--no-readdirplus",
    "--syslog",
    "--preserve-noatime",
];

impl Convention {
    fn parse(words: &[String]) -> Result<Convention> {
        let mut c = Convention::default();
        let mut it = words.iter();
        while let Some(word) = it.next() {
            let (name, inline) = match word.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
                _ => (word.as_str(), None),
            };
            let mut value = |name: &str| -> Result<String> {
                match &inline {
                    Some(v) => Ok(v.clone()),
                    None => it
                        .next()
                        .cloned()
                        .with_context(|| format!("{name} needs a value")),
                }
            };
            match name {
                "--fd" => c.fd = Some(value(name)?),
                "--socket-path" => c.socket_path = Some(value(name)?),
                "--shared-dir" => c.shared_dir = Some(value(name)?),
                "-o" => c.options(&value(name)?)?,
                "--cache" => c.cache(&value(name)?),
                "--thread-pool-size" => {
                    let n = value(name)?;
                    if n == "0" {
                        c.ignored.push(format!("{name}={n}"));
                    } else {
                        c.serve.extend(["--thread-pool-size".into(), n]);
                    }
                }
                "--log-level" => {
                    let level = value(name)?;
                    c.serve.extend(["--log-level".into(), level]);
                }
                "-d" => c.serve.extend(["--log-level".into(), "debug".into()]),
                "--socket-group" | "--socket-mode" | "--tag" => {
                    let v = value(name)?;
                    c.serve.extend([name.to_owned(), v]);
                }
                // libvirt's `<readonly/>`.
                "--readonly" => c.readonly = true,
                n if IGNORED_WITH_VALUE.contains(&n) => {
                    let v = value(name)?;
                    c.ignored.push(format!("{n} {v}"));
                }
                n if IGNORED_FLAGS.contains(&n) => c.ignored.push(n.to_owned()),
                other => bail!("unknown option {other:?} for a virtiofsd-style command line"),
            }
        }
        Ok(c)
    }

    /// `-o a=b,c,…` (old-style virtiofsd), commas in values escaped as
    /// `\,` (libvirt's `virQEMUBuildBufferEscapeComma` doubles them: `,,`).
    fn options(&mut self, opts: &str) -> Result<()> {
        for opt in split_options(opts) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt.as_str(), None),
            };
            match (key, value) {
                ("source", Some(dir)) => self.shared_dir = Some(dir.to_owned()),
                ("cache", Some(mode)) => self.cache(mode),
                ("log_level", Some(level)) => {
                    let level = if level == "err" { "error" } else { level };
                    self.serve.extend(["--log-level".into(), level.into()]);
                }
                ("debug", None) => self.serve.extend(["--log-level".into(), "debug".into()]),
                _ => self.ignored.push(format!("-o {opt}")),
            }
        }
        Ok(())
    }

    /// virtiofsd's cache modes that are pohmelfs's too; `none` is the old
    /// name of `never`.
    fn cache(&mut self, mode: &str) {
        match mode {
            "none" | "never" => self.serve.extend(["--cache".into(), "never".into()]),
            "auto" | "always" => self.serve.extend(["--cache".into(), mode.into()]),
            other => self.ignored.push(format!("--cache {other}")),
        }
    }

    fn serve_args(&self) -> Result<Vec<OsString>> {
        let mut out: Vec<OsString> = vec!["pohmelfs".into(), "serve".into()];
        match (&self.fd, &self.socket_path) {
            (Some(fd), None) => out.extend(["--fd".into(), fd.into()]),
            (None, Some(path)) => out.extend(["--socket-path".into(), path.into()]),
            (Some(_), Some(_)) => bail!("--fd and --socket-path exclude each other"),
            (None, None) => {
                bail!("give --fd N (an inherited listening socket) or --socket-path PATH")
            }
        }
        let Some(dir) = &self.shared_dir else {
            bail!("give the volume: --shared-dir DIR or -o source=DIR");
        };
        let volume = volume_args(Path::new(dir))?;
        // `readonly = true` in the volume's pohmelfs.conf says it too.
        let readonly = self.readonly && !volume.iter().any(|a| a == "--readonly");
        out.extend(volume);
        out.extend(self.serve.iter().map(OsString::from));
        if readonly {
            out.push("--readonly".into());
        }
        Ok(out)
    }
}

/// Split `-o` options at commas not escaped (`\,` or libvirt's `,,`).
fn split_options(opts: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = opts.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' if chars.peek() == Some(&',') => {
                cur.push(',');
                chars.next();
            }
            ',' if chars.peek() == Some(&',') => {
                cur.push(',');
                chars.next();
            }
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The `serve` options the shared directory `dir` stands for: its
/// `pohmelfs.conf`, or the `file://` volume it is.
fn volume_args(dir: &Path) -> Result<Vec<OsString>> {
    let conf = dir.join(CONF_FILE);
    match std::fs::read_to_string(&conf) {
        Ok(text) => conf_args(&text).with_context(|| format!("read {}", conf.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = dir.canonicalize().unwrap_or_else(|_| PathBuf::from(dir));
            Ok(vec![
                "--store".into(),
                format!("file://{}", dir.display()).into(),
            ])
        }
        Err(e) => Err(e).with_context(|| format!("read {}", conf.display())),
    }
}

/// `key = value` lines (`#` comments) as `--key value` options; `true`
/// makes a bare flag. `store` is required; the socket is libvirt's to give.
fn conf_args(text: &str) -> Result<Vec<OsString>> {
    let mut out: Vec<OsString> = Vec::new();
    let mut store = false;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("line {}: expected key = value", n + 1);
        };
        let (key, value) = (key.trim().replace('_', "-"), value.trim());
        if matches!(key.as_str(), "fd" | "socket-path") {
            bail!("line {}: {key} is the VMM manager's to give", n + 1);
        }
        store |= key == "store";
        out.push(format!("--{key}").into());
        if value != "true" {
            out.push(value.into());
        }
    }
    if !store {
        bail!("no store = URL line");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    fn serve(line: &str) -> Vec<String> {
        Convention::parse(&words(line))
            .unwrap()
            .serve_args()
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn libvirt_9_old_style_options() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let c = Convention::parse(&words(&format!(
            "--fd=23 -o source={d},cache=always,sandbox=chroot,xattr,flock,no_posix_lock --thread-pool-size=16 -d"
        )))
        .unwrap();
        assert_eq!(c.fd.as_deref(), Some("23"));
        assert_eq!(c.shared_dir.as_deref(), Some(&*d.to_string()));
        assert_eq!(
            c.ignored,
            [
                "-o sandbox=chroot",
                "-o xattr",
                "-o flock",
                "-o no_posix_lock"
            ]
        );
        let args = c.serve_args().unwrap();
        let args: Vec<_> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(args[..4], ["pohmelfs", "serve", "--fd", "23"]);
        assert!(args.windows(2).any(|w| w == ["--cache", "always"]));
        assert!(args.windows(2).any(|w| w == ["--thread-pool-size", "16"]));
        assert!(args.windows(2).any(|w| w == ["--log-level", "debug"]));
    }

    #[test]
    fn libvirt_current_separate_options() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().canonicalize().unwrap();
        let args = serve(&format!(
            "--fd=5 --shared-dir {} --cache never --sandbox chroot --xattr --thread-pool-size=0 --rlimit-nofile=4096",
            d.display()
        ));
        assert_eq!(
            args,
            [
                "pohmelfs",
                "serve",
                "--fd",
                "5",
                "--store",
                &format!("file://{}", d.display()),
                "--cache",
                "never"
            ]
        );
    }

    #[test]
    fn a_conf_file_names_the_store_and_options() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONF_FILE),
            "# vm1\nstore = pohmel://10.0.0.1:7000/vm1\ncache_size = 512M\nsync_on_close = true\n",
        )
        .unwrap();
        let args = serve(&format!(
            "--socket-path /run/x.sock -o source={}",
            dir.path().display()
        ));
        assert_eq!(
            args[2..],
            [
                "--socket-path",
                "/run/x.sock",
                "--store",
                "pohmel://10.0.0.1:7000/vm1",
                "--cache-size",
                "512M",
                "--sync-on-close"
            ]
        );
        std::fs::write(dir.path().join(CONF_FILE), "cache_size = 1G\n").unwrap();
        let e = Convention::parse(&words(&format!(
            "--fd 3 --shared-dir {}",
            dir.path().display()
        )))
        .unwrap()
        .serve_args()
        .unwrap_err();
        assert!(format!("{e:#}").contains("no store = URL line"), "{e:#}");
    }

    #[test]
    fn commas_escaped_in_a_source_survive() {
        assert_eq!(
            split_options("source=/a,,b,cache=none,x\\,y"),
            ["source=/a,b", "cache=none", "x,y"]
        );
    }

    #[test]
    fn bad_command_lines_are_refused() {
        for line in [
            "--fd 3",
            "--shared-dir /x",
            "--fd 3 --socket-path /s --shared-dir /x",
        ] {
            let c = Convention::parse(&words(line)).unwrap();
            assert!(c.serve_args().is_err(), "{line}");
        }
        assert!(Convention::parse(&words("--fd 3 --bogus")).is_err());
    }

    #[test]
    fn readonly_means_serve_readonly_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().canonicalize().unwrap();
        let args = serve(&format!("--fd=5 --shared-dir {} --readonly", d.display()));
        assert_eq!(args.last().map(String::as_str), Some("--readonly"));
        std::fs::write(
            d.join(CONF_FILE),
            format!("store = file://{}@monday\nreadonly = true\n", d.display()),
        )
        .unwrap();
        let args = serve(&format!("--fd=5 --shared-dir {} --readonly", d.display()));
        assert_eq!(args.iter().filter(|a| *a == "--readonly").count(), 1);
    }
}
