//! Atomic file writes: a fresh temporary file beside the target, flushed,
//! then renamed over it. Used by checkpoint saves and by the rendezvous' port
//! file.
//!
//! Nothing found at a temporary path is trusted: every save creates its own
//! temporary file under a fresh random name, `.<name>.syncbn-<16 hex>.tmp`,
//! with `O_CREAT | O_EXCL | O_NOFOLLOW` (`create_new` elsewhere), so a link,
//! a file or a lock planted there is never written through, kept or waited
//! for: the name is skipped and another one drawn. The file gets the mode a
//! fresh file gets (`0666 & !umask`) and the saver as owner, and is locked
//! (`flock`) until it is renamed over the target.
//!
//! A save killed midway leaves its temporary file behind, the target
//! untouched. The next save to the same path removes such leftovers: names
//! of that exact pattern in the target's folder that are regular files (not
//! links), with one link, owned by the saver's user, and not locked, i.e.
//! whose writer is gone (a live save holds its lock until the rename).

use candle::{Result, Tensor};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Between the target's name and the random part of a temporary name.
const TEMP_TAG: &str = ".syncbn-";
/// The end of a temporary name.
const TEMP_END: &str = ".tmp";
/// Hex digits of the random part of a temporary name (64 bits).
const RANDOM_DIGITS: usize = 16;
/// At most this many bytes of the target's name go into a temporary name, so
/// that it stays within the 255 bytes file systems allow.
const NAME_BYTES: usize = 200;
/// Names drawn before a save gives up (each taken or locked by someone else).
const TRIES: usize = 16;

/// Writes `bytes` to `path` atomically: to a fresh temporary file in the same
/// folder, flushed to disk, then renamed over `path`, and the folder flushed.
/// A reader sees the old file or the new one, never a partial write;
/// concurrent saves to one path end with one of them whole.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] with the content written by `write` (through a buffer).
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    write_atomic_named(path, &mut random_digits, write)
}

/// [`write_atomic_with`], the random parts of the temporary names drawn from
/// `draw` (the tests give a known sequence).
fn write_atomic_named(
    path: &Path,
    draw: &mut dyn FnMut() -> std::io::Result<String>,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let (dir, prefix) = temp_prefix(path)?;
    let (tmp, file) = create_temp(&dir, &prefix, draw)?;
    remove_stale_temps(&dir, &prefix, &tmp, &file);
    let result = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        write(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        remove_own(&tmp, &file);
    }
    drop(file);
    if result.is_ok() {
        sync_dir(&dir);
    }
    result
}

/// The folder of `path` and the start of its temporary names,
/// `.<name>.syncbn-`.
fn temp_prefix(path: &Path) -> std::io::Result<(PathBuf, String)> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{path:?} does not name a file"),
        )
    })?;
    let mut name = name.to_string_lossy().into_owned();
    if name.len() > NAME_BYTES {
        let mut end = NAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, format!(".{name}{TEMP_TAG}")))
}

/// 64 random bits as 16 lowercase hex digits.
fn random_digits() -> std::io::Result<String> {
    let mut b = [0u8; RANDOM_DIGITS / 2];
    getrandom::fill(&mut b).map_err(std::io::Error::other)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Whether `name` is a temporary name of the target whose names start with
/// `prefix`.
fn is_temp_name(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(TEMP_END))
        .is_some_and(|digits| {
            digits.len() == RANDOM_DIGITS
                && digits
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        })
}

/// Creates and locks a fresh temporary file in `dir`: a new name (never an
/// existing file or link: `O_EXCL | O_NOFOLLOW`) until one is ours alone.
fn create_temp(
    dir: &Path,
    prefix: &str,
    draw: &mut dyn FnMut() -> std::io::Result<String>,
) -> std::io::Result<(PathBuf, File)> {
    for _ in 0..TRIES {
        let tmp = dir.join(format!("{prefix}{}{TEMP_END}", draw()?));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.custom_flags(libc::O_NOFOLLOW);
        }
        let file = match options.open(&tmp) {
            Ok(f) => f,
            // Something (a file, a link) is there already: not ours.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        match file.try_lock() {
            // Still under our name (a cleanup may have taken it in between
            // the creation and the lock): ours alone now.
            Ok(()) if is_at(&file, &tmp)? => return Ok((tmp, file)),
            Ok(()) => {}
            // Another process opened and locked it before we did.
            Err(std::fs::TryLockError::WouldBlock) => remove_own(&tmp, &file),
            Err(std::fs::TryLockError::Error(e)) => {
                remove_own(&tmp, &file);
                return Err(e);
            }
        }
    }
    Err(std::io::Error::other(format!(
        "no temporary file could be created in {dir:?}: {TRIES} fresh names were taken or \
         locked by other processes"
    )))
}

