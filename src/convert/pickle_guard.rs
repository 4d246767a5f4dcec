//! A linear pre-scan of the pickles in a `.pth` file, before candle's pickle
//! reader sees them.
//!
//! candle 0.11's `pickle::Stack` parses with an explicit stack, but the tree of
//! `Object`s it builds is cloned (every BINPUT and BINGET of its memo clones a
//! whole object), compared, printed (`{:?}` in its error messages) and dropped
//! by recursive code, one stack frame per level of nesting: a 400 KB pickle of
//! 200 000 nested tuples overflows any thread's stack and aborts the process,
//! which no caller can catch. Each one-byte opcode also costs a 48-byte
//! `Object`, and a two-byte BINGET copies a whole memoized object, so a small
//! pickle can make the reader allocate out of proportion to the file.
//!
//! [`scan`] walks the opcodes once, without recursion, and mirrors the stack
//! effects of candle's reader (its opcode table and argument lengths) with one
//! small record per stack slot and memo entry: the nesting depth of the object
//! and the number of objects a copy of it takes. It refuses, with the entry's
//! name and the byte offset of the opcode:
//!
//! - nesting deeper than [`MAX_DEPTH`] (a torch.save state dict needs 6
//!   levels, 7 inside a dict of checkpoint entries; see the module tests);
//! - more objects than [`Limits::for_file_len`] allows: at most one object per
//!   [`FILE_BYTES_PER_OBJECT`] bytes of the file, and at least
//!   [`MIN_OBJECTS`], counting copies made through the memo, a new memo key
//!   as two more (candle's hash map entry and its growth), and strings as one
//!   object per 48 bytes (started) of text;
//! - more opcodes than that (PROTO counts as one object of work), so the
//!   bytes read stay in proportion to the file even for a zip entry that
//!   inflates far beyond it;
//! - opcodes candle does not read (it would refuse them too), truncated
//!   arguments, strings longer than what is left of the budget, LONG1 integers
//!   wider than 8 bytes (candle's decoder shifts out of range), and stack
//!   effects candle would refuse (a missing MARK, APPEND onto a non-list, an
//!   unknown memo key, an empty stack at STOP).
//!
//! What passes the scan is safe to hand to candle: its recursion is at most
//! [`MAX_DEPTH`] deep, its allocations are bounded by the object budget (about
//! 48 bytes per object), and its own error paths are not reached through the
//! checks above.

use candle::Result;
use std::collections::HashMap;
use std::io::{BufRead, Read};

/// The deepest nesting of containers (tuples, lists, dicts, reduce and build
/// calls, persistent ids) a pickle may have. torch.save's state dicts nest 6
/// levels, checkpoints with optimizer state a few more. candle's recursive
/// code (its `{:?}` of an object in an error message, then the drop) ran
/// 3 000 levels in a 2 MiB thread and overflowed at 4 000 in a debug build
/// (measured with candle 0.11.1): 256 levels leave it a margin of 10.
pub(crate) const MAX_DEPTH: u32 = 256;

/// A pickle may make candle's reader build one object per this many bytes of
/// the file (at 48 bytes an object, about 24 bytes of memory per byte of
/// file). torch.save memoizes every object and candle copies each one into
/// its memo: a state dict of scalars, the densest real case, needs about one
/// object per 2.7 bytes of the file (12 000 scalars: 1.54 million objects in
/// 4.1 MB; see tests/cpu/checkpoint.rs).
pub(crate) const FILE_BYTES_PER_OBJECT: u64 = 2;

/// The object budget of small files (about 48 MiB of candle objects).
pub(crate) const MIN_OBJECTS: u64 = 1 << 20;

/// Bytes an `Object` of candle's pickle reader takes, the unit of the budget.
fn object_bytes() -> u64 {
    std::mem::size_of::<candle::pickle::Object>() as u64
}

/// What a pickle may make candle's reader build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Deepest nesting of containers.
    pub(crate) max_depth: u32,
    /// Most objects built in all, copies through the memo included.
    pub(crate) max_objects: u64,
}

