//! Resumable image download: the payload is streamed from the server over the
//! agent's mTLS channel into `downloads/<digest>.partial`, hashed as it
//! arrives, and accepted only if size and SHA-256 match. A partial file
//! survives a restart; the next attempt continues from its length.

use std::path::PathBuf;
use std::sync::Arc;

use flotte_proto::transport::{channel_with_diagnostics, client_config, explain_status_with};
use flotte_proto::v1::agent_session_client::AgentSessionClient;
use flotte_proto::v1::FetchImageRequest;
use ring::digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::layout::ImageLayout;
use crate::identity::MachineIdentity;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot fetch the image: {0}")]
    Transport(String),
    #[error("download I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the payload is {actual} bytes, the manifest says {expected}: refused")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("the payload's SHA-256 is {actual}, the manifest says {expected}: refused")]
    DigestMismatch { expected: String, actual: String },
}

/// A stream of payload chunks from an offset.
pub type ChunkStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Vec<u8>, FetchError>> + Send>>;

/// Where image bytes come from: the seam between downloading and the network.
#[async_trait::async_trait]
pub trait ImageSource: Send + Sync {
    async fn fetch(&self, digest: &str, offset: u64) -> Result<ChunkStream, FetchError>;
}

/// A channel to `address` with the machine's identity (shared by image
/// downloads and forensic uploads).
pub fn dial(
    address: &str,
    identity: &MachineIdentity,
) -> Result<
    (
        tonic::transport::Channel,
        flotte_proto::transport::TlsDiagnostics,
    ),
    flotte_proto::transport::TransportError,
> {
    let tls = client_config(
        &identity.ca_pem,
        Some((&identity.certificate_pem, &identity.key_pem)),
    )?;
    channel_with_diagnostics(address, Arc::new(tls))
}

/// The server, over the agent's own mTLS identity (renewals included).
#[derive(Debug, Clone)]
pub struct GrpcImageSource {
    pub servers: Vec<String>,
    pub identity: watch::Receiver<MachineIdentity>,
}

#[async_trait::async_trait]
impl ImageSource for GrpcImageSource {
    async fn fetch(&self, digest: &str, offset: u64) -> Result<ChunkStream, FetchError> {
        let identity = self.identity.borrow().clone();
        let mut last_error = String::from("no server address");
        for address in &self.servers {
            let (channel, diagnostics) = dial(address, &identity)
                .map_err(|error| FetchError::Transport(error.to_string()))?;
            let request = FetchImageRequest {
                digest: digest.to_owned(),
                offset,
            };
            match AgentSessionClient::new(channel).fetch_image(request).await {
                Ok(response) => {
                    use futures::StreamExt;
                    let stream = response.into_inner().map(move |chunk| {
                        chunk.map(|chunk| chunk.data).map_err(|status| {
                            FetchError::Transport(explain_status_with(&status, &diagnostics))
                        })
                    });
                    return Ok(Box::pin(stream));
                }
                Err(status) => last_error = explain_status_with(&status, &diagnostics),
            }
        }
        Err(FetchError::Transport(last_error))
    }
}

