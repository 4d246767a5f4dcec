//! A linear pre-scan of the pickles in a `.pth` file, before candle's pickle
//! reader sees them.
//!
//! candle 0.11's `pickle::Stack` parses with an explicit stack, but the tree of
//! `Object`s it builds is cloned (every BINPUT and BINGET of its memo clones a
//! whole object, strings and class names included), compared, printed (`{:?}`
//! in its error messages) and dropped by recursive code, one stack frame per
//! level of nesting: a 400 KB pickle of 200 000 nested tuples overflows any
//! thread's stack and aborts the process, which no caller can catch; a 1.4 MB
//! pickle that memoizes a class with a 1 MiB module name and fetches it
//! 200 000 times makes it copy 200 GB.
//!
//! [`scan`] walks the opcodes once, without recursion, and mirrors what
//! candle's reader does with them (its opcode table, argument lengths, stack
//! effects and allocations) with one small record per stack slot and memo
//! entry: the nesting depth of the object, the bytes a copy of it allocates,
//! and a bound of the length of its `{:?}` text. It counts, in bytes:
//!
//! - every allocation the reader makes: strings (a class name as the lossy
//!   UTF-8 text candle keeps, up to 3 bytes per byte that is not ASCII, and
//!   the buffers it reads the line into), the buffers of tuples, lists and
//!   dicts (those that grow, as a `Vec` grows), boxes, the growth of its stack
//!   and of its memo's hash table, each block as the allocator rounds it;
//! - every copy through the memo (BINPUT, BINGET, LONG_BINGET) by the bytes
//!   the clone allocates: the whole tree of the object, strings included;
//! - every byte of the pickle read (so a zip entry that inflates far beyond
//!   the file is refused too), and at STOP the `{:?}` text of the result, of
//!   which candle prints parts in its error messages about tensor entries.
//!
//! The total only grows (nothing freed is given back), so it bounds the
//! reader's peak. The scan refuses, with the entry's name and the byte offset
//! of the opcode:
//!
//! - nesting deeper than [`MAX_DEPTH`] (a torch.save state dict needs 6
//!   levels, 7 inside a dict of checkpoint entries; see the module tests);
//! - a total above [`Limits::for_file_len`]: [`BYTES_PER_FILE_BYTE`] times the
//!   file's size, at least [`MIN_BYTES`], for all pickles of the file together;
//! - opcodes candle does not read (it would refuse them too), truncated
//!   arguments, strings longer than what is left of the budget, LONG1 integers
//!   wider than 8 bytes (candle's decoder shifts out of range), and stack
//!   effects candle would refuse (a missing MARK, APPEND onto a non-list, an
//!   unknown memo key, an empty stack at STOP).
//!
//! What passes the scan is safe to hand to candle: its recursion is at most
//! [`MAX_DEPTH`] deep, its allocations are within the budget, and its own
//! error paths are not reached through the checks above.

use crate::error::{error, ErrorKind};
use candle::Result;
use std::collections::HashMap;
use std::io::BufRead;

/// The deepest nesting of containers (tuples, lists, dicts, reduce and build
/// calls, persistent ids) a pickle may have. torch.save's state dicts nest 6
/// levels, checkpoints with optimizer state a few more. candle's recursive
/// code (its `{:?}` of an object in an error message, then the drop) ran
/// 3 000 levels in a 2 MiB thread and overflowed at 4 000 in a debug build
/// (measured with candle 0.11.1): 256 levels leave it a margin of 10.
pub(crate) const MAX_DEPTH: u32 = 256;

/// candle's reader may allocate (and read) this many bytes per byte of the
/// file. torch.save memoizes every object and candle copies each one into
/// its memo: torch.save's state dict of 12 000 scalars, the densest real
/// case, counts 20.3 bytes per byte of its 3.5 MB file, a ResNet-50 state
/// dict 0.02 per byte of its 103 MB (torch 2, measured 2026-12-07). With the tensors'
/// bytes (at most 4 times the file) this keeps a load within 64 times the
/// file's size.
pub(crate) const BYTES_PER_FILE_BYTE: u64 = 48;

/// The budget of small files: 192 MiB (a load within 256 MiB in all).
pub(crate) const MIN_BYTES: u64 = 192 << 20;

