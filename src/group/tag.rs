//! Call tags: which layer, and which of its calls, a collective belongs to.
//!
//! Shape and dtype alone cannot tell two layers with the same channel count
//! apart: ranks that call them in a different order would sum one layer's
//! statistics with the other's and get wrong numbers, not an error. So every
//! collective a [`SyncBatchNorm`](crate::SyncBatchNorm) issues carries a
//! [`CallTag`] made of the layer's identity, the collective's place in the
//! layer's call (forward statistics, backward gradient sums, …) and the
//! layer's own call counter. The crate's backends compare the tags of all
//! ranks beside the shape and dtype: the TCP and in-process groups on every
//! call, the NCCL group with its debug checks.
//!
//! A layer's identity is a hash of its name (its `VarBuilder` prefix) and of
//! its construction index among the layers of that name built on the same
//! group handle ([`LayerNames`]): names alone do not tell apart the `bn` of a
//! teacher and of a student in one process, layers built from an empty
//! prefix, or converted layers of the same width. Ranks that run the same
//! program build the same layers in the same order, so they give every layer
//! the same identity.
//!
//! Identities are registered when a layer is built, so that an error can name
//! the layer another rank called.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

/// Bits of a tag that hold the layer's identity (the high 24).
const LAYER_SHIFT: u32 = 8;
/// The backward bit.
const BACKWARD: u32 = 1 << 7;
const PART_SHIFT: u32 = 5;
const PART_MASK: u32 = 0b11;
/// The layer's call counter is kept modulo this.
const INDEX_MODULUS: u32 = 1 << PART_SHIFT;
/// At most this many distinct identities are remembered for messages.
const MAX_NAMES: usize = 1 << 14;
/// At most this many layers are remembered per (colliding) identity.
const MAX_NAMES_PER_HASH: usize = 4;
/// Separates a name from its construction index in the identity's hash: a
/// byte that no UTF-8 name contains.
const INDEX_SEPARATOR: u8 = 0xff;

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
/// A tag is 32 bits: a 24-bit identity of the layer, the collective's place
/// in the layer's call, and the layer's call counter modulo 32. The identity
/// hashes the layer's name (its `VarBuilder` prefix, "(root)" for an empty
/// one, the name given with
/// [`SyncBatchNorm::with_name`](crate::SyncBatchNorm::with_name)) and its
/// construction index among the layers of that name built on the same group
/// handle (and its clones): the second layer named `bn` is "SyncBatchNorm
/// 'bn' (2nd of that name)". So layers with equal names (two models in one
/// process, empty prefixes, layers made by
/// [`SyncBatchNorm::from_batch_norm`](crate::SyncBatchNorm::from_batch_norm)
/// of the same width) are told apart as long as every rank builds them in
/// the same order, as ranks running one program do; a clone of a layer is
/// the same layer. Two different layers share an identity with a
/// probability of about 2⁻²⁴ per pair.
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

/// A layer's identity in tags: a hash of its name and of its construction
/// index among the layers of that name on its group (registered for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerId(u32);

impl LayerId {
    /// The identity of the `index`-th layer (from 0) named `name`,
    /// remembered (within bounds) so that messages can name it.
    fn register(name: &str, index: u64) -> Self {
        let id = LayerId(identity_hash(name, index));
        let mut names = registry().lock().unwrap_or_else(|e| e.into_inner());
        let full = names.len() >= MAX_NAMES;
        match names.get_mut(&id.0) {
            Some(list)
                if list.len() < MAX_NAMES_PER_HASH
                    && !list.iter().any(|(n, i)| n == name && *i == index) =>
            {
                list.push((name.to_string(), index));
            }
            Some(_) => {}
            None if !full => {
                names.insert(id.0, vec![(name.to_string(), index)]);
            }
            None => {}
        }
        id
    }
}

/// The layers built on one group handle (shared by its clones): how many of
/// each name, so that the n-th layer of a name gets the same identity on
/// every rank that builds the same layers in the same order.
#[derive(Debug, Default)]
pub(crate) struct LayerNames {
    /// Layers built so far, by the 64-bit hash of their name.
    counts: Mutex<HashMap<u64, u64>>,
}

impl LayerNames {
    /// The identity of a new layer named `name` (counts it).
    pub fn register(&self, name: &str) -> LayerId {
        let index = {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let n = counts.entry(fnv1a64(name.as_bytes())).or_insert(0);
            let index = *n;
            *n += 1;
            index
        };
        LayerId::register(name, index)
    }
}

/// The names (and construction indices) registered for messages, by identity.
type Registry = HashMap<u32, Vec<(String, u64)>>;

fn registry() -> &'static Mutex<Registry> {
    static NAMES: OnceLock<Mutex<Registry>> = OnceLock::new();
    NAMES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A 24-bit hash of `name` (FNV-1a, the same in every process and build),
