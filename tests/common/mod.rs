//! Shared test helpers: a plain f64 reference implementation of batch
//! normalization (textbook formulas, no cleverness) and deterministic data.
#![allow(dead_code)]

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::launch::Rendezvous;
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[cfg(target_os = "linux")]
pub mod capped;

/// The name libtest gives test `name` of the module whose `module_path!()` is
/// `module`: its path without the crate (the test binary), as `--exact` wants
/// it. A test that runs its own executable again as a child passes it, so that
/// the child runs that one test and none of the others in the binary.
pub fn test_path(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_, path)) => format!("{path}::{name}"),
        None => name.to_string(),
    }
}

/// The arguments that make a test executable run the test `worker` of the
/// module `module` (its `module_path!()`) and no other test: how the process
/// tests start their ranks.
pub fn worker_args(module: &str) -> Vec<std::ffi::OsString> {
    let mut args = vec![std::ffi::OsString::from(test_path(module, "worker"))];
    args.extend(["--exact", "--nocapture", "--test-threads=1"].map(std::ffi::OsString::from));
    args
}

/// How a worker process (or a launcher of several) ended.
pub struct Outcome {
    /// Its exit code (`None`: killed by a signal or at the deadline).
    pub code: Option<i32>,
    /// Its stdout and stderr.
    pub output: String,
    /// From its start to its end (or the deadline).
    pub elapsed: Duration,
}

/// A scratch directory, removed with everything in it when dropped (also when
/// a test panics), so test runs leave nothing in the temp dir.
pub struct ScratchDir(PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh empty directory `syncbn-<prefix>-<pid>-<n>` under the temp dir,
/// unique per call (tests of one binary run in parallel).
pub fn scratch_dir(prefix: &str) -> ScratchDir {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "syncbn-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    ScratchDir(d)
}

/// A port file for a rendezvous on port 0 (rank 0 publishes its port there),
/// in a fresh scratch directory that goes when the last clone is dropped.
#[derive(Clone)]
pub struct PortFile {
    path: PathBuf,
    _dir: Arc<ScratchDir>,
}

impl std::ops::Deref for PortFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for PortFile {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for PortFile {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

/// A [`PortFile`] in a fresh scratch directory.
pub fn port_file(prefix: &str) -> PortFile {
    let dir = scratch_dir(prefix);
    PortFile {
        path: dir.join("port"),
        _dir: Arc::new(dir),
    }
}

/// Deterministic pseudo-random numbers (SplitMix64 → uniform → Box–Muller).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` values with per-element mean `mean` and std `std`.
    pub fn normals(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }
}

/// A tensor of the given shape and dtype with values rounded from `values`.
pub fn tensor(values: &[f64], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The values of a tensor (any dtype, any layout) as f64 in logical order.
pub fn values(t: &Tensor) -> Vec<f64> {
    // Moved to the host first: the conversion then never needs a device kernel.
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Per-channel element indices of a row-major `(N, C, *)` tensor.
pub fn channel_indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let c_n = shape[1];
    let inner: usize = shape[2..].iter().product();
    let mut idx = vec![Vec::new(); c_n];
    for n in 0..shape[0] {
        for (c, slot) in idx.iter_mut().enumerate() {
            for s in 0..inner {
                slot.push((n * c_n + c) * inner + s);
            }
        }
    }
    idx
}

/// Textbook batch normalization of a row-major `(N, C, *)` batch, in f64.
pub struct Reference {
    pub mean: Vec<f64>,
    /// Biased batch variance.
    pub var: Vec<f64>,
    pub count: usize,
    pub y: Vec<f64>,
}

pub fn reference_forward(x: &[f64], shape: &[usize], w: &[f64], b: &[f64], eps: f64) -> Reference {
    let idx = channel_indices(shape);
    let count = idx[0].len();
    let mut y = vec![0.0; x.len()];
    let mut mean = vec![0.0; idx.len()];
    let mut var = vec![0.0; idx.len()];
    for (c, ix) in idx.iter().enumerate() {
        let m = ix.iter().map(|&i| x[i]).sum::<f64>() / count as f64;
        let v = ix.iter().map(|&i| (x[i] - m).powi(2)).sum::<f64>() / count as f64;
        for &i in ix {
            y[i] = (x[i] - m) / (v + eps).sqrt() * w[c] + b[c];
        }
        mean[c] = m;
        var[c] = v;
    }
    Reference {
        mean,
        var,
        count,
        y,
    }
}

/// Normalization with fixed statistics (eval mode), in f64.
pub fn reference_eval(
    x: &[f64],
    shape: &[usize],
    mean: &[f64],
    var: &[f64],
    w: &[f64],
    b: &[f64],
    eps: f64,
) -> Vec<f64> {
    let idx = channel_indices(shape);
    let mut y = vec![0.0; x.len()];
    for (c, ix) in idx.iter().enumerate() {
        for &i in ix {
            y[i] = (x[i] - mean[c]) / (var[c] + eps).sqrt() * w[c] + b[c];
        }
    }
    y
}

/// Gradients of `Σ dy·y` for training-mode batch normalization, in f64:
/// `(dx, dweight, dbias)`.
pub fn reference_backward(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    w: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let idx = channel_indices(shape);
    let n = idx[0].len() as f64;
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; idx.len()];
    let mut db = vec![0.0; idx.len()];
    for (c, ix) in idx.iter().enumerate() {
        let m = ix.iter().map(|&i| x[i]).sum::<f64>() / n;
        let v = ix.iter().map(|&i| (x[i] - m).powi(2)).sum::<f64>() / n;
        let invstd = 1.0 / (v + eps).sqrt();
        let xhat: Vec<f64> = ix.iter().map(|&i| (x[i] - m) * invstd).collect();
        let sum_dy: f64 = ix.iter().map(|&i| dy[i]).sum();
        let sum_dy_xhat: f64 = ix.iter().zip(&xhat).map(|(&i, h)| dy[i] * h).sum();
        for (k, &i) in ix.iter().enumerate() {
            dx[i] = w[c] * invstd * (dy[i] - sum_dy / n - xhat[k] * sum_dy_xhat / n);
        }
        dw[c] = sum_dy_xhat;
        db[c] = sum_dy;
    }
    (dx, dw, db)
}

/// Asserts `|a − b| ≤ atol + rtol·|b|` element-wise, naming the first failure.
pub fn assert_close(what: &str, a: &[f64], b: &[f64], atol: f64, rtol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let excess = if x.is_nan() != y.is_nan() {
            f64::INFINITY
        } else {
            (x - y).abs() - (atol + rtol * y.abs())
        };
        if excess > 0.0 && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i}: got {}, expected {} (atol {atol}, rtol {rtol})",
            a[i], b[i]
        );
    }
}