/// The `{:?}` text of one object, apart from its strings, is at most this
/// long: `Class { module_name: "", class_name: "" }` is 42 characters, the
/// separator and a dict pair's parentheses add at most 5.
const TEXT_PER_OBJECT: u64 = 48;

/// Capacity of candle's stack when a pickle starts (`Vec::with_capacity(512)`).
const STACK_START: u64 = 512;

/// Bytes an `Object` of candle's pickle reader takes.
fn object_bytes() -> u64 {
    std::mem::size_of::<candle::pickle::Object>() as u64
}

/// Bytes an entry of candle's memo (`HashMap<u32, Object>`) takes.
fn memo_entry_bytes() -> u64 {
    std::mem::size_of::<(u32, candle::pickle::Object)>() as u64
}

/// What the allocator takes for a request of `n` bytes (glibc's malloc: 8
/// bytes of header, 16-byte granules, 32 bytes at least); none for none.
fn alloc(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        (n.saturating_add(8 + 15) & !15).max(32)
    }
}

/// Length of the `{:?}` text of one byte of a string, at most: printable
/// ASCII as is, `\t \r \n \" \\ \0` escaped in two characters, other ASCII
/// controls as `\u{1f}`, and a byte of a multi-byte character as at most 4
/// (`\u{7ff}` for two bytes, `\u{10ffff}` for four; U+FFFD, which replaces
/// invalid bytes, as itself).
fn text_of(b: u8) -> u64 {
    match b {
        b'"' | b'\\' | b'\t' | b'\r' | b'\n' | 0 => 2,
        0x20..=0x7e => 1,
        0..=0x7f => 6,
        _ => 4,
    }
}

/// What a pickle may make candle's reader do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Deepest nesting of containers.
    pub(crate) max_depth: u32,
    /// Most bytes allocated and read in all, copies through the memo included.
    pub(crate) max_bytes: u64,
}

impl Limits {
    /// The limits for a pickle inside a file of `file_len` bytes.
    pub(crate) fn for_file_len(file_len: u64) -> Self {
        Self {
            max_depth: MAX_DEPTH,
            max_bytes: file_len.saturating_mul(BYTES_PER_FILE_BYTE).max(MIN_BYTES),
        }
    }
}

/// What [`scan`] found in a pickle that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanReport {
    /// Bytes up to and including STOP.
    pub(crate) bytes: u64,
    /// Bytes counted (allocated, copied, read, and the result's text), with
    /// the `spent` of earlier pickles.
    pub(crate) spent: u64,
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

/// One object on the simulated stack or in the memo.
#[derive(Debug, Clone, Copy)]
struct Slot {
    kind: Kind,
    depth: u16,
    /// Items in its own buffer: tuple and list items, dict pairs.
    len: u64,
    /// Capacity of that buffer (lists and dicts grow as candle pushes).
    cap: u64,
    /// Heap bytes a copy allocates besides its own buffer: its strings and
    /// boxes, and what its items allocate.
    below: u64,
    /// A bound of the length of its `{:?}` text.
    text: u64,
}

impl Slot {
    fn leaf(kind: Kind) -> Self {
        Self {
            kind,
            depth: 1,
            len: 0,
            cap: 0,
            below: 0,
            text: TEXT_PER_OBJECT,
        }
    }

    /// Bytes of one item of its buffer (a dict's items are pairs).
    fn item_bytes(&self) -> u64 {
        if self.kind == Kind::Dict {
            2 * object_bytes()
        } else {
            object_bytes()
        }
    }

    /// Heap bytes a deep copy of the object allocates (a clone's buffers are
    /// as long as their contents).
    fn copy_bytes(&self) -> u64 {
        alloc(self.len.saturating_mul(self.item_bytes())).saturating_add(self.below)
    }

    /// The object as a clone has it.
    fn cloned(self) -> Self {
        Self {
            cap: self.len,
            ..self
        }
    }
}

/// A string read from the pickle: its length and what candle makes of it.
struct Text {
    /// Bytes in the pickle (without the line end).
    raw: u64,
    /// Bytes that are not ASCII.
    wide: u64,
    /// Bound of its `{:?}` text.
    text: u64,
}

impl Text {
    /// Bytes of the lossy UTF-8 string candle keeps of it, at most: an
    /// invalid byte becomes U+FFFD, 3 bytes.
    fn lossy(&self) -> u64 {
        self.raw + 2 * self.wide
    }
}

