//! Bad input gets a clear error naming the layer, what was expected and what
//! was given, of the typed kind `ErrorKind::BadInput`; peers that stall or
//! fail give typed errors too.

use candle::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::{error_kind, ErrorKind, ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn layer(c: usize, vb: VarBuilder) -> candle::Result<SyncBatchNorm> {
    SyncBatchNorm::new(
        c,
        SyncBatchNormConfig::default(),
        vb.pp("features.3"),
        ProcessGroup::single(),
    )
}

/// The error of `r`, which must be a typed bad input.
fn err_of(r: candle::Result<Tensor>) -> String {
    let e = r.expect_err("expected an error");
    assert_eq!(error_kind(&e), Some(ErrorKind::BadInput), "{e}");
    e.to_string()
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error {err:?} should mention {p:?}");
    }
}

#[test]
fn input_rank_channels_and_dtype() {
    let varmap = VarMap::new();
    let bn = layer(
        4,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let dev = Device::Cpu;
    let e = err_of(bn.forward_t(&Tensor::zeros(4, DType::F32, &dev).unwrap(), true));
    assert_mentions(&e, &["features.3", "rank 2 to 5", "[4]"]);
    let e = err_of(bn.forward_t(
        &Tensor::zeros((1, 4, 1, 1, 1, 2), DType::F32, &dev).unwrap(),
        true,
    ));
    assert_mentions(&e, &["features.3", "rank 6"]);
    let e = err_of(bn.forward_t(&Tensor::zeros((2, 3, 5), DType::F32, &dev).unwrap(), false));
    assert_mentions(
        &e,
        &[
            "features.3",
            "expected 4 channels",
            "[2, 3, 5]",
            "3 channels",
        ],
    );
    let e = err_of(bn.forward_t(&Tensor::zeros((2, 4), DType::U32, &dev).unwrap(), true));
    assert_mentions(&e, &["features.3", "U32"]);
    let e = err_of(bn.forward_t(&Tensor::zeros((2, 4), DType::I64, &dev).unwrap(), false));
    assert_mentions(&e, &["features.3", "I64"]);
}

#[test]
fn parameter_shapes_and_dtypes() {
    let dev = Device::Cpu;
    // A checkpoint whose weight has the wrong length.
    let mut ts = HashMap::new();
    ts.insert(
        "features.3.weight".to_string(),
        Tensor::ones(5, DType::F32, &dev).unwrap(),
    );
    ts.insert(
        "features.3.bias".to_string(),
        Tensor::zeros(4, DType::F32, &dev).unwrap(),
    );
    ts.insert(
        "features.3.running_mean".to_string(),
        Tensor::zeros(4, DType::F32, &dev).unwrap(),
    );
    ts.insert(
        "features.3.running_var".to_string(),
        Tensor::ones(4, DType::F32, &dev).unwrap(),
    );
    let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
    let e = layer(4, vb).expect_err("wrong weight shape").to_string();
    assert_mentions(&e, &["features.3.weight", "4", "5"]);

    // f64 parameters with an f32 input: the dtype must be the input's or f32.
    let varmap = VarMap::new();
    let bn = layer(4, VarBuilder::from_varmap(&varmap, DType::F64, &dev)).unwrap();
    let e = err_of(bn.forward_t(&Tensor::zeros((2, 4), DType::F16, &dev).unwrap(), true));
    assert_mentions(&e, &["features.3", "weight", "F16", "F64"]);
}

#[test]
fn training_with_one_value_per_channel() {
    let varmap = VarMap::new();
    let bn = layer(
        3,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let e = err_of(bn.forward_t(
        &Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap(),
        true,
    ));
    assert_mentions(
        &e,
        &[
            "features.3",
            "more than 1 value per channel",
            "got 1",
            "[1, 3]",
        ],
    );
    let e = err_of(bn.forward_t(
        &Tensor::ones((0, 3, 2), DType::F32, &Device::Cpu).unwrap(),
        true,
    ));
    assert_mentions(&e, &["features.3", "got 0"]);
    // Eval with running statistics is fine with a single value, and with none.
    let y = bn
        .forward_t(
            &Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap(),
            false,
        )
        .unwrap();
    assert_eq!(y.dims(), &[1, 3]);
    let y = bn
        .forward_t(
            &Tensor::ones((0, 3, 2), DType::F32, &Device::Cpu).unwrap(),
            false,
        )
        .unwrap();
    assert_eq!(y.dims(), &[0, 3, 2]);
    // One spatial value per sample but two samples is enough.
    let y = bn
        .forward_t(
            &Tensor::new(&[[1f32, 2., 3.], [3., 2., 1.]], &Device::Cpu).unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap()[0][1], 0.0);
}

#[test]
fn invalid_configuration() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bad = [
        SyncBatchNormConfig::default().with_eps(-1.0),
        SyncBatchNormConfig::default().with_eps(f64::NAN),
        SyncBatchNormConfig::default().with_momentum(Some(1.5)),
    ];
    for cfg in bad {
        let e = SyncBatchNorm::new(4, cfg, vb.pp("bn"), ProcessGroup::single())
            .expect_err("invalid config");
        assert_eq!(error_kind(&e), Some(ErrorKind::BadInput), "{e}");
        let e = e.to_string();
        assert!(e.contains("'bn'"), "{e}");
    }
    let e = SyncBatchNorm::new(
        0,
        SyncBatchNormConfig::default(),
        vb.pp("bn"),
        ProcessGroup::single(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("num_features"), "{e}");
    assert_eq!(error_kind(&e), Some(ErrorKind::BadInput), "{e}");
}

/// What a training loop sees from a layer's forward when a peer stalls
/// (a typed timeout) or its thread ends (a typed failure of that rank),
/// with the messages as before.
#[test]
fn stalled_and_departed_peers_are_typed() {
    let forward = |g: ProcessGroup| {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bn = SyncBatchNorm::new(3, SyncBatchNormConfig::default(), vb.pp("bn"), g).unwrap();
        let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        bn.forward_t(&x, true).unwrap_err()
    };
    // Rank 1 holds its handle and never calls: rank 0 times out.
    let mut ranks = ProcessGroup::threads_with_timeout(2, Duration::from_millis(200)).unwrap();
    let stalled = ranks.pop().unwrap();
    let e = forward(ranks.pop().unwrap());
    assert_eq!(error_kind(&e), Some(ErrorKind::Timeout), "{e}");
    assert!(e.to_string().contains("timed out after 200ms"), "{e}");
    drop(stalled);
    // Rank 1's handle is dropped (its thread ended): rank 0 fails at once.
    let mut ranks = ProcessGroup::threads_with_timeout(2, Duration::from_secs(60)).unwrap();
    drop(ranks.pop());
    let start = Instant::now();
    let e = forward(ranks.pop().unwrap());
    assert!(start.elapsed() < Duration::from_secs(30), "{e}");
    assert_eq!(
        error_kind(&e),
        Some(ErrorKind::PeerFailed { rank: 1 }),
        "{e}"
    );
    assert!(e.to_string().contains("left the group"), "{e}");
}

#[test]
fn mixed_devices_are_reported() {
    // Needs a second device; with a CUDA device present, parameters on the GPU
    // and an input on the CPU must give an error naming both devices.
    match Device::new_cuda(0) {
        Ok(gpu) => {
            let varmap = VarMap::new();
            let bn = layer(4, VarBuilder::from_varmap(&varmap, DType::F32, &gpu)).unwrap();
            let e = err_of(bn.forward_t(
                &Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap(),
                true,
            ));
            assert_mentions(&e, &["features.3", "Cpu", "Cuda"]);
        }
        Err(_) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "skipped mixed_devices_are_reported: no CUDA device"
            );
        }
    }
}