/// `(atol, rtol)` for outputs of unit scale computed in `dtype`.
pub fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-10, 1e-10),
        DType::F32 => (2e-5, 2e-5),
        DType::F16 => (4e-3, 4e-3),
        DType::BF16 => (3e-2, 3e-2),
        _ => unreachable!(),
    }
}

/// Exit code of a worker process that got the error its scenario expects.
pub const EXPECTED_ERROR: i32 = 42;

/// Ends a worker process that got the error its scenario expects: prints it
/// (with its kind) and exits with [`EXPECTED_ERROR`].
pub fn expected(e: candle::Error) -> ! {
    println!("EXPECTED-ERROR ({:?}): {e}", candle_syncbn::error_kind(&e));
    std::process::exit(EXPECTED_ERROR)
}

/// One worker rank's training forward and backward of a layer of `width`
/// channels named `name` (its `VarBuilder` prefix; "" for none) on `group`, with `fault` ("kill": abort, "hang":
/// sleep 60 s) on rank 1 between the two; an error ends the process
/// ([`expected`]).
pub fn faulty_step(group: &ProcessGroup, width: usize, name: &str, fault: &str) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = SyncBatchNormConfig::default();
    let vb = if name.is_empty() { vb } else { vb.pp(name) };
    let bn = SyncBatchNorm::new(width, cfg, vb, group.clone()).unwrap();
    let ones = Tensor::ones((4, width, 2), DType::F32, &Device::Cpu).unwrap();
    let x = Var::from_tensor(&ones).unwrap();
    let y = bn
        .forward_t(x.as_tensor(), true)
        .unwrap_or_else(|e| expected(e));
    println!("rank {}: forward finished", group.rank());
    if group.rank() == 1 {
        match fault {
            "kill" => std::process::abort(),
            "hang" => std::thread::sleep(Duration::from_secs(60)),
            _ => {}
        }
    }
    let loss = y.sqr().unwrap().sum_all().unwrap();
    match loss.backward() {
        Ok(_) => println!("backward finished"),
        Err(e) => expected(e),
    }
}