/// never 0 (0 marks untagged calls): the identity of the first layer of
/// that name.
fn name_hash(name: &str) -> u32 {
    fold(fnv1a64(name.as_bytes()))
}

/// The identity of the `index`-th layer named `name`: [`name_hash`] for the
/// first, else the hash of the name, a separator and the index.
fn identity_hash(name: &str, index: u64) -> u32 {
    if index == 0 {
        return name_hash(name);
    }
    let mut bytes = Vec::with_capacity(name.len() + 9);
    bytes.extend_from_slice(name.as_bytes());
    bytes.push(INDEX_SEPARATOR);
    bytes.extend_from_slice(&index.to_le_bytes());
    fold(fnv1a64(&bytes))
}

/// A 64-bit hash folded to 24 bits, never 0.
fn fold(h: u64) -> u32 {
    (((h ^ (h >> 24) ^ (h >> 48)) & 0x00ff_ffff) as u32).max(1)
}

/// "1st", "2nd", "3rd", "4th", …, "11th", "21st", …
fn ordinal(n: u64) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
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

    /// The tag under which the NCCL group's debug check compares an
    /// [`all_reduce_mean`](super::Backend::all_reduce_mean), so that ranks
    /// mixing a mean with a sum of the same size fail: no layer's (identity
    /// 0, which no layer has).
    pub(crate) const MEAN: CallTag = CallTag(1);

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
    /// Describes the call: the layer's name (and, from the second layer of
    /// a name on a group, its construction index) when such a layer was
    /// built in this process, else the identity's hash.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::UNTAGGED {
            return write!(f, "untagged");
        }
        if *self == Self::MEAN {
            return write!(f, "an all_reduce_mean (gradient averaging)");
        }
        let layer = self.0 >> LAYER_SHIFT;
        let names = registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&layer)
            .map(|layers| {
                layers
                    .iter()
                    .map(|(name, index)| match index {
                        0 => format!("'{name}'"),
                        i => format!("'{name}' ({} of that name)", ordinal(i + 1)),
                    })
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

    /// The identity of the first layer named `name` (on a fresh group).
    fn first(name: &str) -> LayerId {
        LayerNames::default().register(name)
    }

    #[test]
    fn tags_tell_layers_parts_directions_and_calls_apart() {
        let a = first("tag-test.a");
        let b = first("tag-test.b");
        assert_ne!(a, b);
        assert_eq!(a, first("tag-test.a"));
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

    /// Layers of one name on one group get distinct identities, in the
    /// order they are built; another group (another rank's handle) that
    /// builds the same layers gives them the same identities.
    #[test]
    fn layers_of_one_name_are_told_apart_by_construction_order() {
        let (rank0, rank1) = (LayerNames::default(), LayerNames::default());
        let ids0: Vec<LayerId> = (0..4).map(|_| rank0.register("tag-test.bn")).collect();
        let other0 = rank0.register("tag-test.other");
        let ids1: Vec<LayerId> = (0..4).map(|_| rank1.register("tag-test.bn")).collect();
        assert_eq!(ids0, ids1);
        assert_eq!(other0, rank1.register("tag-test.other"));
        for (i, x) in ids0.iter().enumerate() {
            assert_ne!(*x, other0);
            for y in &ids0[i + 1..] {
                assert_ne!(x, y);
            }
        }
        // The first of a name keeps the name's hash.
        assert_eq!(ids0[0].0, name_hash("tag-test.bn"));
        assert_eq!(ids0[1].0, identity_hash("tag-test.bn", 1));
    }

    #[test]
    fn tags_describe_themselves() {
        let a = first("tag-test.layer1.bn2");
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
        // Later layers of a name: their place among the layers of that name.
        let names = LayerNames::default();
        let described: Vec<String> = (0..3)
            .map(|_| CallTag::forward(names.register("tag-test.twin"), Part::Statistics, 0))
            .map(|t| t.to_string())
            .collect();
        assert_eq!(
            described,
            [
                "SyncBatchNorm 'tag-test.twin': forward statistics, call 0 mod 32",
                "SyncBatchNorm 'tag-test.twin' (2nd of that name): forward statistics, call 0 mod 32",
                "SyncBatchNorm 'tag-test.twin' (3rd of that name): forward statistics, call 0 mod 32",
            ]
        );
    }

    #[test]
    fn ordinals() {
        let got: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111, 112]
            .map(ordinal)
            .to_vec();
        assert_eq!(
            got,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd",
                "101st", "111th", "112th"
            ]
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
        let mut bytes = b"a".to_vec();
        bytes.push(0xff);
        bytes.extend_from_slice(&2u64.to_le_bytes());
        assert_eq!(identity_hash("a", 2), fold(fnv1a64(&bytes)));
    }
}
