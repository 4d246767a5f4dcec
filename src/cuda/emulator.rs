//! Test support: the kernels of `cuda-kernels/` run on the CPU.
//!
//! [`Emulator::get`] compiles `cuda-kernels/*.cu` with the host C++ compiler
//! (`$CXX`, else `g++`), force-including `tests/cuda-emulator/cuda_emulator.h`
//! (CUDA keywords, thread indices, `__syncthreads`, warp shuffles, f64
//! intrinsics) and linking `tests/cuda-emulator/runtime.cpp` (a fiber per
//! CUDA thread, blocks one after the other, deadlocks reported), and loads the
//! shared library. The kernels' `extern "C"` entry points are then plain C
//! functions, called with the same arguments the ops pass to `cuLaunchKernel`
//! from inside [`Emulator::launch`].
//!
//! Buffers are [`DevBuf`]s: each ends right before an inaccessible page, so a
//! kernel that writes or reads past the end faults instead of passing silently.
//!
//! This checks what a CPU can check (indices, work splits, barriers, warp
//! exchanges, numerics), not timing or the device memory model.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `syncbn_emu_launch` of runtime.cpp.
type LaunchFn = unsafe extern "C" fn(
    grid: *const u32,
    block: *const u32,
    body: extern "C" fn(*mut c_void),
    data: *mut c_void,
    err: *mut c_char,
    err_len: usize,
) -> c_int;

/// The loaded emulator library (kernels and runtime).
pub struct Emulator {
    handle: *mut c_void,
    launch: LaunchFn,
}

// SAFETY: the library handle is only used for dlsym, which is thread-safe;
// every launch runs on the calling thread with thread-local state.
unsafe impl Send for Emulator {}
// SAFETY: as above.
unsafe impl Sync for Emulator {}

/// Why the emulator is not available.
enum Unavailable {
    /// No C++ compiler on this machine, or no emulator sources (the crate
    /// package leaves `tests/cuda-emulator/` out): the tests are skipped.
    Skipped(String),
    /// The build or the load failed: the tests fail.
    Broken(String),
}

impl Emulator {
    /// The emulator, built once per test process; `None` (after printing that
    /// the test is skipped) when no C++ compiler is installed or the emulator's
    /// sources are absent. Panics when the kernels do not compile or load.
    pub fn get() -> Option<&'static Emulator> {
        static EMU: OnceLock<Result<Emulator, Unavailable>> = OnceLock::new();
        match EMU.get_or_init(build) {
            Ok(e) => Some(e),
            Err(Unavailable::Skipped(msg)) => {
                // Past the harness's output capture, so a plain `cargo test` shows it.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "emulated CUDA kernels skipped: {msg}"
                );
                None
            }
            Err(Unavailable::Broken(msg)) => panic!("CUDA emulator: {msg}"),
        }
    }

    /// The kernel (or runtime function) `name`, as a function pointer of type
    /// `F`.
    ///
    /// # Safety
    /// `F` must be an `unsafe extern "C" fn` type matching the C signature of
    /// `name`.
    pub unsafe fn kernel<F: Copy>(&self, name: &str) -> F {
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        let cname = CString::new(name).expect("kernel name");
        // SAFETY: a valid handle and a NUL-terminated name.
        let sym = unsafe { libc::dlsym(self.handle, cname.as_ptr()) };
        assert!(!sym.is_null(), "CUDA emulator: no kernel named `{name}`");
        // SAFETY: same size; the caller vouches for the signature.
        unsafe { std::mem::transmute_copy::<*mut c_void, F>(&sym) }
    }

    /// Runs `body` as every thread of `grid` blocks of `block` threads (x, y,
    /// z). `body` calls one kernel entry point. Errors on a deadlock (a thread
    /// that exits while others wait at a barrier, lanes that never meet at a
    /// shuffle) or an invalid launch.
    pub fn launch<F: Fn()>(
        &self,
        grid: [usize; 3],
        block: [usize; 3],
        body: F,
    ) -> Result<(), String> {
        extern "C" fn trampoline<F: Fn()>(data: *mut c_void) {
            // SAFETY: `data` is the `&F` passed below, alive for the launch.
            let body = unsafe { &*(data as *const F) };
            body();
        }
        let dims = |d: [usize; 3]| d.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
        let (g, b) = (dims(grid), dims(block));
        let mut err = vec![0 as c_char; 512];
        // SAFETY: three dims each; `body` outlives the call, which runs every
        // thread to completion before returning.
        let rc = unsafe {
            (self.launch)(
                g.as_ptr(),
                b.as_ptr(),
                trampoline::<F>,
                &body as *const F as *mut c_void,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            // SAFETY: the runtime NUL-terminates the message within `err`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
            Err(msg.to_string_lossy().into_owned())
        }
    }
}

/// Checks that `cxx` exists and has what the emulator needs beyond C++17
/// (`_Float16` in C++: GCC 12+ on x86-64, GCC 13+ on AArch64, Clang 15+;
/// ucontext), so that an old or missing compiler skips the tests while a
/// kernel that does not compile fails them.
fn probe(cxx: &str, dir: &Path) -> Result<(), Unavailable> {
    let src = dir.join("probe.cpp");
    let code = "#include <ucontext.h>\nint main() { ucontext_t c; _Float16 h = (_Float16)1.5; \
                return getcontext(&c) + (int)(float)h - 1; }\n";
    std::fs::write(&src, code)
        .map_err(|e| Unavailable::Broken(format!("cannot write {}: {e}", src.display())))?;
    match Command::new(cxx)
        .args(["-std=c++17", "-fsyntax-only"])
        .arg(&src)
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(_) => Err(Unavailable::Skipped(format!(
            "`{cxx}` lacks _Float16 or ucontext (on Linux: GCC 12+ on x86-64, GCC 13+ on AArch64, or Clang 15+; set CXX to choose)"
        ))),
        Err(e) => Err(Unavailable::Skipped(format!(
            "no C++ compiler `{cxx}` ({e})"
        ))),
    }
}

