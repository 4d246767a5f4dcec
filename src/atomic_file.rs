//! Atomic file writes: a temporary file beside the target, flushed, then
//! renamed over it. Used by checkpoint saves and by the rendezvous' port file.

use candle::{Result, Tensor};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: to a temporary file in the same
/// folder, flushed to disk, then renamed over `path`. A reader sees the old
/// file or the new one, never a partial write.
///
/// The temporary file has one fixed name per target, `.<name>.tmp` beside
/// it, and is locked while written: a save killed midway leaves at most that
/// file, which the next save to `path` takes over, and a second save to the
/// same path while one is under way fails at once instead of mixing the two.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] with the content written by `write` (through a buffer).
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let file = lock_temp(&tmp)?;
    let result = (|| {
        // Whatever a killed save left in it goes.
        file.set_len(0)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        write(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Ours while we hold its lock.
        let _ = std::fs::remove_file(&tmp);
    }
    drop(file);
    sync_parent(path);
    result
}

/// The temporary file of a save to `path`: one fixed name per target.
fn temp_path(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp"))
}

/// Opens (creating it if needed, keeping what a killed save left) and locks
/// the temporary file `tmp`. A lock held by a live save is an error; a killed
/// save's lock died with it.
fn lock_temp(tmp: &Path) -> std::io::Result<std::fs::File> {
    for _ in 0..8 {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(tmp)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!(
                        "the temporary file {tmp:?} is locked: another save to the same file \
                         is under way"
                    ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        // A save that held the lock until just now renamed the file we opened
        // over its target: then we hold the target, not a temporary file.
        if is_same_file(&file, tmp)? {
            return Ok(file);
        }
    }
    Err(std::io::Error::other(format!(
        "the temporary file {tmp:?} kept being replaced by other saves"
    )))
}

#[cfg(unix)]
fn is_same_file(file: &std::fs::File, path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(open.dev() == now.dev() && open.ino() == now.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Windows does not rename a file another handle has open for writing, so
/// the file we hold is still the temporary one.
#[cfg(not(unix))]
fn is_same_file(_file: &std::fs::File, _path: &Path) -> std::io::Result<bool> {
    Ok(true)
}

/// Flushes the folder holding `path`, so that the rename is on disk too
/// (best effort: Windows opens no folder as a file, and there the rename
/// needs no such flush).
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Writes `tensors` (unique names) as a safetensors file, atomically as
/// [`write_atomic`] does, streaming each tensor to the file (no copy of the
/// whole file in memory, and none of the `safetensors` crate's own temporary
/// files, which a killed save would leave behind under random names).
pub(crate) fn save_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<&[(&str, &str)]>,
) -> Result<()> {
    use safetensors::View;
    let mut header = String::from("{");
    if let Some(meta) = metadata {
        header.push_str("\"__metadata__\":{");
        for (i, (k, v)) in meta.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            header.push_str(&format!("{sep}{}:{}", json_string(k), json_string(v)));
        }
        header.push('}');
    }
    let mut offset = 0usize;
    for (i, (name, t)) in tensors.iter().enumerate() {
        let sep = if i == 0 && metadata.is_none() {
            ""
        } else {
            ","
        };
        let end = offset + t.data_len();
        header.push_str(&format!(
            "{sep}{}:{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{offset},{end}]}}",
            json_string(name),
            View::dtype(t),
            t.dims(),
        ));
        offset = end;
    }
    header.push('}');
    // The data starts 8-aligned, as the safetensors crate writes it.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let result = write_atomic_with(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        for (_, t) in tensors {
            // One tensor at a time on the CPU.
            let t = t
                .to_device(&candle::Device::Cpu)
                .map_err(std::io::Error::other)?;
            w.write_all(&t.data())?;
        }
        Ok(())
    });
    result.map_err(|e| candle::Error::Msg(format!("saving the checkpoint {path:?} failed: {e}")))
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_written_by_hand_read_back() {
        let dir = std::env::temp_dir().join(format!("syncbn-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.safetensors");
        let dev = candle::Device::Cpu;
        let odd = "a\"b\\c\n\u{1}ü";
        let tensors = vec![
            (odd.to_string(), Tensor::new(&[1.5f32, -2.0], &dev).unwrap()),
            ("n".to_string(), Tensor::new(7i64, &dev).unwrap()),
            ("h".to_string(), Tensor::new(&[[1u8, 2, 3]], &dev).unwrap()),
        ];
        save_safetensors_atomic(&p, &tensors, Some(&[("format", "pt")])).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(n % 8, 0);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let format = meta.metadata().as_ref().unwrap().get("format").cloned();
        assert_eq!(format.as_deref(), Some("pt"));
        let back = candle::safetensors::load(&p, &dev).unwrap();
        assert_eq!(back[odd].to_vec1::<f32>().unwrap(), [1.5, -2.0]);
        assert_eq!(back["n"].dims(), &[] as &[usize]);
        assert_eq!(back["n"].to_scalar::<i64>().unwrap(), 7);
        assert_eq!(back["h"].to_vec2::<u8>().unwrap(), [[1, 2, 3]]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = std::env::temp_dir().join(format!("syncbn-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
