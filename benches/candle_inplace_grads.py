#!/usr/bin/env python3
"""Writes a copy of candle-core whose autograd stores an op's first gradient
contribution as is, instead of adding it to a fresh tensor of zeros.

candle 0.11's `Tensor::backward` accumulates the gradient of every op input
with `grads.or_insert(arg)?` (a `zeros_like` of the input when none is stored
yet) followed by `*sum_grad = sum_grad.add(&arg_grad)?`. For an op whose input
gets one gradient, which is nearly every op of a network, that costs an
activation-sized memset, an activation-sized add and two allocations on top of
the op's own backward. The benchmark's "bookkp" column measures it.

This script measures what the step would cost without that bookkeeping: it
copies the candle-core sources that cargo resolved for this crate to
`target/candle-core-inplace-grads/` and rewrites every

    let g = grads.or_insert(arg)?;
    *g = g.add(EXPR)?            (or `.sub(EXPR)`)

in `src/backprop.rs` into `grads.accumulate(arg, EXPR)?` (or
`accumulate_neg`), a new `GradStore` method that stores the contribution when
the slot is empty and adds it otherwise. A contribution whose shape or dtype
differs from the input's still goes through `zeros_like` + `add`, so an op
returning a wrong gradient fails as before, and a strided contribution (a
broadcast) is made contiguous, as the add made it. Gradients keep their
values: x + 0 = x and 0 - x = -x, up to the sign of a zero gradient.
scripts/check-patched-candle.sh (run by CI) runs this crate's CPU tests
against the copy and checks that a seeded training run writes the same
weights, byte for byte, with either candle-core.

Use it through scripts/with-patched-candle.sh, which points cargo at the copy
for one command; this crate itself never depends on it. For your own project:

    python3 benches/candle_inplace_grads.py --manifest-path path/to/Cargo.toml --out vendor/candle-core

and in that Cargo.toml: `[patch.crates-io] candle-core = { path = "vendor/candle-core" }`.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ACCUMULATE = '''
    /// Adds `grad` to the gradient stored for `tensor`, or stores `grad` itself
    /// when none is stored yet (inserted by candle-syncbn's
    /// benches/candle_inplace_grads.py instead of `or_insert` + `add`).
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get().add(grad)?;
                *entry.get_mut() = sum;
            }
            Entry::Vacant(entry) => {
                if grad.shape() == tensor.shape() && grad.dtype() == tensor.dtype() {
                    // Stored gradients stay contiguous, as zeros + add made
                    // them: some backward passes (scatter_add) require it.
                    entry.insert(grad.contiguous()?);
                } else {
                    entry.insert(tensor.zeros_like()?.add(grad)?);
                }
            }
        }
        Ok(())
    }

    /// As `accumulate`, for a contribution that is subtracted.
    fn accumulate_neg(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get().sub(grad)?;
                *entry.get_mut() = sum;
                Ok(())
            }
            Entry::Vacant(_) => self.accumulate(tensor, &grad.neg()?),
        }
    }
'''

OR_INSERT = re.compile(r"^[ \t]*let (\w+) = grads\.or_insert\(([^()]*)\)\?;$")


def rewrite(source):
    """Rewrites each `let g = grads.or_insert(arg)?;` whose slot is only used
    by a later `*g = g.add(EXPR)?` (or `.sub`) in the same block: the
    statements in between stay, in order."""
    lines = source.split("\n")
    out = []
    count = 0
    i = 0
    while i < len(lines):
        m = OR_INSERT.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        var, arg = m.groups()
        uses = re.compile(r"\b%s\b" % var)
        # The slot has the input's shape and device: ask the input instead.
        same = re.compile(r"\b%s\.(dims|device)\(\)" % var)
        final = re.compile(r"^(\s*)\*%s = %s\.(add|sub)\((.*)\)\?(;?)$" % (var, var))
        depth = 0
        j = i + 1
        done = None
        body = []
        while j < len(lines):
            line = same.sub(lambda d: "%s.%s()" % (arg, d.group(1)), lines[j])
            f = final.match(line)
            if f and depth == 0:
                indent, op, expr, semi = f.groups()
                if not uses.search(expr):
                    done = (j, indent, op, expr, semi)
                break
            if uses.search(line):
                break
            depth += line.count("{") - line.count("}")
            if depth < 0:
                break
            body.append(line)
            j += 1
        if done is None:
            out.append(lines[i])
            i += 1
            continue
        j, indent, op, expr, semi = done
        out.extend(body)
        method = "accumulate" if op == "add" else "accumulate_neg"
        out.append("%sgrads.%s(%s, %s)?%s" % (indent, method, arg, expr, semi))
        count += 1
        i = j + 1
    source = "\n".join(out)
    anchor = "    /// Extend this gradient store with the contents of another."
    if anchor not in source:
        sys.exit("backprop.rs changed: GradStore::extend not found")
    return source.replace(anchor, ACCUMULATE.lstrip("\n") + "\n" + anchor, 1), count


def candle_core_dir(manifest):
    cmd = ["cargo", "metadata", "--format-version", "1", "--manifest-path", manifest]
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(manifest)), "Cargo.lock")):
        cmd.append("--locked")  # the version that the project's builds use
    meta = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    for package in json.loads(meta)["packages"]:
        if package["name"] == "candle-core":
            return os.path.dirname(package["manifest_path"]), package["version"]
    sys.exit("candle-core is not among the dependencies of " + manifest)


def up_to_date(src, dest, patched):
    """Whether `dest` is this script's copy of `src` (same manifest, so same
    version) with `patched` as its backprop.rs."""
    def read(*path):
        try:
            with open(os.path.join(*path)) as f:
                return f.read()
        except OSError:
            return None

    return (read(dest, "src", "backprop.rs") == patched
            and read(dest, "Cargo.toml") == read(src, "Cargo.toml"))


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest-path", default=os.path.join(repo, "Cargo.toml"),
                    help="Cargo.toml of the project whose candle-core is copied (default: this crate's)")
    ap.add_argument("--out", default=os.path.join(repo, "target", "candle-core-inplace-grads"),
                    help="where the patched copy goes (replaced if it exists)")
    args = ap.parse_args()
    src, version = candle_core_dir(args.manifest_path)
    dest = os.path.abspath(args.out)
    with open(os.path.join(src, "src", "backprop.rs")) as f:
        patched, count = rewrite(f.read())
    if up_to_date(src, dest, patched):
        # Rewriting the same copy would only make cargo rebuild it.
        print("candle-core %s: %s is up to date" % (version, dest), file=sys.stderr)
        return
    if os.path.exists(dest):
        try:
            with open(os.path.join(dest, "src", "backprop.rs")) as f:
                earlier = "benches/candle_inplace_grads.py" in f.read()
        except OSError:
            earlier = False
        if not earlier:
            sys.exit("%s exists and is not a copy written by this script: not replacing it" % dest)
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    path = os.path.join(dest, "src", "backprop.rs")
    left = len(re.findall(r"grads\.or_insert\(", patched))
    with open(path, "w") as f:
        f.write(patched)
    print("candle-core %s: %d accumulations rewritten, %d left as zeros + add (%s)"
          % (version, count, left, dest), file=sys.stderr)
    if count < 50:
        sys.exit("fewer rewrites than expected: candle's backprop.rs changed shape")


if __name__ == "__main__":
    main()
