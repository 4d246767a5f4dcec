//! Data-parallel helpers over in-process ranks: parameter broadcast, bucketed
//! gradient averaging, atomic checkpoints.

use candle::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use candle_syncbn::data_parallel::{
    average_gradients_bucketed, broadcast_varmap, save_varmap_atomic,
};
use candle_syncbn::ProcessGroup;

/// A varmap with two weights (f32, f64), a counter (i64) and a stat without
/// gradient, all different per rank.
fn model(rank: usize) -> (VarMap, Tensor, Tensor, Tensor) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let c = rank as f64 + 1.0;
    let a = vb.get_with_hints((3, 2), "a", Init::Const(c)).unwrap();
    let b = vb
        .get_with_hints_dtype(5, "b", Init::Const(-c), DType::F64)
        .unwrap();
    let s = vb.get_with_hints(4, "stat", Init::Const(10.0 * c)).unwrap();
    vb.get_with_hints_dtype((), "n", Init::Const(c), DType::I64)
        .unwrap();
    (varmap, a, b, s)
}

#[test]
fn broadcast_and_average() {
    let groups = ProcessGroup::threads(3).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            std::thread::spawn(move || {
                let r = g.rank();
                let (varmap, a, b, s) = model(r);
                broadcast_varmap(&varmap, &g, 0).unwrap();
                let all: Vec<f64> = [&a, &b, &s]
                    .iter()
                    .flat_map(|t| {
                        t.to_dtype(DType::F64)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
                    })
                    .collect();
                let n = varmap.data().lock().unwrap()["n"]
                    .as_tensor()
                    .to_scalar::<i64>()
                    .unwrap();
                // gradients: d(sum(a)·(r+1))/da = r+1; b has a gradient on rank 1 only.
                let mut loss = (a.sum_all().unwrap() * (r as f64 + 1.0)).unwrap();
                if r == 1 {
                    loss = (loss + b.sum_all().unwrap().to_dtype(DType::F32).unwrap()).unwrap();
                }
                let mut grads = loss.backward().unwrap();
                // 8-byte buckets: one call per variable, exercising the split.
                average_gradients_bucketed(&varmap, &mut grads, &g, 8).unwrap();
                let ga = grads
                    .get(&a)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let gb = grads.get(&b).unwrap().to_vec1::<f64>().unwrap();
                assert!(
                    grads.get(&s).is_none(),
                    "no gradient must appear for a stat"
                );
                (all, n, ga, gb)
            })
        })
        .collect();
    for h in handles {
        let (all, n, ga, gb) = h.join().unwrap();
        assert_eq!(&all[..6], &[1.0; 6]);
        assert_eq!(&all[6..11], &[-1.0; 5]);
        assert_eq!(&all[11..], &[10.0; 4]);
        assert_eq!(n, 1);
        assert_eq!(ga, vec![2.0; 6]); // (1 + 2 + 3) / 3
        assert_eq!(gb, vec![1.0 / 3.0; 5]); // (0 + 1 + 0) / 3
    }
}

#[test]
fn checkpoint_is_written_atomically_and_reloads() {
    let (varmap, ..) = model(2);
    let dir = std::env::temp_dir().join(format!("syncbn-dp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("m.safetensors");
    save_varmap_atomic(&varmap, &p).unwrap();
    save_varmap_atomic(&varmap, &p).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("m.safetensors")]);
    let (mut other, a, ..) = model(0);
    other.load(&p).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![3.0; 6]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