/// Reports that a test was skipped (and why) on the process's stderr, past the
/// test harness's output capture, so a plain `cargo test` shows it.
pub fn report_skip(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// The variable that says a GPU (or the emulated GPU) is expected: with
/// `SYNCBN_REQUIRE_CUDA=1` a GPU test that finds no CUDA device (or, for the
/// NCCL tests, fewer than two) fails instead of reporting that it was
/// skipped. `scripts/test.sh` sets it for the emulated GPU's run,
/// `gpu-bundle/run.sh` on the GPU machine.
pub const REQUIRE_CUDA_VAR: &str = "SYNCBN_REQUIRE_CUDA";

/// Whether [`REQUIRE_CUDA_VAR`] is `1`.
pub fn cuda_required() -> bool {
    std::env::var(REQUIRE_CUDA_VAR).is_ok_and(|v| v == "1")
}

/// Reports that a GPU test was skipped for want of CUDA devices (`msg` says
/// which test and why), or fails it when [`cuda_required`].
pub fn skip_without_gpu(msg: &str) {
    if cuda_required() {
        panic!("{msg}; {REQUIRE_CUDA_VAR}=1 expects a CUDA device here");
    }
    report_skip(msg);
}

/// How many calls of this thread so far made the host wait for the GPU
/// (synchronizations, device-to-host copies, synchronous frees), as the
/// emulated GPU's driver counts them; `None` on a real driver, which does not
/// count.
pub fn emulated_host_syncs() -> Option<u64> {
    emulated_counter(c"syncbn_emu_host_syncs")
}

/// How many device-to-host copies this thread made so far (each is also one
/// of [`emulated_host_syncs`]), as the emulated GPU's driver counts them;
/// `None` on a real driver.
pub fn emulated_dtoh_copies() -> Option<u64> {
    emulated_counter(c"syncbn_emu_dtoh_copies")
}

/// How many launches of this crate's kernels (`bn_*`) this thread made so
/// far, as the emulated GPU's driver counts them; `None` on a real driver.
pub fn emulated_crate_launches() -> Option<u64> {
    emulated_counter(c"syncbn_emu_crate_launches")
}

/// How many launches of the kernels whose names start with `prefix` (e.g.
/// candle's `affine_`) this thread made so far, as the emulated GPU's driver
/// counts them; `None` on a real driver.
#[cfg(target_os = "linux")]
pub fn emulated_launches_named(prefix: &std::ffi::CStr) -> Option<u64> {
    // SAFETY: dlsym with a NUL-terminated name; the symbol, when present, is
    // the emulated driver's `unsigned long long f(const char*)`, which reads
    // the NUL-terminated `prefix` during the call only.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"syncbn_emu_launches_named".as_ptr());
        if f.is_null() {
            return None;
        }
        let f: extern "C" fn(*const std::ffi::c_char) -> u64 = std::mem::transmute(f);
        Some(f(prefix.as_ptr()))
    }
}

/// The emulated GPU runs on Linux only: elsewhere nothing counts.
#[cfg(not(target_os = "linux"))]
pub fn emulated_launches_named(_: &std::ffi::CStr) -> Option<u64> {
    None
}

/// Runs `f` on every rank of `groups`, one thread each; the results in rank
/// order (a rank's panic fails the caller).
pub fn on_groups<T: Send + 'static>(
    groups: Vec<ProcessGroup>,
    f: impl Fn(ProcessGroup) -> T + Send + Clone + 'static,
) -> Vec<T> {
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let f = f.clone();
            std::thread::spawn(move || f(g))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A counter of the emulated driver, `unsigned long long name()`.
#[cfg(target_os = "linux")]
fn emulated_counter(name: &std::ffi::CStr) -> Option<u64> {
    // SAFETY: dlsym with a NUL-terminated name; the symbol, when present, is
    // the emulated driver's `unsigned long long name()`.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
        if f.is_null() {
            return None;
        }
        let f: extern "C" fn() -> u64 = std::mem::transmute(f);
        Some(f())
    }
}

/// The emulated GPU runs on Linux only: elsewhere nothing counts.
#[cfg(not(target_os = "linux"))]
fn emulated_counter(_: &std::ffi::CStr) -> Option<u64> {
    None
}

/// What one rank observed over a few training steps and a final eval.
#[derive(Debug, Clone, Default)]
pub struct RankRun {
    pub outputs: Vec<Vec<f64>>,
    pub input_grads: Vec<Vec<f64>>,
    pub weight_grads: Vec<Vec<f64>>,
    pub bias_grads: Vec<Vec<f64>>,
    pub running_mean: Vec<f64>,
    pub running_var: Vec<f64>,
    pub batches: u64,
    pub eval: Vec<f64>,
    /// The residual's gradients ([`Fusion::AddRelu`] only).
    pub residual_grads: Vec<Vec<f64>>,
}

/// Which forward [`run_rank_with`] trains through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// `forward_t`.
    None,
    /// `forward_relu_t`.
    Relu,
    /// `forward_add_relu_t` with a residual of the batch's shape, trained
    /// too: `0.5·g + 0.25` element-wise (`g` the upstream gradient), so that
    /// slicing the batch slices the residual alike.
    AddRelu,
}

/// The permutation from `(N, C, *)` to channels-last `(N, *, C)` for a tensor
/// of `rank` dims, and its inverse.
pub fn channels_last_perm(rank: usize) -> (Vec<usize>, Vec<usize>) {
    let to_last: Vec<usize> = std::iter::once(0)
        .chain(2..rank)
        .chain(std::iter::once(1))
        .collect();
    let mut back = vec![0; rank];
    for (i, &p) in to_last.iter().enumerate() {
        back[p] = i;
    }
    (to_last, back)
}

/// `bn.forward_relu_t` (the fused ReLU) when `relu`, else `bn.forward_t`.
pub fn forward_maybe_relu(
    bn: &SyncBatchNorm,
    x: &Tensor,
    train: bool,
    relu: bool,
) -> candle::Result<Tensor> {
    if relu {
        bn.forward_relu_t(x, train)
    } else {
        bn.forward_t(x, train)
    }
}

