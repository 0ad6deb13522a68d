//! Bounded reading of the files smelt is given: recipes, shards, indexes, manifests,
//! configs, adapters, ComPEFT vectors and OPCM states. Only regular files are read; the
//! type and size come from the opened file (fstat), not the path, so a file swapped between
//! the check and the read cannot slip past; a FIFO or device is refused before a single
//! byte is read (it is opened non-blocking, so even the open cannot hang); and every read
//! stops at a cap checked before anything is allocated.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Recipes (YAML).
pub const RECIPE_CAP: u64 = 1 << 20;
/// JSON files smelt reads: configs, indexes, manifests, journals, adapter configs.
pub const JSON_CAP: u64 = 64 << 20;
/// OPCM state files (one norm per tensor per model, and the models' paths).
pub const STATE_CAP: u64 = 64 << 20;

fn unreadable(what: &str, path: &Path, msg: impl Into<String>) -> Error {
    Error::Unreadable {
        what: what.to_string(),
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// What a file type is, for a message.
fn kind(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (following symlinks) and returns it
/// with its length. The open does not block (O_NONBLOCK, which has no effect on regular
/// files); the type is checked on the opened file. `what` names the kind of input for
/// the message ("recipe", "shard", ...).
pub fn open_regular(path: &Path, what: &str) -> Result<(File, u64)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(unreadable(
            what,
            path,
            format!(
                "is {}; smelt reads only regular files: pass the path of a regular file",
                kind(&ft)
            ),
        ));
    }
    Ok((file, meta.len()))
}

/// Reads all of a regular file of at most `cap` bytes.
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, what)?;
    let too_big = |n: u64| {
        unreadable(
            what,
            path,
            format!("is {n} bytes; a {what} may be at most {cap} bytes (is this the right file?)"),
        )
    };
    if len > cap {
        return Err(too_big(len));
    }
    // The length is from the opened file, but it may still grow while we read: read at most
    // one byte past the cap to notice.
    let mut buf = Vec::with_capacity(len as usize);
    file.take(cap + 1).read_to_end(&mut buf).at(path)?;
    if buf.len() as u64 > cap {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}

/// [`read_capped`] for a text file (UTF-8).
pub fn read_string_capped(path: &Path, cap: u64, what: &str) -> Result<String> {
    let bytes = read_capped(path, cap, what)?;
    String::from_utf8(bytes).map_err(|e| {
        unreadable(
            what,
            path,
            format!(
                "is not UTF-8 text (byte {}): is this the right file?",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_folders_and_oversize() {
        let e = read_capped(Path::new("/dev/zero"), 10, "recipe").unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = read_capped(Path::new("/"), 10, "recipe").unwrap_err();
        assert!(e.to_string().contains("a folder"), "{e}");
        let dir = std::env::temp_dir().join(format!("smelt-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read_capped(&f, 5, "recipe").unwrap(), b"12345");
        let e = read_capped(&f, 4, "recipe").unwrap_err();
        assert!(e.to_string().contains("at most 4 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
