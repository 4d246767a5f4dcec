//! The (outer, channel, inner) view every kernel works on.

use candle::Layout;

/// A strided tensor seen as `(outer, channels, inner)`: the dims before the
/// channel axis merged into `outer`, the dims after it into `inner`.
///
/// `(N, C, H, W)` contiguous is `(N, C, H·W)` with inner stride 1; the same
/// tensor permuted to `(N, H, W, C)` with channel axis 3 is `(N·H·W, C, 1)`
/// with channel stride 1 (channel-innermost); 2-D `(N, C)` is `(N, C, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelView {
    /// Product of the dims before the channel axis.
    pub outer: usize,
    /// Size of the channel axis.
    pub channels: usize,
    /// Product of the dims after the channel axis.
    pub inner: usize,
    /// Stride of the merged outer dim (elements).
    pub outer_stride: usize,
    /// Stride of the channel axis (elements).
    pub channel_stride: usize,
    /// Stride of the merged inner dim (elements).
    pub inner_stride: usize,
    /// Offset of the first element in the storage.
    pub offset: usize,
}

impl ChannelView {
    /// The view of `layout` around `axis`, or `None` when the dims before or after
    /// the axis cannot be merged into one strided dim (make the tensor contiguous then).
    pub fn new(layout: &Layout, axis: usize) -> Option<Self> {
        let dims = layout.dims();
        let strides = layout.stride();
        if axis >= dims.len() {
            return None;
        }
        let (outer, outer_stride) = merge(&dims[..axis], &strides[..axis])?;
        let (inner, inner_stride) = merge(&dims[axis + 1..], &strides[axis + 1..])?;
        Some(Self {
            outer,
            channels: dims[axis],
            inner,
            outer_stride,
            channel_stride: strides[axis],
            inner_stride,
            offset: layout.start_offset(),
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }

    /// True when the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the channel is the innermost varying index (`inner == 1`): rows
    /// of the kernels then run over channels instead of over the spatial extent.
    pub fn channel_innermost(&self) -> bool {
        self.inner == 1
    }

    /// Storage index of element `(o, c, i)`.
    #[inline(always)]
    pub fn index(&self, o: usize, c: usize, i: usize) -> usize {
        self.offset + o * self.outer_stride + c * self.channel_stride + i * self.inner_stride
    }
}

/// Merges dims into one `(size, stride)` when they are laid out as one strided run.
fn merge(dims: &[usize], strides: &[usize]) -> Option<(usize, usize)> {
    let size: usize = dims.iter().product();
    if size == 0 {
        return Some((0, 0));
    }
    let kept: Vec<(usize, usize)> = dims
        .iter()
        .copied()
        .zip(strides.iter().copied())
        .filter(|&(d, _)| d != 1)
        .collect();
    match kept.last() {
        None => Some((1, 0)),
        Some(&(_, last_stride)) => {
            let mergeable = kept.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0);
            mergeable.then_some((size, last_stride))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_nchw() {
        let l = Layout::contiguous((2, 3, 4, 5));
        let v = ChannelView::new(&l, 1).unwrap();
        assert_eq!((v.outer, v.channels, v.inner), (2, 3, 20));
        assert_eq!(
            (v.outer_stride, v.channel_stride, v.inner_stride),
            (60, 20, 1)
        );
    }

    #[test]
    fn channels_last_permuted() {
        // (N, H, W, C) contiguous storage seen as (N, C, H, W), then permuted back.
        let l = Layout::contiguous((2, 4, 5, 3));
        let v = ChannelView::new(&l, 3).unwrap();
        assert_eq!((v.outer, v.channels, v.inner), (40, 3, 1));
        assert_eq!(v.channel_stride, 1);
        assert!(v.channel_innermost());
    }

    #[test]
    fn unmergeable_spatial_dims() {
        let l = Layout::contiguous((2, 3, 4, 5)).transpose(2, 3).unwrap();
        assert!(ChannelView::new(&l, 1).is_none());
    }

    #[test]
    fn broadcast_and_empty() {
        let l = Layout::new((2, 3, 4).into(), vec![0, 0, 0], 0);
        let v = ChannelView::new(&l, 1).unwrap();
        assert_eq!(
            (v.outer_stride, v.channel_stride, v.inner_stride),
            (0, 0, 0)
        );
        let l = Layout::contiguous((0, 3, 4));
        let v = ChannelView::new(&l, 1).unwrap();
        assert!(v.is_empty());
    }
}