/// Runs `steps` training steps on `batches[s]` (this rank's slice of step `s`)
/// with upstream gradient `grads[s]`, then an eval forward on `eval_x`.
pub fn run_rank(
    group: ProcessGroup,
    cfg: SyncBatchNormConfig,
    dtype: DType,
    shapes: Vec<Vec<usize>>,
    batches: Vec<Vec<f64>>,
    grads: Vec<Vec<f64>>,
    eval_x: (Vec<usize>, Vec<f64>),
) -> candle::Result<RankRun> {
    run_rank_with(
        group,
        cfg,
        dtype,
        shapes,
        batches,
        grads,
        eval_x,
        Fusion::None,
        false,
    )
}

/// [`run_rank`] through the forward of `fusion`, on the layer's kernels, or
/// with `composite` through [`SyncBatchNorm::forward_composite_t`] (candle's
/// own ops).
#[allow(clippy::too_many_arguments)]
pub fn run_rank_with(
    group: ProcessGroup,
    cfg: SyncBatchNormConfig,
    dtype: DType,
    shapes: Vec<Vec<usize>>,
    batches: Vec<Vec<f64>>,
    grads: Vec<Vec<f64>>,
    eval_x: (Vec<usize>, Vec<f64>),
    fusion: Fusion,
    composite: bool,
) -> candle::Result<RankRun> {
    let c_n = shapes[0][1];
    let relu = fusion != Fusion::None;
    let varmap = VarMap::new();
    let param_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let vb = VarBuilder::from_varmap(&varmap, param_dtype, &Device::Cpu);
    let bn = SyncBatchNorm::new(c_n, cfg, vb.pp("bn"), group)?;
    if let Some((w, b)) = bn.weight_and_bias() {
        let wv: Vec<f64> = (0..c_n).map(|c| 0.75 + 0.1 * c as f64).collect();
        let bv: Vec<f64> = (0..c_n).map(|c| 0.2 - 0.05 * c as f64).collect();
        Var::from_tensor(w)?.set(&tensor(&wv, &[c_n], param_dtype))?;
        Var::from_tensor(b)?.set(&tensor(&bv, &[c_n], param_dtype))?;
    }
    let mut run = RankRun {
        outputs: vec![],
        input_grads: vec![],
        weight_grads: vec![],
        bias_grads: vec![],
        running_mean: vec![],
        running_var: vec![],
        batches: 0,
        eval: vec![],
        residual_grads: vec![],
    };
    let residual = |gs: &[f64], shape: &[usize]| {
        let zs: Vec<f64> = gs.iter().map(|g| 0.5 * g + 0.25).collect();
        Var::from_tensor(&tensor(&zs, shape, dtype))
    };
    for ((shape, xs), gs) in shapes.iter().zip(&batches).zip(&grads) {
        let x = Var::from_tensor(&tensor(xs, shape, dtype))?;
        let g = tensor(gs, shape, dtype);
        let z = match fusion {
            Fusion::AddRelu => Some(residual(gs, shape)?),
            _ => None,
        };
        let y = match (&z, composite) {
            (z, true) => bn.forward_composite_t(
                x.as_tensor(),
                z.as_ref().map(|z| z.as_tensor()),
                relu,
                true,
            )?,
            (Some(z), false) => bn.forward_add_relu_t(x.as_tensor(), z.as_tensor(), true)?,
            (None, false) => forward_maybe_relu(&bn, x.as_tensor(), true, relu)?,
        };
        let loss = (y.to_dtype(DType::F64)? * g.to_dtype(DType::F64)?)?.sum_all()?;
        let store = loss.backward()?;
        if let Some(z) = &z {
            run.residual_grads
                .push(values(store.get(z.as_tensor()).expect("residual gradient")));
        }
        run.outputs.push(values(&y));
        run.input_grads
            .push(values(store.get(x.as_tensor()).expect("input gradient")));
        if let Some((w, b)) = bn.weight_and_bias() {
            run.weight_grads
                .push(values(store.get(w).expect("weight gradient")));
            run.bias_grads
                .push(values(store.get(b).expect("bias gradient")));
        }
    }
    if let (Some(m), Some(v)) = (bn.running_mean(), bn.running_var()) {
        run.running_mean = values(m);
        run.running_var = values(v);
    }
    run.batches = bn.num_batches_tracked().unwrap();
    let eval = tensor(&eval_x.1, &eval_x.0, dtype);
    let z = match fusion {
        Fusion::AddRelu => Some(residual(&eval_x.1, &eval_x.0)?),
        _ => None,
    };
    run.eval = match (&z, composite) {
        (z, true) => values(&bn.forward_composite_t(
            &eval,
            z.as_ref().map(|z| z.as_tensor()),
            relu,
            false,
        )?),
        (Some(z), false) => values(&bn.forward_add_relu_t(&eval, z.as_tensor(), false)?),
        (None, false) => values(&forward_maybe_relu(&bn, &eval, false, relu)?),
    };
    Ok(run)
}