impl Limits {
    /// The limits for a pickle inside a file of `file_len` bytes.
    pub(crate) fn for_file_len(file_len: u64) -> Self {
        Self {
            max_depth: MAX_DEPTH,
            max_objects: (file_len / FILE_BYTES_PER_OBJECT).max(MIN_OBJECTS),
        }
    }
}

/// What [`scan`] found in a pickle that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanReport {
    /// Bytes up to and including STOP.
    pub(crate) bytes: u64,
    /// Objects candle's reader builds, copies through the memo included
    /// (with the `spent` of earlier pickles).
    pub(crate) objects: u64,
    /// Deepest nesting of containers.
    pub(crate) depth: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mark,
    List,
    Dict,
    /// `collections.OrderedDict`/`defaultdict`: candle reduces them to a dict.
    DictClass,
    Other,
}

/// One object on the simulated stack or in the memo: its nesting depth and
/// the objects a copy of it takes.
#[derive(Debug, Clone, Copy)]
struct Slot {
    objects: u32,
    depth: u16,
    kind: Kind,
}

impl Slot {
    fn leaf(kind: Kind) -> Self {
        Self {
            objects: 1,
            depth: 1,
            kind,
        }
    }
}

struct Scanner<'a, R> {
    r: R,
    what: &'a str,
    limits: Limits,
    offset: u64,
    op_offset: u64,
    stack: Vec<Slot>,
    /// Positions in `stack` of its MARK slots, innermost last.
    marks: Vec<usize>,
    memo: HashMap<u32, Slot>,
    objects: u64,
    depth: u32,
}

/// Scans the pickle `r` (named `what` in errors, e.g. the file and zip entry)
/// and returns what it holds, or an error naming the first opcode, by byte
/// offset, that breaks the [`Limits`] or that candle's reader would refuse.
/// `spent` objects of the budget went to earlier pickles of the same file
/// (the report's count includes them). Reads at most up to STOP; memory
/// stays in proportion to the budget.
pub(crate) fn scan<R: BufRead>(r: R, what: &str, limits: Limits, spent: u64) -> Result<ScanReport> {
    let mut s = Scanner {
        r,
        what,
        limits,
        offset: 0,
        op_offset: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: spent,
        depth: 0,
    };
    while !s.step()? {}
    if s.stack.is_empty() {
        return Err(s.err("STOP with an empty stack: the pickle holds no object"));
    }
    Ok(ScanReport {
        bytes: s.offset,
        objects: s.objects,
        depth: s.depth,
    })
}

/// Objects a string of `len` bytes counts for: its `Object` and its text.
fn string_objects(len: u64) -> u64 {
    1 + len.div_ceil(object_bytes())
}

