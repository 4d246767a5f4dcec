//! A count of the entries of a safetensors header, before anyone parses it.
//!
//! The `safetensors` crate bounds the header (100 MB) and checks every
//! tensor's offsets, but parses the whole header into a map first, and candle
//! then builds a tensor per entry: a 52 MB header of 845 000 zero-size
//! tensors took 710 MB and 13 s to load (70 s in a debug build). [`check`]
//! reads the header's length and counts its top-level entries in one pass
//! over its bytes, without allocating, and refuses more than
//! [`max_entries`] allows: [`MIN_ENTRIES`], or one per
//! [`DATA_BYTES_PER_ENTRY`] bytes of tensor data if that is more. Real
//! checkpoints hold hundreds to tens of thousands of tensors (a state dict
//! of 12 000 layers' counters is 1.2 MB of safetensors); candle's load of
//! 65 536 entries takes about 55 MB.

use crate::error::{error, ErrorKind};
use candle::Result;
use std::io::{BufRead, Read};
use std::path::Path;

/// A header may list this many entries whatever the file's size.
pub(crate) const MIN_ENTRIES: u64 = 1 << 16;

/// Beyond [`MIN_ENTRIES`], one entry per this many bytes of tensor data.
pub(crate) const DATA_BYTES_PER_ENTRY: u64 = 64;

/// The `safetensors` crate's limit on the header's length.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The entries a header may list when the file has `data` bytes of tensor data.
pub(crate) fn max_entries(data: u64) -> u64 {
    (data / DATA_BYTES_PER_ENTRY).max(MIN_ENTRIES)
}

/// Checks the header of the safetensors file `path`: its declared length
/// within the file and the `safetensors` crate's limit, and at most
/// [`max_entries`] top-level entries (tensors and `__metadata__`). Errors
/// name the file and the bound.
pub(crate) fn check(path: &Path) -> Result<()> {
    let err = |msg: String| {
        error(
            ErrorKind::BadCheckpoint,
            format!("checkpoint {path:?}: {msg}"),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let len = file
        .metadata()
        .map_err(|e| err(format!("cannot read: {e}")))?
        .len();
    let mut r = std::io::BufReader::new(file);
    let mut n = [0u8; 8];
    r.read_exact(&mut n)
        .map_err(|e| err(format!("cannot read the safetensors header length: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES {
        return Err(err(format!(
            "the safetensors header declares {n} bytes, more than the safetensors limit of \
             {MAX_HEADER_BYTES} (header too large)"
        )));
    }
    let Some(data) = len.checked_sub(8).and_then(|rest| rest.checked_sub(n)) else {
        return Err(err(format!(
            "the safetensors header declares {n} bytes, the file holds {} after its length",
            len.saturating_sub(8)
        )));
    };
    let limit = max_entries(data);
    let mut counter = EntryCounter::default();
    let mut header = r.take(n);
    loop {
        let buf = header
            .fill_buf()
            .map_err(|e| err(format!("cannot read the safetensors header: {e}")))?;
        if buf.is_empty() {
            return Ok(());
        }
        let used = buf.len();
        counter.feed(buf);
        if counter.entries > limit {
            return Err(err(format!(
                "the safetensors header lists more than {limit} entries, the limit of this file \
                 ({MIN_ENTRIES}, or one per {DATA_BYTES_PER_ENTRY} bytes of its {data} bytes of \
                 tensor data if that is more): parsing it would take memory and time out of \
                 proportion to the file"
            )));
        }
        header.consume(used);
    }
}

/// Counts the keys of the top-level JSON object: the colons outside strings
/// at depth 1.
#[derive(Debug, Default)]
struct EntryCounter {
    depth: u64,
    in_string: bool,
    escaped: bool,
    entries: u64,
}

impl EntryCounter {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                b':' if self.depth == 1 => self.entries += 1,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_top_level_keys_only() {
        let header = br#"{"__metadata__":{"format":"pt","a:b":"{[\":"},"w\":{":{"dtype":"F32","shape":[2,{"x":1}],"data_offsets":[0,8]},"b":{}}"#;
        for split in [1, 7, header.len()] {
            let mut c = EntryCounter::default();
            header.chunks(split).for_each(|part| c.feed(part));
            assert_eq!(c.entries, 3, "chunks of {split}");
            assert_eq!((c.depth, c.in_string), (0, false));
        }
    }

    #[test]
    fn the_limit_scales_with_the_data() {
        assert_eq!(max_entries(0), 65_536);
        assert_eq!(max_entries(64 << 20), 1 << 20);
    }
}