/// Splits a row-major `(N, …)` array into consecutive slices of `sizes[r]`
/// samples, with their shapes.
pub fn split_batch(xs: &[f64], shape: &[usize], sizes: &[usize]) -> Vec<(Vec<usize>, Vec<f64>)> {
    let per: usize = shape[1..].iter().product();
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let mut s = shape.to_vec();
            s[0] = n;
            let part = xs[at * per..(at + n) * per].to_vec();
            at += n;
            (s, part)
        })
        .collect()
}

/// Runs one thread rank per entry of `sizes` in a group (60 s timeout):
/// rank `r` trains on its slice of `sizes[r]` samples of each batch of `xs`
/// (row-major, of `shape`) with the same slice of `gs`, then evaluates
/// `eval` ([`run_rank_with`]).
#[allow(clippy::too_many_arguments)]
pub fn run_thread_ranks(
    sizes: &[usize],
    shape: &[usize],
    xs: &[Vec<f64>],
    gs: &[Vec<f64>],
    eval: &(Vec<usize>, Vec<f64>),
    cfg: SyncBatchNormConfig,
    dtype: DType,
    fusion: Fusion,
    composite: bool,
) -> Vec<RankRun> {
    let groups =
        ProcessGroup::threads_with_timeout(sizes.len(), std::time::Duration::from_secs(60))
            .unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(r, group)| {
            let parts_x: Vec<(Vec<usize>, Vec<f64>)> = xs
                .iter()
                .map(|x| split_batch(x, shape, sizes)[r].clone())
                .collect();
            let parts_g: Vec<Vec<f64>> = gs
                .iter()
                .map(|g| split_batch(g, shape, sizes)[r].1.clone())
                .collect();
            let eval = eval.clone();
            std::thread::spawn(move || {
                let shapes = parts_x.iter().map(|p| p.0.clone()).collect();
                let batches = parts_x.into_iter().map(|p| p.1).collect();
                run_rank_with(
                    group, cfg, dtype, shapes, batches, parts_g, eval, fusion, composite,
                )
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

/// Checks the runs of the ranks of one group against `whole`, one rank that
/// held all their batches (`total` samples): outputs and input gradients (the
/// ranks' slices in rank order; input gradients within 4× the tolerances),
/// summed weight and bias gradients (when the layer is affine; `atol` scaled
/// by 4·√total), running statistics (1e-6) and counter, eval outputs, and
/// bitwise equal running statistics on every rank.
pub fn check_ranks_against_whole(
    label: &str,
    ranks: &[RankRun],
    whole: &RankRun,
    (atol, rtol): (f64, f64),
    total: usize,
) {
    let cat = |f: &dyn Fn(&RankRun) -> &Vec<f64>| -> Vec<f64> {
        ranks.iter().flat_map(|r| f(r).clone()).collect()
    };
    let sum = |f: &dyn Fn(&RankRun) -> &Vec<f64>| -> Vec<f64> {
        let mut acc = vec![0.0; f(whole).len()];
        for r in ranks {
            for (a, v) in acc.iter_mut().zip(f(r)) {
                *a += v;
            }
        }
        acc
    };
    for s in 0..whole.outputs.len() {
        let what = |x: &str| format!("{label}: {x} step {s}");
        assert_close(
            &what("outputs"),
            &cat(&|r| &r.outputs[s]),
            &whole.outputs[s],
            atol,
            rtol,
        );
        assert_close(
            &what("input grads"),
            &cat(&|r| &r.input_grads[s]),
            &whole.input_grads[s],
            atol * 4.0,
            rtol * 4.0,
        );
        if !whole.weight_grads.is_empty() {
            let scale = (total as f64).sqrt() * 4.0;
            let (w, b) = (sum(&|r| &r.weight_grads[s]), sum(&|r| &r.bias_grads[s]));
            assert_close(
                &what("summed weight grads"),
                &w,
                &whole.weight_grads[s],
                atol * scale,
                rtol * 4.0,
            );
            assert_close(
                &what("summed bias grads"),
                &b,
                &whole.bias_grads[s],
                atol * scale,
                rtol * 4.0,
            );
        }
    }
    for (r, run) in ranks.iter().enumerate() {
        let what = |x: &str| format!("{label}: rank {r} {x}");
        assert_close(
            &what("running mean"),
            &run.running_mean,
            &whole.running_mean,
            1e-6,
            1e-6,
        );
        assert_close(
            &what("running var"),
            &run.running_var,
            &whole.running_var,
            1e-6,
            1e-6,
        );
        assert_eq!(
            run.batches,
            whole.batches,
            "{}",
            what("num_batches_tracked")
        );
        assert_close(&what("eval"), &run.eval, &whole.eval, atol, rtol);
        // Bitwise the same running statistics on every rank.
        assert_eq!(
            run.running_mean,
            ranks[0].running_mean,
            "{}",
            what("running mean differs")
        );
        assert_eq!(
            run.running_var,
            ranks[0].running_var,
            "{}",
            what("running var differs")
        );
    }
}

/// What one rank got from [`swapped_layers`].
#[derive(Debug)]
pub struct SwappedRun {
    /// The error of the first failing call, or `None` when every call passed.
    pub error: Option<String>,
    /// Its typed kind ([`candle_syncbn::error_kind`]).
    pub kind: Option<candle_syncbn::ErrorKind>,
    /// Layer 'a''s and layer 'b''s running means afterwards.
    pub running_means: [Vec<f64>; 2],
}

/// Two layers of 3 channels, 'a' (inputs of mean 1.5) and 'b' (mean −20),
/// one training forward each (with the composed ops when `composite`): rank
/// 0 calls 'a' then 'b', every other rank 'b' then 'a'. Collectives that
/// compare only shapes would mix the two layers' statistics. With
/// `converted`, the layers are `candle_nn::BatchNorm`s converted by
/// `from_batch_norm` and named with `with_name`.
pub fn swapped_layers(group: ProcessGroup, composite: bool, converted: bool) -> SwappedRun {
    swapped_layers_on(&Device::Cpu, group, composite, converted)
}

/// [`swapped_layers`] with the layers and inputs on `device`.
pub fn swapped_layers_on(
    device: &Device,
    group: ProcessGroup,
    composite: bool,
    converted: bool,
) -> SwappedRun {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let cfg = SyncBatchNormConfig::default();
    let layer = |name: &str| {
        if converted {
            let bn = candle_nn::batch_norm(3, candle_nn::BatchNormConfig::default(), vb.pp(name));
            SyncBatchNorm::from_batch_norm(&bn.unwrap(), group.clone())
                .unwrap()
                .with_name(name)
        } else {
            SyncBatchNorm::new(3, cfg, vb.pp(name), group.clone()).unwrap()
        }
    };
    let (a, b) = (layer("a"), layer("b"));
    run_swapped(device, group.rank(), [&a, &b], composite, true)
}

/// How two layers get equal names (issue 29 item 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameName {
    /// Two models in one process (a teacher and a student), each with a
    /// layer `bn`.
    TwoModels,
    /// Two layers built from `VarBuilder`s with an empty prefix.
    EmptyPrefix,
    /// Two `candle_nn::BatchNorm`s of the same width converted by
    /// `from_batch_norm` (not renamed).
    Converted,
}

impl SameName {
    /// The name both layers get.
    pub fn name(self) -> &'static str {
        match self {
            SameName::TwoModels => "bn",
            SameName::EmptyPrefix => "(root)",
            SameName::Converted => "converted candle_nn::BatchNorm(3)",
        }
    }
}

/// [`swapped_layers`] with two layers of 3 channels that have the same name
/// (built as `case` says, in the same order on every rank): the first
/// built takes inputs of mean 1.5, the second of mean −20; rank 0 calls the
/// first then the second, every other rank the second then the first (the
/// same order as rank 0 unless `swap`).
pub fn swapped_same_name(group: ProcessGroup, case: SameName, swap: bool) -> SwappedRun {
    let device = Device::Cpu;
    let cfg = SyncBatchNormConfig::default();
    let (teacher, student) = (VarMap::new(), VarMap::new());
    let vb = |map: &VarMap| VarBuilder::from_varmap(map, DType::F32, &device);
    let layer = |map: &VarMap| match case {
        SameName::TwoModels => SyncBatchNorm::new(3, cfg, vb(map).pp("bn"), group.clone()),
        SameName::EmptyPrefix => SyncBatchNorm::new(3, cfg, vb(map), group.clone()),
        SameName::Converted => {
            let bn = candle_nn::batch_norm(3, candle_nn::BatchNormConfig::default(), vb(map))?;
            SyncBatchNorm::from_batch_norm(&bn, group.clone())
        }
    };
    let (a, b) = (layer(&teacher).unwrap(), layer(&student).unwrap());
    assert_eq!((a.name(), b.name()), (case.name(), case.name()));
    run_swapped(&device, group.rank(), [&a, &b], false, swap)
}

/// One training forward through each of `layers` (inputs of mean 1.5 and
/// −20), in that order on rank 0 and, when `swap`, in the other order on
/// every other rank; the first error and the running means afterwards.
fn run_swapped(
    device: &Device,
    rank: usize,
    [a, b]: [&SyncBatchNorm; 2],
    composite: bool,
    swap: bool,
) -> SwappedRun {
    let mut rng = Rng::new(40 + rank as u64);
    let mut input = |mean| {
        tensor(&rng.normals(4 * 3 * 2, mean, 1.0), &[4, 3, 2], DType::F32)
            .to_device(device)
            .unwrap()
    };
    let (xa, xb) = (input(1.5), input(-20.0));
    let order = if rank == 0 || !swap {
        [(a, &xa), (b, &xb)]
    } else {
        [(b, &xb), (a, &xa)]
    };
    let error = order.iter().find_map(|(layer, x)| {
        let y = if composite {
            layer.forward_composite_t(x, None, false, true)
        } else {
            layer.forward_t(x, true)
        };
        y.err()
    });
    let kind = error.as_ref().and_then(candle_syncbn::error_kind);
    let error = error.map(|e| e.to_string());
    let mean = |l: &SyncBatchNorm| values(l.running_mean().unwrap());
    SwappedRun {
        error,
        kind,
        running_means: [mean(a), mean(b)],
    }
}

/// Checks what every rank got from [`swapped_same_name`]: an error at the
/// first call that says the ranks disagree and names the first and the
/// second layer of that name, and running statistics that no mixed numbers
/// reached (still their initial zeros).
pub fn check_swapped_same_name(runs: &[SwappedRun], case: SameName) {
    let name = case.name();
    check_swapped_with(
        runs,
        &[
            format!("SyncBatchNorm '{name}': forward statistics, call 0"),
            format!("SyncBatchNorm '{name}' (2nd of that name): forward statistics, call 0"),
        ],
        &format!("{case:?}"),
    );
}

/// Checks what every rank got from [`swapped_layers`]: an error that says
/// the ranks disagree and names both layers, and running statistics that
/// no mixed numbers reached (still their initial zeros).
pub fn check_swapped(runs: &[SwappedRun], composite: bool) {
    let part = if composite {
        "forward mean (composed ops)"
    } else {
        "forward statistics"
    };
    let calls = ["'a'", "'b'"].map(|name| format!("SyncBatchNorm {name}: {part}, call 0"));
    check_swapped_with(runs, &calls, "swapped layers");
}

/// Checks that every rank got an error that says the ranks disagree and
/// names each of `calls`, and that the running means did not move.
fn check_swapped_with(runs: &[SwappedRun], calls: &[String], what: &str) {
    for (r, run) in runs.iter().enumerate() {
        let e = run
            .error
            .as_deref()
            .unwrap_or_else(|| panic!("rank {r}: {what} were not detected: {run:?}"));
        assert!(e.contains("disagree"), "rank {r}: {e}");
        // Typed: a training loop can tell a disagreement from a timeout.
        assert_eq!(
            run.kind,
            Some(candle_syncbn::ErrorKind::RanksDisagree),
            "rank {r}: {e}"
        );
        for call in calls {
            assert!(e.contains(call.as_str()), "rank {r}: {call}: {e}");
        }
        for means in &run.running_means {
            assert_eq!(
                means,
                &vec![0.0; 3],
                "rank {r}: {what}: running means moved"
            );
        }
    }
}

/// What one rank got from [`layer_stack`]: per step, the output's and the
/// input gradient's values (this rank's rows); then every layer's running
/// means and variances.
#[derive(Debug, Clone, PartialEq)]
pub struct StackRun {
    pub outputs: Vec<Vec<f64>>,
    pub input_grads: Vec<Vec<f64>>,
    pub running: Vec<Vec<f64>>,
}

/// Three training steps (forward and backward, f64) through layers of 4
/// channels 'a' → 'b' → 'a' again → 'c' (so 'a' is called twice per step)
/// on rows `rows` of batches of 6 samples (the same batches on every rank),
/// through the kernels or, with `composite`, candle's ops.
pub fn layer_stack(
    group: ProcessGroup,
    rows: std::ops::Range<usize>,
    composite: bool,
) -> candle::Result<StackRun> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = SyncBatchNormConfig::default();
    let layers: Vec<SyncBatchNorm> = ["a", "b", "c"]
        .iter()
        .map(|n| SyncBatchNorm::new(4, cfg, vb.pp(n), group.clone()))
        .collect::<candle::Result<_>>()?;
    let mut rng = Rng::new(7);
    let mut run = StackRun {
        outputs: vec![],
        input_grads: vec![],
        running: vec![],
    };
    let n = rows.len();
    let per = 4 * 3;
    for step in 0..3 {
        let xs = rng.normals(6 * per, step as f64 - 1.0, 2.0);
        let gs = rng.normals(6 * per, 0.0, 1.0);
        let part = |v: &[f64]| tensor(&v[rows.start * per..rows.end * per], &[n, 4, 3], DType::F64);
        let x = Var::from_tensor(&part(&xs))?;
        let mut y = x.as_tensor().clone();
        for i in [0, 1, 0, 2] {
            y = if composite {
                layers[i].forward_composite_t(&y, None, false, true)?
            } else {
                layers[i].forward_t(&y, true)?
            };
        }
        let store = (&y * part(&gs))?.sum_all()?.backward()?;
        run.outputs.push(values(&y));
        run.input_grads
            .push(values(store.get(x.as_tensor()).expect("input gradient")));
    }
    for l in &layers {
        run.running.push(values(l.running_mean().unwrap()));
        run.running.push(values(l.running_var().unwrap()));
    }
    Ok(run)
}

/// Checks the [`layer_stack`] runs of the ranks (rank `r` on rows
/// `bounds[r]..bounds[r + 1]`)
/// against one rank on the whole batch.
pub fn check_layer_stack(label: &str, ranks: &[StackRun], bounds: &[usize], composite: bool) {
    let whole = layer_stack(
        ProcessGroup::single(),
        0..bounds[bounds.len() - 1],
        composite,
    )
    .unwrap();
    let joined = |f: fn(&StackRun) -> &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        (0..whole.outputs.len())
            .map(|s| ranks.iter().flat_map(|r| f(r)[s].clone()).collect())
            .collect()
    };
    let outputs = joined(|r| &r.outputs);
    let grads = joined(|r| &r.input_grads);
    for s in 0..whole.outputs.len() {
        assert_close(
            &format!("{label}: output, step {s}"),
            &outputs[s],
            &whole.outputs[s],
            1e-9,
            1e-9,
        );
        assert_close(
            &format!("{label}: input gradient, step {s}"),
            &grads[s],
            &whole.input_grads[s],
            1e-9,
            1e-9,
        );
    }
    for (r, run) in ranks.iter().enumerate() {
        for (i, (got, want)) in run.running.iter().zip(&whole.running).enumerate() {
            assert_close(
                &format!("{label}: rank {r}: running statistic {i}"),
                got,
                want,
                1e-12,
                1e-12,
            );
        }
    }
}