/// Downloads (or resumes) the payload `digest` of `size` bytes; returns the
/// verified file. `progress` is told the bytes present after each chunk.
pub async fn download(
    source: &dyn ImageSource,
    layout: &ImageLayout,
    expected_digest: &str,
    expected_size: u64,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<PathBuf, FetchError> {
    use futures::StreamExt;
    let path = layout.partial_download(expected_digest);
    let io = |source| FetchError::Io {
        path: path.clone(),
        source,
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&path)
        .await
        .map_err(io)?;
    let mut present = file.metadata().await.map_err(io)?.len();
    if present > expected_size {
        file.set_len(0).await.map_err(io)?;
        present = 0;
    }
    // Re-hash what an earlier run already wrote: the hash state itself is not kept.
    let mut hasher = digest::Context::new(&digest::SHA256);
    if present > 0 {
        let mut reader = tokio::fs::File::open(&path).await.map_err(io)?;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let read = reader.read(&mut buffer).await.map_err(io)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
        tracing::info!(
            digest = expected_digest,
            resume_from = present,
            "resuming image download"
        );
    }
    progress(present);
    if present < expected_size {
        let mut chunks = source.fetch(expected_digest, present).await?;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if present + chunk.len() as u64 > expected_size {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(FetchError::SizeMismatch {
                    expected: expected_size,
                    actual: present + chunk.len() as u64,
                });
            }
            file.write_all(&chunk).await.map_err(io)?;
            hasher.update(&chunk);
            present += chunk.len() as u64;
            progress(present);
        }
    }
    file.sync_all().await.map_err(io)?;
    if present != expected_size {
        // A short stream: keep the part, the next attempt resumes.
        return Err(FetchError::SizeMismatch {
            expected: expected_size,
            actual: present,
        });
    }
    let actual = hex::encode(hasher.finish());
    if actual != expected_digest {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(FetchError::DigestMismatch {
            expected: expected_digest.to_owned(),
            actual,
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Serves a byte slice; can be told to stop after some bytes (a dropped connection).
    struct SimulatedSource {
        bytes: Vec<u8>,
        stop_after: Mutex<Option<u64>>,
        served_from: Mutex<Vec<u64>>,
    }

    #[async_trait::async_trait]
    impl ImageSource for SimulatedSource {
        async fn fetch(&self, _digest: &str, offset: u64) -> Result<ChunkStream, FetchError> {
            self.served_from.lock().unwrap().push(offset);
            let end = self
                .stop_after
                .lock()
                .unwrap()
                .take()
                .unwrap_or(self.bytes.len() as u64) as usize;
            let chunks: Vec<Result<Vec<u8>, FetchError>> = self.bytes[offset as usize..end]
                .chunks(7)
                .map(|chunk| Ok(chunk.to_vec()))
                .collect();
            Ok(Box::pin(futures::stream::iter(chunks)))
        }
    }

    fn layout() -> (ImageLayout, PathBuf) {
        let dir = std::env::temp_dir().join(format!("flotte-fetch-{}", uuid::Uuid::new_v4()));
        let layout = ImageLayout::new(&dir);
        layout.ensure_dirs().unwrap();
        (layout, dir)
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_where_it_stopped() {
        let (layout, dir) = layout();
        let bytes: Vec<u8> = (0..100u8).collect();
        let digest = hex::encode(digest::digest(&digest::SHA256, &bytes));
        let source = SimulatedSource {
            bytes: bytes.clone(),
            stop_after: Mutex::new(Some(40)),
            served_from: Mutex::new(Vec::new()),
        };
        let first = download(&source, &layout, &digest, 100, &mut |_| {}).await;
        assert!(
            matches!(first, Err(FetchError::SizeMismatch { actual: 40, .. })),
            "{first:?}"
        );
        let path = download(&source, &layout, &digest, 100, &mut |_| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), bytes);
        assert_eq!(*source.served_from.lock().unwrap(), vec![0, 40]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn wrong_bytes_are_refused_and_dropped() {
        let (layout, dir) = layout();
        let source = SimulatedSource {
            bytes: vec![1u8; 50],
            stop_after: Mutex::new(None),
            served_from: Mutex::new(Vec::new()),
        };
        let wrong_digest = "0".repeat(64);
        let result = download(&source, &layout, &wrong_digest, 50, &mut |_| {}).await;
        assert!(
            matches!(result, Err(FetchError::DigestMismatch { .. })),
            "{result:?}"
        );
        assert!(!layout.partial_download(&wrong_digest).exists());
        let too_long = download(&source, &layout, &wrong_digest, 10, &mut |_| {}).await;
        assert!(
            matches!(too_long, Err(FetchError::SizeMismatch { .. })),
            "{too_long:?}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
