//! The `#[repr(C)]` descriptors of small tensors that the kernels take by
//! value (`struct Vec1` and `struct Mat2` of `cuda-kernels/view.cuh`), built
//! from candle layouts. Pure Rust, so the CPU build and the emulated-kernel
//! tests use them too.

use candle::{DType, Layout, Result};

/// The run-time dtype code of a small tensor (`DtypeCode` in cuda-kernels/dtype.cuh).
pub fn dtype_code(dtype: DType, what: &str) -> Result<i32> {
    Ok(match dtype {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::I64 => 4,
        DType::U32 => 5,
        other => candle::bail!("sync-batch-norm: unsupported {what} dtype {other:?} on CUDA"),
    })
}

/// A per-channel vector (`struct Vec1` in cuda-kernels/view.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vec1 {
    /// Storage offset of element 0.
    pub offset: i64,
    /// Stride between elements.
    pub stride: i64,
    /// Run-time dtype code.
    pub dtype: i32,
    /// 0 when absent (null pointer).
    pub present: i32,
}

impl Vec1 {
    /// No tensor.
    pub const ABSENT: Vec1 = Vec1 {
        offset: 0,
        stride: 0,
        dtype: 0,
        present: 0,
    };
}

/// A small `(rows, C)` matrix (`struct Mat2` in cuda-kernels/view.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mat2 {
    /// Storage offset of element (0, 0).
    pub offset: i64,
    /// Stride between rows.
    pub row_stride: i64,
    /// Stride between columns.
    pub col_stride: i64,
    /// Run-time dtype code.
    pub dtype: i32,
    /// 0 when absent (null pointer).
    pub present: i32,
}

impl Mat2 {
    /// No tensor.
    pub const ABSENT: Mat2 = Mat2 {
        offset: 0,
        row_stride: 0,
        col_stride: 0,
        dtype: 0,
        present: 0,
    };
}

/// The per-channel vector of `len` elements of `layout` (any shape whose
/// non-unit dims form one strided run).
pub fn vec1(layout: &Layout, dtype: DType, len: usize, what: &str) -> Result<Vec1> {
    if layout.shape().elem_count() != len {
        candle::bail!(
            "sync-batch-norm: expected {what} of {len} elements, got shape {:?}",
            layout.dims()
        )
    }
    let kept: Vec<(usize, usize)> = layout
        .dims()
        .iter()
        .copied()
        .zip(layout.stride().iter().copied())
        .filter(|&(d, _)| d != 1)
        .collect();
    let stride = match kept.last() {
        None => 0,
        Some(&(_, s)) => {
            if !kept.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0) {
                candle::bail!(
                    "sync-batch-norm: {what} with strides {:?} for shape {:?} is not one strided run; make it contiguous",
                    layout.stride(),
                    layout.dims()
                )
            }
            s
        }
    };
    Ok(Vec1 {
        offset: layout.start_offset() as i64,
        stride: stride as i64,
        dtype: dtype_code(dtype, what)?,
        present: 1,
    })
}

/// The `(rows, channels)` matrix of `layout`.
pub fn mat2(
    layout: &Layout,
    dtype: DType,
    rows: usize,
    channels: usize,
    what: &str,
) -> Result<Mat2> {
    if layout.dims() != [rows, channels] {
        candle::bail!(
            "sync-batch-norm: expected {what} of shape [{rows}, {channels}], got {:?}",
            layout.dims()
        )
    }
    let s = layout.stride();
    Ok(Mat2 {
        offset: layout.start_offset() as i64,
        row_stride: s[0] as i64,
        col_stride: s[1] as i64,
        dtype: dtype_code(dtype, what)?,
        present: 1,
    })
}