/// Rank `rank` of `world` meeting on loopback: rank 0 listens on a free port
/// and writes it to `port_file`, the job token is `token`.
pub fn loopback_rendezvous(rank: usize, world: usize, port_file: &Path, token: &str) -> Rendezvous {
    Rendezvous::new(rank, world, "127.0.0.1", 0)
        .unwrap()
        .with_port_file(port_file)
        .with_token(token)
}

/// A frame header of the wire protocol (see `src/group/wire.rs`): magic,
/// kind, op, dtype, flags, root, tag, sequence number, count, payload length.
#[allow(clippy::too_many_arguments)]
pub fn raw_header(
    kind: u8,
    op: u8,
    dtype: u8,
    flags: u8,
    root: u32,
    count: u64,
    len: u64,
) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0..4].copy_from_slice(b"SBN1");
    h[4] = kind;
    h[5] = op;
    h[6] = dtype;
    h[7] = flags;
    h[8..12].copy_from_slice(&root.to_le_bytes());
    h[24..32].copy_from_slice(&count.to_le_bytes());
    h[32..40].copy_from_slice(&len.to_le_bytes());
    h
}

/// Reads one frame (its header, and a payload of at most 64 KiB) within 5 s.
pub fn raw_frame(s: &mut TcpStream) -> std::io::Result<([u8; 40], Vec<u8>)> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut h = [0u8; 40];
    s.read_exact(&mut h)?;
    let len = u64::from_le_bytes(h[32..40].try_into().unwrap()).min(1 << 16);
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p)?;
    Ok((h, p))
}