impl<R: BufRead> Scanner<'_, R> {
    fn err(&self, msg: impl std::fmt::Display) -> candle::Error {
        candle::Error::Msg(format!("{} at byte {}: {msg}", self.what, self.op_offset))
    }

    fn read<const N: usize>(&mut self, arg: &str) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        match self.r.read_exact(&mut buf) {
            Ok(()) => {
                self.offset += N as u64;
                Ok(buf)
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(self.err(format!(
                "truncated: the {arg} needs {N} bytes, the pickle ends first"
            ))),
            Err(e) => Err(self.err(format!("cannot read the {arg}: {e}"))),
        }
    }

    /// Skips `n` bytes of an argument, failing if the pickle ends first.
    fn skip(&mut self, n: u64, arg: &str) -> Result<()> {
        let got = std::io::copy(&mut self.r.by_ref().take(n), &mut std::io::sink())
            .map_err(|e| self.err(format!("cannot read the {arg}: {e}")))?;
        self.offset += got;
        if got < n {
            return Err(self.err(format!(
                "truncated: the {arg} declares {n} bytes, the pickle ends after {got}"
            )));
        }
        Ok(())
    }

    /// Reads a GLOBAL line (up to `\n`, `\r` dropped as candle does); keeps
    /// the first 64 bytes, returns the full length.
    fn line(&mut self, arg: &str, keep: &mut Vec<u8>) -> Result<u64> {
        let max = self.budget_left().saturating_mul(object_bytes());
        let mut len = 0u64;
        loop {
            let (what, at) = (self.what, self.op_offset);
            let fail = |msg: String| candle::Error::Msg(format!("{what} at byte {at}: {msg}"));
            let buf = self
                .r
                .fill_buf()
                .map_err(|e| fail(format!("cannot read the {arg}: {e}")))?;
            if buf.is_empty() {
                return Err(fail(format!(
                    "truncated: the {arg} has no end of line before the pickle ends"
                )));
            }
            let (n, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            let room = 64usize.saturating_sub(keep.len()).min(n);
            keep.extend_from_slice(&buf[..room]);
            self.r.consume(n);
            self.offset += n as u64;
            len += n as u64;
            if done {
                if keep.last() == Some(&b'\n') {
                    keep.pop();
                    if keep.last() == Some(&b'\r') {
                        keep.pop();
                    }
                }
                return Ok(len);
            }
            if len > max {
                return Err(self.over_budget(&format!("a {arg} of more than {len} bytes: ")));
            }
        }
    }

    fn budget_left(&self) -> u64 {
        self.limits.max_objects.saturating_sub(self.objects)
    }

    /// The object limit is reached; `what` is the opcode's part, if any.
    fn over_budget(&self, what: &str) -> candle::Error {
        self.err(format!(
            "{what}the pickle needs more objects than the object limit of this file, {} \
             (one per {FILE_BYTES_PER_OBJECT} bytes of the file, at least {MIN_OBJECTS}; \
             candle's pickle reader takes {} bytes an object and copies a memoized object \
             whole on every get), {} counted so far",
            self.limits.max_objects,
            object_bytes(),
            self.objects,
        ))
    }

    /// Counts `n` objects built.
    fn charge(&mut self, n: u64) -> Result<()> {
        self.objects = self.objects.saturating_add(n);
        if self.objects > self.limits.max_objects {
            return Err(self.over_budget(""));
        }
        Ok(())
    }

    /// Records a nesting depth reached, refusing one past the limit.
    fn reach(&mut self, depth: u16) -> Result<()> {
        if u32::from(depth) > self.limits.max_depth {
            return Err(self.err(format!(
                "objects nested more than {} levels deep (the nesting depth limit \
                 of this loader; candle's pickle reader recurses once per level)",
                self.limits.max_depth
            )));
        }
        self.depth = self.depth.max(u32::from(depth));
        Ok(())
    }

    /// Pushes a new object (counted here).
    fn push(&mut self, slot: Slot) -> Result<()> {
        self.charge(1)?;
        self.place(slot)
    }

    /// Pushes an object whose objects are counted already.
    fn place(&mut self, slot: Slot) -> Result<()> {
        self.reach(slot.depth)?;
        if slot.kind == Kind::Mark {
            self.marks.push(self.stack.len());
        }
        self.stack.push(slot);
        Ok(())
    }

    fn pop(&mut self, op: &str) -> Result<Slot> {
        let slot = self
            .stack
            .pop()
            .ok_or_else(|| self.err(format!("{op} needs an object, the stack is empty")))?;
        if slot.kind == Kind::Mark {
            self.marks.pop();
        }
        Ok(slot)
    }

    /// Pops the objects above the innermost MARK, and the MARK.
    fn pop_to_mark(&mut self, op: &str) -> Result<Vec<Slot>> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err(format!("{op} without a MARK before it")));
        };
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    /// A container holding `items`, the objects of its storage counted.
    fn container(&mut self, kind: Kind, items: &[Slot]) -> Result<Slot> {
        self.charge(items.len() as u64)?;
        Ok(Self::wrap(kind, items))
    }

    fn wrap(kind: Kind, items: &[Slot]) -> Slot {
        let objects = items.iter().fold(1u32, |n, s| n.saturating_add(s.objects));
        let depth = items.iter().map(|s| s.depth).max().unwrap_or(0) + 1;
        Slot {
            objects,
            depth,
            kind,
        }
    }

    /// Adds `items` to the list or dict on top of the stack.
    fn extend_top(&mut self, op: &str, want: Kind, items: &[Slot]) -> Result<()> {
        self.charge(items.len() as u64)?;
        let Some(top) = self.stack.last_mut() else {
            return Err(self.err(format!(
                "{op} needs a {want:?} below its items, the stack is empty"
            )));
        };
        if top.kind != want {
            let kind = top.kind;
            return Err(self.err(format!(
                "{op} needs a {want:?} below its items, found a {kind:?}"
            )));
        }
        for s in items {
            top.objects = top.objects.saturating_add(s.objects);
            top.depth = top.depth.max(s.depth + 1);
        }
        let depth = top.depth;
        self.reach(depth)
    }

    /// A copy of `slot` (memo put or get): its objects are built again.
    fn copy(&mut self, slot: Slot) -> Result<Slot> {
        self.charge(u64::from(slot.objects))?;
        Ok(slot)
    }

    fn memo_key<const N: usize>(&mut self) -> Result<u32> {
        let b = self.read::<N>("memo key")?;
        Ok(b.iter().rev().fold(0u32, |k, &b| (k << 8) | u32::from(b)))
    }

    /// One opcode; `true` at STOP.
    fn step(&mut self) -> Result<bool> {
        self.op_offset = self.offset;
        let [op] = self.read::<1>("opcode")?;
        match op {
            0x80 => {
                self.read::<1>("protocol number")?;
                // Builds nothing, but counts as work: every opcode does, so
                // the bytes scanned stay in proportion to the budget.
                self.charge(1)?;
            }
            b'c' => {
                let (mut module, mut name) = (Vec::new(), Vec::new());
                let len = self.line("GLOBAL module name", &mut module)?
                    + self.line("GLOBAL class name", &mut name)?;
                let kind = if module == b"collections"
                    && (name == b"OrderedDict" || name == b"defaultdict")
                {
                    Kind::DictClass
                } else {
                    Kind::Other
                };
                self.charge(string_objects(len) - 1)?;
                self.push(Slot::leaf(kind))?;
            }
            b'K' => self.leaf_with_arg::<1>("BININT1 argument")?,
            b'M' => self.leaf_with_arg::<2>("BININT2 argument")?,
            b'J' => self.leaf_with_arg::<4>("BININT argument")?,
            b'G' => self.leaf_with_arg::<8>("BINFLOAT argument")?,
            b'X' => {
                let len = u64::from(u32::from_le_bytes(self.read("BINUNICODE length")?));
                let need = string_objects(len);
                if need > self.budget_left() {
                    return Err(self.over_budget(&format!("a BINUNICODE string of {len} bytes: ")));
                }
                self.skip(len, "BINUNICODE string")?;
                self.charge(need - 1)?;
                self.push(Slot {
                    objects: u32::try_from(need).unwrap_or(u32::MAX),
                    ..Slot::leaf(Kind::Other)
                })?;
            }
            0x8a => {
                let [n] = self.read::<1>("LONG1 length")?;
                if n > 8 {
                    return Err(self.err(format!(
                        "a LONG1 integer of {n} bytes; candle's reader decodes at most 8"
                    )));
                }
                self.skip(u64::from(n), "LONG1 integer")?;
                self.push(Slot::leaf(Kind::Other))?;
            }
            b'Q' => {
                let id = self.pop("BINPERSID")?;
                let slot = self.container(Kind::Other, &[id])?;
                self.push(slot)?;
            }
            b't' => {
                let items = self.pop_to_mark("TUPLE")?;
                let slot = self.container(Kind::Other, &items)?;
                self.push(slot)?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop("TUPLE1/2/3")?);
                }
                let slot = self.container(Kind::Other, &items)?;
                self.push(slot)?;
            }
            0x88 | 0x89 | b'N' | b')' => self.push(Slot::leaf(Kind::Other))?,
            b']' => self.push(Slot::leaf(Kind::List))?,
            // candle reads DICT as EMPTY_DICT (its MARK stays on the stack).
            b'}' | b'd' => self.push(Slot::leaf(Kind::Dict))?,
            b'(' => self.push(Slot::leaf(Kind::Mark))?,
            b'a' => {
                let value = self.pop("APPEND")?;
                self.extend_top("APPEND", Kind::List, &[value])?;
            }
            b'e' => {
                let items = self.pop_to_mark("APPENDS")?;
                self.extend_top("APPENDS", Kind::List, &items)?;
            }
            b's' => {
                let value = self.pop("SETITEM")?;
                let key = self.pop("SETITEM")?;
                self.extend_top("SETITEM", Kind::Dict, &[key, value])?;
            }
            b'u' => {
                let items = self.pop_to_mark("SETITEMS")?;
                if items.len() % 2 != 0 {
                    return Err(self.err(format!(
                        "SETITEMS with an odd number of objects ({})",
                        items.len()
                    )));
                }
                self.extend_top("SETITEMS", Kind::Dict, &items)?;
            }
            b'b' => {
                let args = self.pop("BUILD")?;
                let obj = self.pop("BUILD")?;
                let slot = if obj.kind == Kind::Dict && args.kind == Kind::Dict {
                    // candle moves the entries of `args` into `obj`.
                    self.charge(u64::from(args.objects))?;
                    Slot {
                        objects: obj.objects.saturating_add(args.objects),
                        depth: obj.depth.max(args.depth),
                        kind: Kind::Dict,
                    }
                } else {
                    self.container(Kind::Other, &[obj, args])?
                };
                self.push(slot)?;
            }
            b'R' | 0x81 => {
                let args = self.pop("REDUCE")?;
                let callable = self.pop("REDUCE")?;
                let slot = if op == b'R' && callable.kind == Kind::DictClass {
                    Slot::leaf(Kind::Dict)
                } else {
                    self.container(Kind::Other, &[callable, args])?
                };
                self.push(slot)?;
            }
            b'h' | b'j' => {
                let key = if op == b'h' {
                    self.memo_key::<1>()?
                } else {
                    self.memo_key::<4>()?
                };
                let Some(&slot) = self.memo.get(&key) else {
                    return Err(self.err(format!("memo key {key} was never stored")));
                };
                let slot = self.copy(slot)?;
                self.place(slot)?;
            }
            b'q' | b'r' => {
                let key = if op == b'q' {
                    self.memo_key::<1>()?
                } else {
                    self.memo_key::<4>()?
                };
                let Some(&top) = self.stack.last() else {
                    return Err(self.err("BINPUT with an empty stack"));
                };
                let slot = self.copy(top)?;
                // A new key: candle's hash map entry (a key and an object)
                // and its share of the map's growth.
                if self.memo.insert(key, slot).is_none() {
                    self.charge(2)?;
                }
            }
            b'.' => return Ok(true),
            other => {
                return Err(self.err(format!(
                    "opcode 0x{other:02x} ({:?}), which candle's pickle reader does not support \
                     (torch.save writes protocol 2)",
                    char::from(other)
                )))
            }
        }
        Ok(false)
    }

    fn leaf_with_arg<const N: usize>(&mut self, arg: &str) -> Result<()> {
        self.read::<N>(arg)?;
        self.push(Slot::leaf(Kind::Other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::for_file_len(0)
    }

    fn run(pickle: &[u8]) -> Result<ScanReport> {
        scan(pickle, "test.pkl", limits(), 0)
    }

    #[test]
    fn state_dict_passes() {
        // torch.save({"w": tensor}) as candle's own test file has it.
        let mut p =
            b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02".to_vec();
        p.extend_from_slice(
            b"ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04",
        );
        p.extend_from_slice(b"ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x04tq\x08Q");
        p.extend_from_slice(b"K\x00K\x04\x85q\tK\x01\x85q\n\x89h\x00)Rq\x0btq\x0cRq\rs.");
        let r = run(&p).unwrap();
        assert_eq!(r.bytes, p.len() as u64);
        // dict > reduce > args tuple > persistent id > storage tuple > class.
        assert_eq!(r.depth, 6);
        // torch memoizes every object: most of these are memo copies and
        // the 14 memo entries.
        assert_eq!(r.objects, 143, "{r:?}");
    }

    #[test]
    fn build_merges_dicts_as_candle_does() {
        // {"a": None} BUILD {"m": {}}: candle merges the entries, one dict.
        let p = b"\x80\x02}(X\x01\x00\x00\x00aNu}X\x01\x00\x00\x00m}sb.";
        assert_eq!(run(p).unwrap().depth, 2);
        // Anything else builds a `Build` object around both.
        let p = b"\x80\x02]}X\x01\x00\x00\x00m}sb.";
        assert_eq!(run(p).unwrap().depth, 3);
        // A dict, then SETITEM onto it, only after candle's reduce of OrderedDict.
        let ok = b"\x80\x02ccollections\nOrderedDict\n)RNNs.";
        assert_eq!(run(ok).unwrap().depth, 2);
        let err = run(b"\x80\x02ccollections\nChainMap\n)RNNs.").unwrap_err();
        assert!(err.to_string().contains("SETITEM needs a Dict"), "{err}");
    }

    #[test]
    fn refusals_name_offset_and_cause() {
        let cases: &[(&[u8], &str)] = &[
            (b"\x80\x02)\x85\x85", "truncated: the opcode"),
            (
                b"\x80\x02X\xff\xff\xff\x7fab.",
                "BINUNICODE string of 2147483647 bytes",
            ),
            (b"\x80\x02X\x05\x00\x00\x00ab", "the pickle ends after 2"),
            (b"\x80\x02\x8c\x01a.", "at byte 2: opcode 0x8c"),
            (b"\x80\x02]Na.", "at byte 4: objects nested"),
            (b"\x80\x02Nt.", "TUPLE without a MARK"),
            (
                b"\x80\x02NNa.",
                "APPEND needs a List below its items, found a Other",
            ),
            (b"\x80\x02h\x07.", "memo key 7 was never stored"),
            (b"\x80\x02\x8a\x09123456789.", "LONG1 integer of 9 bytes"),
            (b"\x80\x02.", "STOP with an empty stack"),
            (b"\x80\x02}(Nu.", "odd number"),
            (b"\x80\x02cfoo\nbar", "GLOBAL class name has no end of line"),
        ];
        for (pickle, want) in cases {
            let limits = Limits {
                max_depth: if want.contains("nested") {
                    1
                } else {
                    MAX_DEPTH
                },
                ..limits()
            };
            let err = scan(*pickle, "test.pkl", limits, 0)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("test.pkl at byte "), "{err}");
            assert!(err.contains(want), "{pickle:?}: {err}");
        }
    }

    #[test]
    fn depth_counts_every_container() {
        let nested = |n: usize| {
            let mut p = vec![0x80, 2, b')'];
            p.extend(std::iter::repeat_n(0x85, n));
            p.push(b'.');
            p
        };
        assert_eq!(
            run(&nested(MAX_DEPTH as usize - 1)).unwrap().depth,
            MAX_DEPTH
        );
        let err = run(&nested(MAX_DEPTH as usize)).unwrap_err().to_string();
        assert!(err.contains("nested more than 256 levels"), "{err}");
        // Lists nested through APPEND, dicts through SETITEM, marks and tuples.
        let mut lists = vec![0x80, 2];
        lists.extend(std::iter::repeat_n(b']', 300));
        lists.extend(std::iter::repeat_n(b'a', 299));
        assert!(run(&lists)
            .unwrap_err()
            .to_string()
            .contains("nested more than"));
        let mut tuples = vec![0x80, 2];
        tuples.extend(std::iter::repeat_n(b'(', 300));
        tuples.extend(std::iter::repeat_n(b't', 300));
        assert!(run(&tuples)
            .unwrap_err()
            .to_string()
            .contains("nested more than"));
    }

    #[test]
    fn memo_copies_are_counted() {
        // A tuple of 1000 objects, memoized, then fetched again and again:
        // two bytes per copy of 1001 objects.
        let mut p = vec![0x80, 2, b'('];
        p.extend(std::iter::repeat_n(b'N', 1000));
        p.extend_from_slice(b"tq\x00");
        p.extend(std::iter::repeat_n([b'h', 0], 2000).flatten());
        let limits = Limits {
            max_objects: 1_000_000,
            ..limits()
        };
        let err = scan(&p[..], "m.pkl", limits, 0).unwrap_err().to_string();
        // Each BINGET (2 bytes from byte 1006 on) copies 1001 objects: the
        // 996th passes the limit.
        assert!(
            err.starts_with("m.pkl at byte 2996: ")
                && err.contains("object limit of this file, 1000000 "),
            "{err}"
        );
    }
}
