//! The node's Ed25519 key pair, kept in `<data dir>/node.key` (file mode 0600).
//!
//! Created on first start; the node id is the public key in hex. The file holds the 32-byte secret
//! seed as 64 hex characters and a newline, nothing else, so it can be backed up and inspected.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ed25519_dalek::SigningKey;
use quire_projection_api::AuthorKey;

/// File name of the node key inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Errors loading or creating a key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file exists but does not hold a key.
    #[error("key file {path} does not hold 64 hex characters (an Ed25519 seed); restore it from a backup or move it away to make a new node identity")]
    Corrupt {
        /// The file.
        path: String,
    },
}

/// Loads the key at `path`, or creates a new random one there (mode 0600) if there is none.
pub fn load_or_create(path: &Path) -> Result<SigningKey, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut seed = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| IdentityError::Corrupt {
                path: path.display().to_string(),
            })?;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "node key is readable by others; run chmod 600 on it");
            }
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // Write a temporary file, fsync, then rename: a crash never leaves a half-written key.
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let temporary = path.with_extension("key.tmp");
            let _ = std::fs::remove_file(&temporary);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temporary)
                .map_err(io)?;
            writeln!(file, "{}", hex::encode(key.to_bytes())).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&temporary, path).map_err(io)?;
            if let Some(parent) = path.parent() {
                if let Ok(directory) = std::fs::File::open(parent) {
                    let _ = directory.sync_all();
                }
            }
            Ok(key)
        }
        Err(error) => Err(io(error)),
    }
}

/// The author key (public key) of a signing key.
pub fn author_key(key: &SigningKey) -> AuthorKey {
    AuthorKey(key.verifying_key().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_private_key_file_once_and_reloads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let first = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = load_or_create(&path).unwrap();
        assert_eq!(first.to_bytes(), second.to_bytes());
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