/// Removes the temporary file `tmp` if it still is `file` (ours).
fn remove_own(tmp: &Path, file: &File) {
    if is_at(file, tmp).unwrap_or(false) {
        let _ = std::fs::remove_file(tmp);
    }
}

/// Removes what killed saves left in `dir`: temporary names of this target
/// (`prefix`) that are regular files with one link, owned by the owner of our
/// own temporary file `ours`, and that nobody holds locked (their writer is
/// gone). Best effort: whatever fails to qualify or to go stays.
fn remove_stale_temps(dir: &Path, prefix: &str, ours_path: &Path, ours: &File) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_temp_name(name, prefix) {
            continue;
        }
        let path = entry.path();
        if path == ours_path {
            continue;
        }
        let _ = remove_if_stale(&path, ours);
    }
}

/// Removes the temporary file `path` if it qualifies as a killed save's (see
/// [`remove_stale_temps`]); `Ok(true)` when it did.
fn remove_if_stale(path: &Path, ours: &File) -> std::io::Result<bool> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_file() || !same_owner_single_link(&meta, &ours.metadata()?) {
        return Ok(false);
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Never a link, and no wait on what is not a regular file.
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    if !same_file(&file.metadata()?, &meta) {
        return Ok(false);
    }
    // A live save holds its lock until its rename.
    if file.try_lock().is_err() {
        return Ok(false);
    }
    std::fs::remove_file(path)?;
    Ok(true)
}

#[cfg(unix)]
fn same_owner_single_link(meta: &std::fs::Metadata, ours: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    meta.uid() == ours.uid() && meta.nlink() == 1
}

/// `std` gives no owner or link count on Windows: the lock decides there.
#[cfg(not(unix))]
fn same_owner_single_link(_meta: &std::fs::Metadata, _ours: &std::fs::Metadata) -> bool {
    true
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.is_file() && b.is_file()
}

/// Whether the name `path` (not followed if a link) is the file `file`.
#[cfg(unix)]
fn is_at(file: &File, path: &Path) -> std::io::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(now) => Ok(same_file(&file.metadata()?, &now)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `std` gives no file ids on Windows: there the name is taken as ours
/// while it is a regular file.
#[cfg(not(unix))]
fn is_at(_file: &File, path: &Path) -> std::io::Result<bool> {
    Ok(std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()))
}