/// Answers the TCP group's ring set-up for a rank written by hand (see
/// [`raw_rank`]): its record in the exchange of listening addresses says it
/// opens no ring link, so the group runs every collective through rank 0,
/// and the first collective after it is #0 again.
pub fn raw_ring_opt_out(s: &mut TcpStream, world: u64) {
    use std::io::Write;
    const RECORD_LEN: u64 = 256;
    let len = world * RECORD_LEN;
    // Collective #0: an all-reduce of `len` u8 (dtype code 1), all zeros.
    s.write_all(&raw_header(4, 1, 1, 0, 0, len, len)).unwrap();
    s.write_all(&vec![0u8; len as usize]).unwrap();
    let (h, _) = raw_frame(s).unwrap();
    assert_eq!(h[4], 4, "the set-up exchange's result");
}

/// A rank `rank` of `world` written by hand: it completes the handshake with
/// rank 0 at `port` by proving it knows `token` (an HMAC-SHA-256 over the
/// transcript, as `src/group/rendezvous/handshake.rs` defines it), then waits for the
/// welcome. Returns the authenticated connection.
pub fn raw_rank(port: u16, rank: u32, world: u64, token: &str) -> TcpStream {
    use hmac::{Hmac, Mac};
    const VERSION: u8 = 2;
    use std::io::Write;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let nonce = [0x5a; 32];
    s.write_all(&raw_header(1, 0, 0, VERSION, rank, world, 32))
        .unwrap();
    s.write_all(&nonce).unwrap();
    let (h, challenge) = raw_frame(&mut s).unwrap();
    assert_eq!((h[4], challenge.len()), (6, 64), "a challenge");
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(b"candle-syncbn rendezvous proof\0");
    mac.update(&[2, VERSION]); // the joining rank proves
    mac.update(&world.to_le_bytes());
    mac.update(&rank.to_le_bytes());
    mac.update(&nonce);
    mac.update(&challenge[..32]);
    s.write_all(&raw_header(7, 0, 0, VERSION, 0, 0, 32))
        .unwrap();
    s.write_all(&mac.finalize().into_bytes()).unwrap();
    let (h, _) = raw_frame(&mut s).unwrap();
    assert_eq!(h[4], 2, "a welcome");
    s
}