struct Scanner<'a, R> {
    r: R,
    what: &'a str,
    limits: Limits,
    offset: u64,
    op_offset: u64,
    stack: Vec<Slot>,
    /// Capacity of candle's stack.
    stack_cap: u64,
    /// Positions in `stack` of its MARK slots, innermost last.
    marks: Vec<usize>,
    memo: HashMap<u32, Slot>,
    /// Buckets of candle's memo table.
    memo_buckets: u64,
    spent: u64,
    depth: u32,
}

/// Scans the pickle `r` (named `what` in errors, e.g. the file and zip entry)
/// and returns what it holds, or an error naming the first opcode, by byte
/// offset, that breaks the [`Limits`] or that candle's reader would refuse.
/// `spent` bytes of the budget went to earlier pickles of the same file (the
/// report's count includes them). Reads at most up to STOP; memory stays in
/// proportion to the budget.
pub(crate) fn scan<R: BufRead>(r: R, what: &str, limits: Limits, spent: u64) -> Result<ScanReport> {
    let mut s = Scanner {
        r,
        what,
        limits,
        offset: 0,
        op_offset: 0,
        stack: Vec::new(),
        stack_cap: STACK_START,
        marks: Vec::new(),
        memo: HashMap::new(),
        memo_buckets: 0,
        spent,
        depth: 0,
    };
    s.charge(alloc(STACK_START * object_bytes()))?;
    while !s.step()? {
        let read = s.offset - s.op_offset;
        s.charge(read)?;
    }
    let Some(result) = s.stack.last().copied() else {
        return Err(s.err("STOP with an empty stack: the pickle holds no object"));
    };
    // candle prints parts of the result (`{:?}`) in its errors about tensor
    // entries, one at a time, after the rest is dropped.
    s.charge(1 + result.text)?;
    Ok(ScanReport {
        bytes: s.offset,
        spent: s.spent,
        depth: s.depth,
    })
}

/// Buckets hashbrown (std's `HashMap`) allocates for `cap` entries.
fn buckets_for(cap: u64) -> u64 {
    if cap < 4 {
        4
    } else if cap < 8 {
        8
    } else {
        (cap.saturating_mul(8) / 7).next_power_of_two()
    }
}

/// Entries a hashbrown table of `buckets` holds before it grows.
fn capacity_of(buckets: u64) -> u64 {
    if buckets < 8 {
        buckets.saturating_sub(1)
    } else {
        buckets / 8 * 7
    }
}