/// Compiles and loads the emulator library into a private temporary folder.
fn build() -> Result<Emulator, Unavailable> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.join("cuda-kernels");
    let emu = manifest.join("tests").join("cuda-emulator");
    if !emu.join("runtime.cpp").is_file() {
        return Err(Unavailable::Skipped(format!(
            "no emulator sources in {} (the crate package leaves them out)",
            emu.display()
        )));
    }
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| Unavailable::Broken(format!("cannot read {}: {e}", root.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    sources.push(emu.join("runtime.cpp"));
    let dir = std::env::temp_dir().join(format!("candle-syncbn-emulator-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Unavailable::Broken(format!("cannot create {}: {e}", dir.display())))?;
    let lib = dir.join("libsyncbn_emulator.so");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
    probe(&cxx, &dir)?;
    let mut cmd = Command::new(&cxx);
    // No FMA contraction (bitwise comparisons with the CPU path) and no
    // strict aliasing (device code puns types, as nvcc allows).
    cmd.args(["-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off"])
        .args(["-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas"])
        // The kernels that only tests launch (see cuda-kernels/stats.cu).
        .arg("-DSYNCBN_TEST_KERNELS")
        .arg("-I")
        .arg(emu.join("include"))
        .arg("-include")
        .arg(emu.join("cuda_emulator.h"))
        .arg("-o")
        .arg(&lib)
        .args(["-x", "c++"])
        .args(&sources);
    let out = cmd
        .output()
        .map_err(|e| Unavailable::Broken(format!("cannot run `{cxx}`: {e}")))?;
    if !out.status.success() {
        return Err(Unavailable::Broken(format!(
            "`{cxx}` failed to compile the kernels for the host:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let path = CString::new(lib.to_string_lossy().into_owned()).expect("library path");
    // SAFETY: a NUL-terminated path; the library has no global constructors
    // with side effects.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    // The mapping stays valid once loaded.
    let _ = std::fs::remove_dir_all(&dir);
    if handle.is_null() {
        // SAFETY: dlerror returns a NUL-terminated message after a failure.
        let msg = unsafe { CStr::from_ptr(libc::dlerror()) };
        return Err(Unavailable::Broken(format!(
            "cannot load the library: {}",
            msg.to_string_lossy()
        )));
    }
    let name = CString::new("syncbn_emu_launch").expect("symbol name");
    // SAFETY: a valid handle and a NUL-terminated name.
    let sym = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if sym.is_null() {
        return Err(Unavailable::Broken(
            "no syncbn_emu_launch in the library".into(),
        ));
    }
    // SAFETY: runtime.cpp defines syncbn_emu_launch with this C signature.
    let launch = unsafe { std::mem::transmute::<*mut c_void, LaunchFn>(sym) };
    Ok(Emulator { handle, launch })
}

/// A buffer standing for device memory: its last byte is at most 63 bytes
/// before an inaccessible guard page, and its start is 64-byte aligned (or,
/// when `misaligned`, one element past a 64-byte boundary).
pub struct DevBuf<T> {
    map: *mut c_void,
    map_len: usize,
    ptr: *mut T,
    len: usize,
}

impl<T: Copy> DevBuf<T> {
    fn alloc(len: usize, misaligned: bool) -> Self {
        let elem = std::mem::size_of::<T>();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let shift = if misaligned { elem } else { 0 };
        let bytes = len.max(1) * elem + shift;
        let data_pages = bytes.div_ceil(page) * page + page;
        let map_len = data_pages + page;
        // SAFETY: a fresh anonymous private mapping.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(map != libc::MAP_FAILED, "CUDA emulator: mmap failed");
        // SAFETY: the guard page lies inside the mapping.
        let rc = unsafe {
            libc::mprotect(
                (map as *mut u8).add(data_pages) as *mut c_void,
                page,
                libc::PROT_NONE,
            )
        };
        assert_eq!(rc, 0, "CUDA emulator: mprotect failed");
        let start = ((data_pages - bytes) & !63) + shift;
        // SAFETY: `start + len * elem <= data_pages`, inside the mapping.
        let ptr = unsafe { (map as *mut u8).add(start) } as *mut T;
        Self {
            map,
            map_len,
            ptr,
            len,
        }
    }

    /// A copy of `values`.
    pub fn from_slice(values: &[T], misaligned: bool) -> Self {
        let b = Self::alloc(values.len(), misaligned);
        // SAFETY: `b` holds `values.len()` elements; the regions are disjoint.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), b.ptr, values.len()) };
        b
    }

    /// `len` copies of `value` (NaN for outputs: an element a kernel does not
    /// write shows up in the comparison).
    pub fn filled(len: usize, value: T) -> Self {
        Self::from_slice(&vec![value; len], false)
    }

    /// The device pointer.
    pub fn ptr(&self) -> *const T {
        self.ptr
    }

    /// The device pointer, for outputs.
    pub fn ptr_mut(&self) -> *mut T {
        self.ptr
    }

    /// Whether the start is 16-byte aligned (as `aligned16` on a device).
    pub fn aligned16(&self) -> bool {
        (self.ptr as usize).is_multiple_of(16)
    }

    /// The contents.
    pub fn to_vec(&self) -> Vec<T> {
        // SAFETY: `len` initialized elements.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `alloc`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}
