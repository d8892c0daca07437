//! The stream key file.
//!
//! The stream key is the broadcaster's identity: whoever holds it can publish the stream, and a
//! restarted broadcaster that reads the same file continues the same stream (same stream id, so the
//! same ticket keeps working). The file holds the 32 secret bytes as one line of 64 hexadecimal digits
//! (32 raw bytes are accepted too). It is created with mode 0600 when missing, from the operating
//! system's random number generator, and refused when group or others may read it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crowdsurf_proto::keys::StreamKey;

/// Why the stream key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file exists but could not be read (or its metadata could not).
    #[error("cannot read stream key file {path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file was missing and could not be created.
    #[error("cannot create stream key file {path}: {source}")]
    Create {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Group or others may read or write the file: the key may have leaked, so it is not used.
    #[error(
        "stream key file {path} has mode {mode:o}; it must not be accessible to group or others (chmod 600 {path})"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// The permission bits found.
        mode: u32,
    },
    /// The content is neither 64 hex digits nor 32 raw bytes.
    #[error("stream key file {path} does not hold a key (expected one line of 64 hex digits, found {len} bytes)")]
    BadContent {
        /// The key file.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The path is a directory or another non-file.
    #[error("stream key file {path} is not a regular file")]
    NotAFile {
        /// The key path.
        path: PathBuf,
    },
    /// The operating system's random number generator failed.
    #[error("cannot draw random bytes for a new stream key: {0}")]
    Random(String),
}

/// Reads the stream key from `path`, or creates a new random key there (mode 0600) if the file does not
/// exist. Refuses a file readable by group or others, or one that does not hold a key.
pub fn load_or_create_key(path: impl AsRef<Path>) -> Result<StreamKey, KeyFileError> {
    let path = path.as_ref();
    match fs::metadata(path) {
        Ok(meta) => {
            if !meta.is_file() {
                return Err(KeyFileError::NotAFile { path: path.to_owned() });
            }
            check_mode(path, &meta)?;
            let content = fs::read(path).map_err(|source| KeyFileError::Read { path: path.to_owned(), source })?;
            parse_key(&content).ok_or_else(|| KeyFileError::BadContent { path: path.to_owned(), len: content.len() })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_key(path),
        Err(source) => Err(KeyFileError::Read { path: path.to_owned(), source }),
    }
}

fn parse_key(content: &[u8]) -> Option<StreamKey> {
    let text = std::str::from_utf8(content).ok().map(str::trim);
    if let Some(text) = text
        && text.len() == 64
        && let Ok(bytes) = data_encoding::HEXLOWER_PERMISSIVE.decode(text.as_bytes())
        && let Ok(secret) = <[u8; 32]>::try_from(bytes)
    {
        return Some(StreamKey::from_secret_bytes(secret));
    }
    let secret = <[u8; 32]>::try_from(content).ok()?;
    Some(StreamKey::from_secret_bytes(secret))
}

#[cfg(unix)]
fn check_mode(path: &Path, meta: &fs::Metadata) -> Result<(), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions { path: path.to_owned(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &Path, _meta: &fs::Metadata) -> Result<(), KeyFileError> {
    Ok(())
}

fn create_key(path: &Path) -> Result<StreamKey, KeyFileError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| KeyFileError::Random(e.to_string()))?;
    let key = StreamKey::from_secret_bytes(secret);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let create = |source| KeyFileError::Create { path: path.to_owned(), source };
    let mut file = options.open(path).map_err(create)?;
    let line = format!("{}\n", data_encoding::HEXLOWER.encode(&secret));
    file.write_all(line.as_bytes()).map_err(create)?;
    file.sync_all().map_err(create)?;
    tracing::info!(path = %path.display(), stream = %key.id(), "created a new stream key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_hex_and_raw() {
        let hex = "07".repeat(32);
        let a = parse_key(format!("{hex}\n").as_bytes()).unwrap();
        let b = parse_key(&[7u8; 32]).unwrap();
        assert_eq!(a.id(), b.id());
        assert!(parse_key(b"hello").is_none());
        assert!(parse_key(&[7u8; 33]).is_none());
    }
}
