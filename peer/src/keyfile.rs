//! Secret keys in files: 64 hex digits and a newline, created with mode 0600, refused when other users
//! could read them.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or creating the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// Group or others may read the file.
    #[error("key file {path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The content is not 64 hex digits.
    #[error("key file {path} does not hold a key (expected 64 hexadecimal digits)")]
    BadContent {
        /// The file.
        path: PathBuf,
    },
    /// The operating system's random number generator failed.
    #[error("cannot draw random bytes for a new key: {0}")]
    Random(String),
}

/// Fresh secret bytes from the operating system.
pub fn random_secret() -> Result<[u8; 32], KeyFileError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| KeyFileError::Random(e.to_string()))?;
    Ok(secret)
}

/// Reads the 32 secret bytes from `path`, creating the file with a new random key if it is missing.
/// Returns the bytes and whether the file was created.
pub fn load_or_create(path: &Path) -> Result<([u8; 32], bool), KeyFileError> {
    let io = |source| KeyFileError::Io { path: path.to_owned(), source };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            check_mode(path)?;
            let bytes = data_encoding::HEXLOWER_PERMISSIVE
                .decode(text.trim().as_bytes())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| KeyFileError::BadContent { path: path.to_owned() })?;
            Ok((bytes, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = random_secret()?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(io)?;
            writeln!(file, "{}", data_encoding::HEXLOWER.encode(&secret)).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok((secret, true))
        }
        Err(e) => Err(io(e)),
    }
}

fn check_mode(path: &Path) -> Result<(), KeyFileError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| KeyFileError::Io { path: path.to_owned(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::TooOpen { path: path.to_owned(), mode });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn created_once_then_reused_and_guarded() {
        let dir = std::env::temp_dir().join(format!("cs-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.key");
        let _ = std::fs::remove_file(&path);
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(load_or_create(&path), Err(KeyFileError::TooOpen { .. })));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::write(&path, "nonsense\n").unwrap();
        assert!(matches!(load_or_create(&path), Err(KeyFileError::BadContent { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