impl<R: BufRead> Scanner<'_, R> {
    fn err(&self, msg: impl std::fmt::Display) -> candle::Error {
        error(
            ErrorKind::BadCheckpoint,
            format!("{} at byte {}: {msg}", self.what, self.op_offset),
        )
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

    /// Reads a string of `len` bytes, or up to `\n` when `len` is `None` (a
    /// GLOBAL line; `\r\n` ends it too, as candle drops the `\r`), keeping
    /// its first 64 bytes in `keep`; fails if the pickle ends first or the
    /// string is longer than what is left of the budget.
    fn string(&mut self, arg: &str, len: Option<u64>, keep: &mut Vec<u8>) -> Result<Text> {
        let max = self.budget_left();
        let mut t = Text {
            raw: 0,
            wide: 0,
            text: 0,
        };
        let mut last = 0u8;
        loop {
            if len == Some(t.raw) {
                return Ok(t);
            }
            if t.raw > max {
                return Err(self.over_budget(&format!("a {arg} of more than {} bytes: ", t.raw)));
            }
            let (what, at) = (self.what, self.op_offset);
            let fail = |msg: String| {
                error(
                    ErrorKind::BadCheckpoint,
                    format!("{what} at byte {at}: {msg}"),
                )
            };
            let buf = self
                .r
                .fill_buf()
                .map_err(|e| fail(format!("cannot read the {arg}: {e}")))?;
            if buf.is_empty() {
                return Err(fail(match len {
                    Some(n) => format!(
                        "truncated: the {arg} declares {n} bytes, the pickle ends after {}",
                        t.raw
                    ),
                    None => {
                        format!("truncated: the {arg} has no end of line before the pickle ends")
                    }
                }));
            }
            let want = len.map_or(buf.len(), |n| (n - t.raw).min(buf.len() as u64) as usize);
            let (n, done) = match len {
                Some(_) => (want, false),
                None => match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (i, true),
                    None => (buf.len(), false),
                },
            };
            let room = 64usize.saturating_sub(keep.len()).min(n);
            keep.extend_from_slice(&buf[..room]);
            for &b in &buf[..n] {
                t.wide += u64::from(b >= 0x80);
                t.text += text_of(b);
            }
            last = buf[..n].last().copied().unwrap_or(last);
            let used = n + usize::from(done);
            self.r.consume(used);
            self.offset += used as u64;
            t.raw += n as u64;
            if done {
                if last == b'\r' && t.raw > 0 {
                    t.raw -= 1;
                    t.text -= text_of(b'\r');
                    if keep.len() as u64 > t.raw {
                        keep.truncate(t.raw as usize);
                    }
                }
                return Ok(t);
            }
        }
    }

    fn budget_left(&self) -> u64 {
        self.limits.max_bytes.saturating_sub(self.spent)
    }

    /// The budget is spent; `what` is the opcode's part, if any.
    fn over_budget(&self, what: &str) -> candle::Error {
        self.err(format!(
            "{what}candle's pickle reader would need more than the memory limit of this file, \
             {} bytes ({BYTES_PER_FILE_BYTE} times the file's size, at least {} MiB; \
             counting what the reader allocates, each copy of a memoized object by the bytes it \
             copies, and the bytes it reads), {} counted so far",
            self.limits.max_bytes,
            MIN_BYTES >> 20,
            self.spent,
        ))
    }

    /// Counts `n` bytes.
    fn charge(&mut self, n: u64) -> Result<()> {
        self.spent = self.spent.saturating_add(n);
        if self.spent > self.limits.max_bytes {
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

    /// Pushes an object onto the stack, counting the stack's growth.
    fn push(&mut self, slot: Slot) -> Result<()> {
        self.reach(slot.depth)?;
        let len = self.stack.len() as u64;
        if len == self.stack_cap {
            self.stack_cap = (2 * self.stack_cap).max(len + 1);
            self.charge(alloc(self.stack_cap.saturating_mul(object_bytes())))?;
        }
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

    /// Pops the objects above the innermost MARK, and the MARK, counting the
    /// vector candle moves them into.
    fn pop_to_mark(&mut self, op: &str) -> Result<Vec<Slot>> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err(format!("{op} without a MARK before it")));
        };
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        self.charge(alloc(items.len() as u64 * object_bytes()))?;
        Ok(items)
    }

    /// A tuple of `items` (its buffer counted by the caller).
    fn tuple(items: &[Slot]) -> Slot {
        let mut t = Slot {
            len: items.len() as u64,
            cap: items.len() as u64,
            ..Slot::leaf(Kind::Other)
        };
        for s in items {
            t.below = t.below.saturating_add(s.copy_bytes());
            t.text = t.text.saturating_add(s.text);
            t.depth = t.depth.max(s.depth + 1);
        }
        t
    }

    /// An object of one box around each of `items` (BINPERSID, REDUCE,
    /// BUILD), the boxes counted.
    fn boxed(&mut self, items: &[Slot]) -> Result<Slot> {
        let boxes = alloc(object_bytes()) * items.len() as u64;
        self.charge(boxes)?;
        let t = Self::tuple(items);
        Ok(Slot {
            len: 0,
            cap: 0,
            below: t.below.saturating_add(boxes),
            ..t
        })
    }

    /// Grows the buffer of `slot` for `more` items as a `Vec` does: one item
    /// at a time (`push`) or all at once (`extend`, `append`).
    fn grow(&mut self, slot: &mut Slot, more: u64, one_at_a_time: bool) -> Result<()> {
        let need = slot.len.saturating_add(more);
        while slot.cap < need {
            slot.cap = if one_at_a_time {
                (2 * slot.cap).max(4)
            } else {
                (2 * slot.cap).max(need).max(4)
            };
            self.charge(alloc(slot.cap.saturating_mul(slot.item_bytes())))?;
        }
        Ok(())
    }

    /// Adds `items` to the list or dict on top of the stack.
    fn extend_top(
        &mut self,
        op: &str,
        want: Kind,
        items: &[Slot],
        one_at_a_time: bool,
    ) -> Result<()> {
        let mut top = match self.stack.last() {
            None => {
                return Err(self.err(format!(
                    "{op} needs a {want:?} below its items, the stack is empty"
                )))
            }
            Some(top) if top.kind != want => {
                let kind = top.kind;
                return Err(self.err(format!(
                    "{op} needs a {want:?} below its items, found a {kind:?}"
                )));
            }
            Some(&top) => top,
        };
        let added = if want == Kind::Dict {
            items.len() as u64 / 2
        } else {
            items.len() as u64
        };
        self.grow(&mut top, added, one_at_a_time)?;
        top.len += added;
        for s in items {
            top.below = top.below.saturating_add(s.copy_bytes());
            top.text = top.text.saturating_add(s.text);
            top.depth = top.depth.max(s.depth + 1);
        }
        self.reach(top.depth)?;
        if let Some(last) = self.stack.last_mut() {
            *last = top;
        }
        Ok(())
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
            }
            b'c' => {
                let (mut module, mut name) = (Vec::new(), Vec::new());
                let m = self.string("GLOBAL module name", None, &mut module)?;
                let n = self.string("GLOBAL class name", None, &mut name)?;
                let kind = if module == b"collections"
                    && (name == b"OrderedDict" || name == b"defaultdict")
                {
                    Kind::DictClass
                } else {
                    Kind::Other
                };
                // Per line: the buffer it is read into (grown by doubling
                // from 32 bytes), the lossy UTF-8 text and its copy.
                let mut bytes = 0u64;
                for t in [&m, &n] {
                    bytes = bytes
                        .saturating_add(4 * (t.raw + 1) + 64)
                        .saturating_add(2 * alloc(t.lossy()));
                }
                self.charge(bytes)?;
                self.push(Slot {
                    below: alloc(m.lossy()) + alloc(n.lossy()),
                    text: TEXT_PER_OBJECT + m.text + n.text,
                    ..Slot::leaf(kind)
                })?;
            }
            b'K' => self.leaf_with_arg::<1>("BININT1 argument")?,
            b'M' => self.leaf_with_arg::<2>("BININT2 argument")?,
            b'J' => self.leaf_with_arg::<4>("BININT argument")?,
            b'G' => self.leaf_with_arg::<8>("BINFLOAT argument")?,
            b'X' => {
                let len = u64::from(u32::from_le_bytes(self.read("BINUNICODE length")?));
                if alloc(len).saturating_add(len) > self.budget_left() {
                    return Err(self.over_budget(&format!("a BINUNICODE string of {len} bytes: ")));
                }
                let t = self.string("BINUNICODE string", Some(len), &mut Vec::new())?;
                self.charge(alloc(len))?;
                self.push(Slot {
                    below: alloc(len),
                    text: TEXT_PER_OBJECT + t.text,
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
                self.string("LONG1 integer", Some(u64::from(n)), &mut Vec::new())?;
                self.push(Slot::leaf(Kind::Other))?;
            }
            b'Q' => {
                let id = self.pop("BINPERSID")?;
                let slot = self.boxed(&[id])?;
                self.push(slot)?;
            }
            b't' => {
                let items = self.pop_to_mark("TUPLE")?;
                self.push(Self::tuple(&items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop("TUPLE1/2/3")?);
                }
                self.charge(alloc(n as u64 * object_bytes()))?;
                self.push(Self::tuple(&items))?;
            }
            0x88 | 0x89 | b'N' | b')' => self.push(Slot::leaf(Kind::Other))?,
            b']' => self.push(Slot::leaf(Kind::List))?,
            // candle reads DICT as EMPTY_DICT (its MARK stays on the stack).
            b'}' | b'd' => self.push(Slot::leaf(Kind::Dict))?,
            b'(' => self.push(Slot::leaf(Kind::Mark))?,
            b'a' => {
                let value = self.pop("APPEND")?;
                self.extend_top("APPEND", Kind::List, &[value], true)?;
            }
            b'e' => {
                let items = self.pop_to_mark("APPENDS")?;
                self.extend_top("APPENDS", Kind::List, &items, false)?;
            }
            b's' => {
                let value = self.pop("SETITEM")?;
                let key = self.pop("SETITEM")?;
                self.extend_top("SETITEM", Kind::Dict, &[key, value], true)?;
            }
            b'u' => {
                let items = self.pop_to_mark("SETITEMS")?;
                if items.len() % 2 != 0 {
                    return Err(self.err(format!(
                        "SETITEMS with an odd number of objects ({})",
                        items.len()
                    )));
                }
                self.extend_top("SETITEMS", Kind::Dict, &items, true)?;
            }
            b'b' => {
                let args = self.pop("BUILD")?;
                let mut obj = self.pop("BUILD")?;
                let slot = if obj.kind == Kind::Dict && args.kind == Kind::Dict {
                    // candle moves the entries of `args` into `obj`.
                    self.grow(&mut obj, args.len, false)?;
                    Slot {
                        len: obj.len + args.len,
                        below: obj.below.saturating_add(args.below),
                        text: obj.text.saturating_add(args.text),
                        depth: obj.depth.max(args.depth),
                        ..obj
                    }
                } else {
                    self.boxed(&[obj, args])?
                };
                self.push(slot)?;
            }
            b'R' | 0x81 => {
                let args = self.pop("REDUCE")?;
                let callable = self.pop("REDUCE")?;
                let slot = if op == b'R' && callable.kind == Kind::DictClass {
                    Slot::leaf(Kind::Dict)
                } else {
                    self.boxed(&[callable, args])?
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
                self.charge(slot.copy_bytes())?;
                self.push(slot)?;
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
                self.charge(top.copy_bytes())?;
                let items = self.memo.len() as u64;
                if !self.memo.contains_key(&key) && items + 1 > capacity_of(self.memo_buckets) {
                    // hashbrown moves the entries into a table twice as large.
                    self.memo_buckets =
                        buckets_for((items + 1).max(capacity_of(self.memo_buckets) + 1));
                    self.charge(alloc(self.memo_buckets * (memo_entry_bytes() + 1) + 16))?;
                }
                self.memo.insert(key, top.cloned());
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
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Counts, per thread, the blocks every allocation of this test binary
    /// takes (rounded as [`alloc`] rounds them; a reallocation as a new block),
    /// to hold the scan's count against what candle's reader really allocates.
    struct Counting;

    thread_local! {
        static ALLOCATED: Cell<u64> = const { Cell::new(0) };
    }

    fn count(n: usize) {
        let _ = ALLOCATED.try_with(|c| c.set(c.get() + alloc(n as u64)));
    }

    // SAFETY: every call is forwarded to the system allocator unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size());
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    fn limits() -> Limits {
        Limits::for_file_len(0)
    }

    fn run(pickle: &[u8]) -> Result<ScanReport> {
        scan(pickle, "test.pkl", limits(), 0)
    }

    /// What candle's reader allocates for `pickle` in all, and the length of
    /// the `{:?}` text of its result.
    fn candle_reads(pickle: &[u8]) -> (u64, u64) {
        let before = ALLOCATED.with(Cell::get);
        let mut stack = candle::pickle::Stack::empty();
        stack.read_loop(&mut &pickle[..]).unwrap();
        let obj = stack.finalize().unwrap();
        let allocated = ALLOCATED.with(Cell::get) - before;
        (allocated, format!("{obj:?}").len() as u64)
    }

    /// The scan's count holds what candle allocates and the text it prints.
    fn assert_counted(what: &str, pickle: &[u8]) -> ScanReport {
        let report = run(pickle).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (allocated, text) = candle_reads(pickle);
        assert!(
            report.spent >= allocated + text,
            "{what}: counted {}, candle allocated {allocated} and prints {text}",
            report.spent
        );
        report
    }

    /// torch.save({"w": tensor}) as candle's own test file has it.
    fn state_dict() -> Vec<u8> {
        let mut p =
            b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02".to_vec();
        p.extend_from_slice(
            b"ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04",
        );
        p.extend_from_slice(b"ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x04tq\x08Q");
        p.extend_from_slice(b"K\x00K\x04\x85q\tK\x01\x85q\n\x89h\x00)Rq\x0btq\x0cRq\rs.");
        p
    }

    #[test]
    fn state_dict_passes() {
        let p = state_dict();
        let r = assert_counted("state dict", &p);
        assert_eq!(r.bytes, p.len() as u64);
        // dict > reduce > args tuple > persistent id > storage tuple > class.
        assert_eq!(r.depth, 6);
    }

    /// Every kind of allocation candle's reader makes is counted, at least
    /// as large as it is: strings and class names (lossy UTF-8 and escapes
    /// included), memo copies of every kind of object, growing lists, dicts
    /// and stack, the memo's table, boxes, merged dicts.
    #[test]
    fn counts_hold_what_candle_allocates() {
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut names = vec![0x80, 2, b'c'];
        names.extend(std::iter::repeat_n(b'm', 10_000));
        names.extend_from_slice(b"\nname\nq\x00](");
        names.extend(std::iter::repeat_n([b'h', 0], 50).flatten());
        names.extend_from_slice(b"e.");
        cases.push(("copies of a long class name", names));
        let mut odd = vec![0x80, 2, b'c'];
        odd.extend_from_slice(b"\x01\xff\xfe\"\\\xc3\xa9\xe2\x80\xa8\r\n\x00\x7f\xcc\x80\r\n");
        odd.extend_from_slice(
            b"q\x00X\x08\x00\x00\x00\x01\xe2\x80\xa8\n\\\"\x00q\x01h\x00h\x01\x86h\x00\x87.",
        );
        cases.push(("escapes and invalid UTF-8", odd));
        let mut list = vec![0x80, 2, b']'];
        list.extend(std::iter::repeat_n(*b"Na", 1000).flatten());
        list.extend_from_slice(b"q\x00h\x00h\x00\x86.");
        cases.push(("a list grown by APPEND, copied", list));
        let mut dict = vec![0x80, 2, b'}', b'('];
        dict.extend(std::iter::repeat_n(*b"K\x01K\x02", 700).flatten());
        dict.extend_from_slice(b"u}(X\x01\x00\x00\x00aNubq\x00");
        dict.extend_from_slice(b"]}bQh\x00\x81\x8a\x02\x01\x01\x86.");
        cases.push(("dicts grown by SETITEMS, merged by BUILD", dict));
        let mut keys = vec![0x80, 2, b'('];
        for k in 0..3000u32 {
            keys.push(b'N');
            keys.push(b'r');
            keys.extend_from_slice(&k.to_le_bytes());
        }
        keys.extend_from_slice(b"t.");
        cases.push(("3000 memo keys, a stack of 3001", keys));
        let mut nested = vec![0x80, 2];
        nested.extend(std::iter::repeat_n(b']', 200));
        nested.extend(std::iter::repeat_n(*b"q\x07a", 199).flatten());
        nested.extend_from_slice(b"h\x07h\x07\x86.");
        cases.push(("nested lists, each memoized", nested));
        for (what, p) in cases {
            assert_counted(what, &p);
        }
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
            (b"\x80\x02\x8a\x0812.", "LONG1 integer declares 8 bytes"),
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

    /// A class whose module name is 100 000 bytes, memoized and fetched again
    /// and again: each BINGET copies the name (the scan counted a class as
    /// one object, whatever its name). The same holds inside a tuple.
    #[test]
    fn memo_copies_count_their_strings() {
        let limits = Limits {
            max_bytes: 10 << 20,
            ..limits()
        };
        for wrap in [&b""[..], b"\x85q\x01"] {
            let mut p = vec![0x80, 2, b'c'];
            p.extend(std::iter::repeat_n(b'a', 100_000));
            p.extend_from_slice(b"\nb\nq\x00");
            p.extend_from_slice(wrap);
            let key = if wrap.is_empty() { 0 } else { 1 };
            let first_get = p.len() as u64;
            p.extend(std::iter::repeat_n([b'h', key], 2000).flatten());
            let err = scan(&p[..], "m.pkl", limits, 0).unwrap_err().to_string();
            let at: u64 = err["m.pkl at byte ".len()..]
                .split(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            // Each copy takes more than 100 000 bytes: the 104th at the latest passes 10 MiB.
            assert!(
                at > first_get && at < first_get + 2 * 105 && (at - first_get).is_multiple_of(2),
                "{err}"
            );
            assert!(
                err.contains("memory limit of this file, 10485760 bytes"),
                "{err}"
            );
        }
    }
}
