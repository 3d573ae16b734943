//! Files re-read while the process runs (API tokens, JWT keys): polled and
//! compared whole, because a Kubernetes Secret rotated by swapping a
//! symlink leaves the modification time of the path we hold unchanged.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Reads `path` every `every` until `stop`; when its content differs from
/// the last seen (at first, `seen`), hands the new content to `changed`.
/// An unreadable file is said in the log as `what` and changes nothing.
pub fn watch_file(
    path: PathBuf,
    mut seen: Vec<u8>,
    every: Duration,
    what: &'static str,
    stop: CancellationToken,
    mut changed: impl FnMut(&[u8]) + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let Ok(now) = tokio::fs::read(&path).await else {
                tracing::warn!(path = %path.display(), "the {what} cannot be read; keeping what was read before");
                continue;
            };
            if now != seen {
                changed(&now);
                seen = now;
            }
        }
    });
}