/// Flushes the folder `dir`, so that the rename is on disk too (best effort:
/// Windows opens no folder as a file, and there the rename needs no such
/// flush).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
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

    /// A scratch folder for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("syncbn-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The random parts `1, 2, 3, …` in turn.
    #[cfg(unix)]
    fn counting() -> impl FnMut() -> std::io::Result<String> {
        let mut n = 0u64;
        move || {
            n += 1;
            Ok(format!("{n:016x}"))
        }
    }

    /// Whatever is planted at the temporary names a save draws (a symlink, a
    /// hard link, a world-writable file, a file locked by someone else) is
    /// skipped, never written through, kept or waited for: the save takes the
    /// next name, and the checkpoint is a fresh regular file with the owner
    /// and mode of a file the saver creates.
    #[cfg(unix)]
    #[test]
    fn what_is_planted_at_temp_names_is_never_used() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = scratch("planted");
        let p = dir.join("ck.safetensors");
        let name = |n: u64| dir.join(format!(".ck.safetensors.syncbn-{n:016x}.tmp"));
        let victim = dir.join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        let linked = dir.join("linked");
        std::fs::write(&linked, b"linked").unwrap();
        std::os::unix::fs::symlink(&victim, name(1)).unwrap();
        std::fs::hard_link(&linked, name(2)).unwrap();
        std::fs::write(name(3), b"planted").unwrap();
        std::fs::set_permissions(name(3), std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::write(name(4), b"locked").unwrap();
        let held = File::open(name(4)).unwrap();
        held.lock().unwrap();
        // A dangling symlink too: O_CREAT alone would create its target.
        let dangling = dir.join("dangling-target");
        std::os::unix::fs::symlink(&dangling, name(5)).unwrap();

        write_atomic_named(&p, &mut counting(), |w| w.write_all(b"new")).unwrap();

        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        assert_eq!(std::fs::read(&linked).unwrap(), b"linked");
        assert!(!dangling.exists());
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.nlink(), 1);
        let fresh = dir.join("fresh");
        std::fs::write(&fresh, b"").unwrap();
        let fresh = std::fs::metadata(&fresh).unwrap();
        assert_eq!(meta.mode() & 0o7777, fresh.mode() & 0o7777);
        assert_eq!((meta.uid(), meta.gid()), (fresh.uid(), fresh.gid()));
        // The planted things are not the save's to remove (the locked one
        // is a live save's; the world-writable one is the saver's own, of
        // the pattern and unlocked: a leftover, removed).
        assert!(std::fs::symlink_metadata(name(1)).unwrap().is_symlink());
        assert_eq!(std::fs::read(name(2)).unwrap(), b"linked");
        assert!(!name(3).exists());
        assert_eq!(std::fs::read(name(4)).unwrap(), b"locked");
        assert!(std::fs::symlink_metadata(name(5)).unwrap().is_symlink());
        assert!(!name(6).exists());
        drop(held);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A save gives up with an error, not a loop, when every name it draws
    /// is taken, and leaves the target as it was.
    #[test]
    fn a_save_whose_names_are_all_taken_fails() {
        let dir = scratch("taken");
        let p = dir.join("x.bin");
        std::fs::write(&p, b"old").unwrap();
        let taken = dir.join(".x.bin.syncbn-00000000000000aa.tmp");
        std::fs::write(&taken, b"taken").unwrap();
        let mut same = || -> std::io::Result<String> { Ok(String::from("00000000000000aa")) };
        let err = write_atomic_named(&p, &mut same, |w| w.write_all(b"new")).unwrap_err();
        assert!(err.to_string().contains("fresh names were taken"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The next save removes what killed saves left (the pattern's regular
    /// files of the saver with one link, unlocked), and nothing else: not
    /// links, not hard-linked files, not a live save's (locked) file, not
    /// other names, not a FIFO (without blocking on it), not another user's.
    #[cfg(unix)]
    #[test]
    fn stale_temps_are_removed_and_nothing_else() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dir = scratch("stale");
        let p = dir.join("m.safetensors");
        let name = |d: &str| dir.join(format!(".m.safetensors.syncbn-{d}.tmp"));
        let stale = name("0123456789abcdef");
        std::fs::write(&stale, vec![7u8; 1000]).unwrap();
        let outside = dir.join("outside");
        std::fs::write(&outside, b"outside").unwrap();
        std::os::unix::fs::symlink(&outside, name("1111111111111111")).unwrap();
        std::fs::hard_link(&outside, name("2222222222222222")).unwrap();
        std::fs::write(name("3333333333333333"), b"live").unwrap();
        let live = File::open(name("3333333333333333")).unwrap();
        live.lock().unwrap();
        let fifo = name("4444444444444444");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let others = [
            dir.join(".m.safetensors.tmp"),
            name("0123456789ABCDEF"),
            name("0123456789abcde"),
            dir.join(".n.safetensors.syncbn-0123456789abcdef.tmp"),
        ];
        for o in &others {
            std::fs::write(o, b"other").unwrap();
        }
        // Another user's file (only root can make one).
        let foreign = name("5555555555555555");
        std::fs::write(&foreign, b"foreign").unwrap();
        let c = std::ffi::CString::new(foreign.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        let foreign_made =
            unsafe { libc::geteuid() == 0 && libc::chown(c.as_ptr(), 65534, 65534) == 0 };

        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(!stale.exists());
        assert!(std::fs::symlink_metadata(name("1111111111111111"))
            .unwrap()
            .is_symlink());
        assert_eq!(std::fs::read(&outside).unwrap(), b"outside");
        assert_eq!(std::fs::metadata(&outside).unwrap().nlink(), 2);
        assert_eq!(std::fs::read(name("3333333333333333")).unwrap(), b"live");
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        for o in &others {
            assert_eq!(std::fs::read(o).unwrap(), b"other", "{o:?}");
        }
        assert_eq!(foreign.exists(), foreign_made);
        // Once the live save is gone, its file is a leftover too.
        drop(live);
        write_atomic(&p, b"newer").unwrap();
        assert!(!name("3333333333333333").exists());
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
