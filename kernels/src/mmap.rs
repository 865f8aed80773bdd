//! Read-only memory maps of checkpoint files (the one `unsafe` the loaders need).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::weight::SharedBytes;

/// Maps `path` read-only and returns the whole file as [`SharedBytes`].
///
/// Checkpoint files must not be truncated or rewritten while a server uses them:
/// like every mmap-based loader, a concurrent truncation turns reads into SIGBUS.
pub fn map_file(path: &Path) -> std::io::Result<SharedBytes> {
    let file = File::open(path)?;
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        return Ok(SharedBytes::from_vec(Vec::new()));
    }
    // SAFETY: the map is read-only and private to this process; its lifetime is tied
    // to the Arc below. The documented precondition (the file is not modified while
    // mapped) is the caller's: model directories are treated as immutable.
    let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
    let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(map);
    Ok(SharedBytes::new(owner, 0..len).expect("range equals the map length"))
}
