"""Checks the `rust-version` of Cargo.toml against the dependencies: no crate
this one builds with (normal and build dependencies, any feature, on this
host) may declare a newer `rust-version`, nor need a newer Rust than it
declares where a build with an older toolchain showed it (UNDECLARED). With clippy's `incompatible_msrv`
lint (on by default; CI denies warnings), which flags std APIs newer than
`rust-version` in this crate's code, it keeps the declared minimum honest
without building with an old toolchain. Exit 1 on a dependency that needs more.

    python3 scripts/check-msrv.py
"""
import json
import subprocess
import sys


def version(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


host = next(
    line.split(":", 1)[1].strip()
    for line in subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout.splitlines()
    if line.startswith("host:")
)
meta = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--all-features", "--filter-platform", host],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
)
# Dependencies that need a newer Rust than they declare (or declare none),
# found by building with an older toolchain: name -> (Rust, why).
UNDECLARED = {
    "candle-core": ("1.94", "calls core::arch's __cpuid_count outside unsafe, safe since Rust 1.94"),
}
packages = {p["id"]: p for p in meta["packages"]}
root = meta["resolve"]["root"]
declared = packages[root].get("rust_version")
if not declared:
    sys.exit("check-msrv: Cargo.toml declares no rust-version")
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
# Walk the graph from this crate along normal and build edges (dev-dependencies
# are for this repository's own tests, not for users' builds).
seen, stack = set(), [root]
while stack:
    node = nodes[stack.pop()]
    for dep in node["deps"]:
        kinds = {k["kind"] for k in dep["dep_kinds"]}
        if dep["pkg"] not in seen and kinds & {None, "build"}:
            seen.add(dep["pkg"])
            stack.append(dep["pkg"])
for p in seen:
    floor = UNDECLARED.get(packages[p]["name"])
    if floor and (not packages[p].get("rust_version") or version(floor[0]) > version(packages[p]["rust_version"])):
        packages[p]["rust_version"] = floor[0]
        print(f"check-msrv: {packages[p]['name']} {packages[p]['version']} needs Rust {floor[0]}: {floor[1]}")
too_new = sorted(
    (version(packages[p]["rust_version"]), packages[p]["name"], packages[p]["version"])
    for p in seen
    if packages[p].get("rust_version") and version(packages[p]["rust_version"]) > version(declared)
)
newest = max((version(packages[p]["rust_version"]) for p in seen if packages[p].get("rust_version")), default=None)
if too_new:
    for v, name, ver in too_new:
        print(f"check-msrv: {name} {ver} needs Rust {'.'.join(map(str, v))}, Cargo.toml declares {declared}")
    sys.exit(1)
print(f"check-msrv: rust-version {declared}; {len(seen)} dependencies, the newest needs {'.'.join(map(str, newest))}")
