//! Call tags: which layer, and which of its calls, a collective belongs to.
//!
//! Shape and dtype alone cannot tell two layers with the same channel count
//! apart: ranks that call them in a different order would sum one layer's
//! statistics with the other's and get wrong numbers, not an error. So every
//! collective a [`SyncBatchNorm`](crate::SyncBatchNorm) issues carries a
//! [`CallTag`] made of a hash of the layer's name, the collective's place in
//! the layer's call (forward statistics, backward gradient sums, …) and the
//! layer's own call counter. The crate's backends compare the tags of all
//! ranks beside the shape and dtype: the TCP and in-process groups on every
//! call, the NCCL group with its debug checks.
//!
//! The layer's name is its `VarBuilder` prefix. Layers without a distinct
//! one cannot be told apart (see [`CallTag`]).
//!
//! Names are registered when a layer is built, so that an error can name the
//! layer another rank called: ranks that run the same model build the same
//! layers.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

/// Bits of a tag that hold the layer's name hash (the high 24).
const LAYER_SHIFT: u32 = 8;
/// The backward bit.
const BACKWARD: u32 = 1 << 7;
const PART_SHIFT: u32 = 5;
const PART_MASK: u32 = 0b11;
/// The layer's call counter is kept modulo this.
const INDEX_MODULUS: u32 = 1 << PART_SHIFT;
/// At most this many distinct name hashes are remembered for messages.
const MAX_NAMES: usize = 1 << 14;
/// At most this many names are remembered per (colliding) hash.
const MAX_NAMES_PER_HASH: usize = 4;

/// Which collective of which layer a call is, for the agreement check of the
/// collective: ranks whose tags differ made different calls, even when the
/// shapes and dtypes agree (two layers with the same channel count called in
/// a different order).
///
/// The crate's layers tag their all-reduces; every other collective is
/// [`CallTag::UNTAGGED`]. A [`Backend`](super::Backend) receives tags through
/// [`Backend::all_reduce_sum_tagged`](super::Backend::all_reduce_sum_tagged);
/// one that checks agreement compares [`CallTag::value`] across ranks and can
/// describe a peer's value with [`CallTag::from_value`] and `Display`
/// ("SyncBatchNorm 'layer1.bn2': forward statistics, call 3 mod 32").
///
/// A tag is 32 bits: a 24-bit hash of the layer's name (its `VarBuilder`
/// prefix), the collective's place in the layer's call, and the layer's
/// call counter modulo 32. Two different names share a hash with a
/// probability of about 2⁻²⁴ per pair. Layers without a distinct name
/// cannot be told apart: those built with an empty prefix are all
/// "(root)", and those made by
/// [`SyncBatchNorm::from_batch_norm`](crate::SyncBatchNorm::from_batch_norm)
/// are named after their channel count until renamed with
/// [`SyncBatchNorm::with_name`](crate::SyncBatchNorm::with_name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CallTag(u32);

/// The collective's place in a layer's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The statistics of the kernel path (one all-reduce each way).
    Statistics = 0,
    /// The composed path's mean (with the count).
    Mean = 1,
    /// The composed path's variance.
    Variance = 2,
}

/// A layer's identity in tags: the hash of its name (registered for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerId(u32);

impl LayerId {
    /// The identity of the layer named `name`, remembered (within bounds) so
    /// that messages can name it.
    pub fn register(name: &str) -> Self {
        let id = LayerId(name_hash(name));
        let mut names = registry().lock().unwrap_or_else(|e| e.into_inner());
        let full = names.len() >= MAX_NAMES;
        match names.get_mut(&id.0) {
            Some(list) if list.len() < MAX_NAMES_PER_HASH && !list.iter().any(|n| n == name) => {
                list.push(name.to_string());
            }
            Some(_) => {}
            None if !full => {
                names.insert(id.0, vec![name.to_string()]);
            }
            None => {}
        }
        id
    }
}

fn registry() -> &'static Mutex<HashMap<u32, Vec<String>>> {
    static NAMES: OnceLock<Mutex<HashMap<u32, Vec<String>>>> = OnceLock::new();
    NAMES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A 24-bit hash of `name` (FNV-1a, the same in every process and build),
/// never 0 (0 marks untagged calls).
fn name_hash(name: &str) -> u32 {
    let h = fnv1a64(name.as_bytes());
    let folded = ((h ^ (h >> 24) ^ (h >> 48)) & 0x00ff_ffff) as u32;
    folded.max(1)
}

