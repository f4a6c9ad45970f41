use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use std::time::Instant;

#[test]
fn probe() {
    let device = Device::default().autodiff();
    let mut model: Linear = LinearConfig::new(1024, 1024).init(&device);
    let mut optim = AdamConfig::new().init();
    let x = Tensor::<2>::ones([3, 1024], &device);
    let grads = GradientsParams::from_grads(model.forward(x.clone()).sum().backward(), &model);
    model = optim.step(1e-2, model, grads);
    for _ in 0..3 {
        let t = Instant::now();
        let d = model.weight.val().into_data();
        let a = t.elapsed();
        let t = Instant::now();
        let r = optim.to_record();
        let b = t.elapsed();
        let t = Instant::now();
        let bytes = r.into_bytes().unwrap();
        let c = t.elapsed();
        let t = Instant::now();
        let rd = burn_pack::Reader::from_bytes(bytes).unwrap();
        let ts = rd.into_tensors().unwrap();
        let mut n = 0;
        for t in ts {
            n += t.into_parts().unwrap().4.len();
        }
        let e = t.elapsed();
        let t = Instant::now();
        let s = ckpt_burn::BurnSnapshot::capture(&model, &optim).unwrap();
        let f = t.elapsed();
        eprintln!(
            "into_data {a:?} ({} B) to_record {b:?} into_bytes {c:?} read {e:?} ({n} B) capture {f:?} ({} B)",
            d.as_bytes().len(),
            s.nbytes()
        );
        let _ = model.clone().devices();
    }
}
