//! Reading the listener's certificate files and the JWKS file: at most [`MAX_FILE_BYTES`], and,
//! while the gateway serves, on a blocking thread within [`READ_LIMIT`] (a FIFO or a stuck
//! network mount must not hold anything up).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// The largest file read.
pub(crate) const MAX_FILE_BYTES: usize = 1024 * 1024;
/// How long a read may take while serving.
const READ_LIMIT: Duration = Duration::from_secs(2);

/// Reads `path`, blocking (at start and by `--check-config`, or within [`in_time`]).
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() > MAX_FILE_BYTES {
        return Err(format!("is larger than {MAX_FILE_BYTES} bytes"));
    }
    Ok(text)
}

/// Runs `reads` (blocking file reads) off the runtime's threads, giving up after
/// [`READ_LIMIT`].
pub(crate) async fn in_time<T: Send + 'static>(
    reads: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    match tokio::time::timeout(READ_LIMIT, tokio::task::spawn_blocking(reads)).await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => Err(format!("the read failed: {e}")),
        Err(_) => Err(format!("not read within {} s", READ_LIMIT.as_secs())),
    }
}
