//! Where signed chunks go.
//!
//! [`crate::run`] hands every chunk to one `FnMut(Verified) -> Result<(), SinkError>` the moment it is
//! signed. The outputs the broadcaster has on its own are sinks here: [`RecordSink`] (`--record`, the
//! concatenated payloads: a plain MPEG-TS file) and [`ChunksDirSink`] (`--chunks-dir`, one file per
//! signed chunk). The swarm's origin is another sink, added by the peer side.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crowdsurf_proto::chunk::Verified;

/// Why a sink could not take a chunk. Ends the broadcast.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// Writing a file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The consumer of the chunks is gone (for example the swarm side shut down).
    #[error("chunk consumer closed")]
    Closed,
    /// Any other failure of a caller-supplied sink.
    #[error("{0}")]
    Other(String),
}

/// Writes the concatenated chunk payloads to one file: a valid MPEG-TS file that players open.
#[derive(Debug)]
pub struct RecordSink {
    path: PathBuf,
    file: File,
}

impl RecordSink {
    /// Creates (or truncates) the record file.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref().to_owned();
        let file = File::create(&path).map_err(|source| SinkError::Io { path: path.clone(), source })?;
        Ok(RecordSink { path, file })
    }

    /// Appends one chunk's payload. Unbuffered, so the file is always whole chunks.
    pub fn write(&mut self, chunk: &Verified) -> Result<(), SinkError> {
        self.file.write_all(chunk.payload()).map_err(|source| SinkError::Io { path: self.path.clone(), source })
    }
}

/// Writes every signed chunk (`Verified::encode` bytes: header, signature, payload) to its own file,
/// named by the zero-padded sequence number: `00000001712345678901.chunk`.
#[derive(Debug)]
pub struct ChunksDirSink {
    dir: PathBuf,
}

impl ChunksDirSink {
    /// Uses `dir`, creating it if needed.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self, SinkError> {
        let dir = dir.as_ref().to_owned();
        fs::create_dir_all(&dir).map_err(|source| SinkError::Io { path: dir.clone(), source })?;
        Ok(ChunksDirSink { dir })
    }

    /// The file name used for chunk `seq`.
    pub fn file_name(seq: u64) -> String {
        format!("{seq:020}.chunk")
    }

    /// Writes one chunk file (through a temporary name, so a reader never sees half a chunk).
    pub fn write(&mut self, chunk: &Verified) -> Result<(), SinkError> {
        let name = Self::file_name(chunk.seq());
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut bytes = Vec::with_capacity(crowdsurf_proto::chunk::SIGNED_HEADER_LEN + chunk.payload().len());
        chunk.encode(&mut bytes);
        fs::write(&tmp, &bytes).map_err(|source| SinkError::Io { path: tmp.clone(), source })?;
        fs::rename(&tmp, &path).map_err(|source| SinkError::Io { path, source })
    }
}