/// The 64-bit FNV-1a hash of `bytes`.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl CallTag {
    /// The tag of collectives that belong to no layer (gradient averaging,
    /// parameter broadcasts, barriers, splits, users' own calls).
    pub const UNTAGGED: CallTag = CallTag(0);

    /// The forward collective `part` of call `index` of `layer`.
    pub(crate) fn forward(layer: LayerId, part: Part, index: u64) -> Self {
        let index = (index % u64::from(INDEX_MODULUS)) as u32;
        CallTag((layer.0 << LAYER_SHIFT) | ((part as u32) << PART_SHIFT) | index)
    }

    /// The same collective's counterpart in the backward pass (untagged
    /// stays untagged).
    pub(crate) fn backward(self) -> Self {
        if self == Self::UNTAGGED {
            self
        } else {
            CallTag(self.0 | BACKWARD)
        }
    }

    /// The tag as a number, to compare across ranks (`0`: untagged).
    pub fn value(self) -> u32 {
        self.0
    }

    /// The tag of [`CallTag::value`] `value` (e.g. received from another rank).
    pub fn from_value(value: u32) -> Self {
        CallTag(value)
    }
}

impl fmt::Display for CallTag {
    /// Describes the call: the layer's name when a layer of that name was
    /// built in this process, else the name's hash.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::UNTAGGED {
            return write!(f, "untagged");
        }
        let layer = self.0 >> LAYER_SHIFT;
        let names = registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&layer)
            .map(|names| {
                names
                    .iter()
                    .map(|n| format!("'{n}'"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            });
        match names {
            Some(names) => write!(f, "SyncBatchNorm {names}")?,
            None => write!(f, "layer #{layer:06x} (no layer of that name here)")?,
        }
        let direction = if self.0 & BACKWARD != 0 {
            "backward"
        } else {
            "forward"
        };
        let part = match (self.0 >> PART_SHIFT) & PART_MASK {
            0 if self.0 & BACKWARD != 0 => "gradient sums",
            0 => "statistics",
            1 => "mean (composed ops)",
            2 => "variance (composed ops)",
            _ => "unknown part",
        };
        let index = self.0 % INDEX_MODULUS;
        write!(f, ": {direction} {part}, call {index} mod {INDEX_MODULUS}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_tell_layers_parts_directions_and_calls_apart() {
        let a = LayerId::register("tag-test.a");
        let b = LayerId::register("tag-test.b");
        assert_ne!(a, b);
        assert_eq!(a, LayerId::register("tag-test.a"));
        let fa = CallTag::forward(a, Part::Statistics, 3);
        let tags = [
            fa,
            fa.backward(),
            CallTag::forward(b, Part::Statistics, 3),
            CallTag::forward(a, Part::Statistics, 4),
            CallTag::forward(a, Part::Mean, 3),
            CallTag::forward(a, Part::Variance, 3),
            CallTag::forward(a, Part::Variance, 3).backward(),
        ];
        for (i, x) in tags.iter().enumerate() {
            assert_ne!(*x, CallTag::UNTAGGED);
            for y in &tags[i + 1..] {
                assert_ne!(x, y);
            }
        }
        // The counter is kept modulo 32.
        assert_eq!(fa, CallTag::forward(a, Part::Statistics, 35));
        assert_eq!(CallTag::UNTAGGED.backward(), CallTag::UNTAGGED);
        assert_eq!(CallTag::from_value(fa.value()), fa);
    }

    #[test]
    fn tags_describe_themselves() {
        let a = LayerId::register("tag-test.layer1.bn2");
        assert_eq!(
            CallTag::forward(a, Part::Statistics, 3).to_string(),
            "SyncBatchNorm 'tag-test.layer1.bn2': forward statistics, call 3 mod 32"
        );
        assert_eq!(
            CallTag::forward(a, Part::Statistics, 3)
                .backward()
                .to_string(),
            "SyncBatchNorm 'tag-test.layer1.bn2': backward gradient sums, call 3 mod 32"
        );
        assert_eq!(
            CallTag::forward(a, Part::Variance, 0)
                .backward()
                .to_string(),
            "SyncBatchNorm 'tag-test.layer1.bn2': backward variance (composed ops), call 0 mod 32"
        );
        assert_eq!(CallTag::UNTAGGED.to_string(), "untagged");
        // A name built only elsewhere: its hash.
        let unknown = CallTag::from_value(name_hash("tag-test.never-built") << LAYER_SHIFT);
        assert_eq!(
            unknown.to_string(),
            format!(
                "layer #{:06x} (no layer of that name here): forward statistics, call 0 mod 32",
                name_hash("tag-test.never-built")
            )
        );
    }

    #[test]
    fn name_hash_is_stable() {
        // FNV-1a's published test vectors: the same value in every process,
        // build and platform (unlike std's hashers).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let h = fnv1a64(b"a");
        assert_eq!(
            name_hash("a"),
            ((h ^ (h >> 24) ^ (h >> 48)) & 0xff_ffff) as u32
        );
        assert!(name_hash("bn1") > 0 && name_hash("bn1") < (1 << 24));
    }
}
