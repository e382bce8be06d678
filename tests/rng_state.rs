//! Saving and restoring libtorch's CPU generator state reproduces the same draws.
use sdlora::train::rng_state::{get_state, set_state};
use tch::{Device, Kind, Tensor};

#[test]
fn cpu_generator_state_round_trip() {
    tch::manual_seed(1234);
    let _ = Tensor::randn([7], (Kind::Float, Device::Cpu)); // leave a cached normal behind
    let state = get_state(Device::Cpu).unwrap();
    let a = Tensor::randn([33], (Kind::Float, Device::Cpu));
    let b = Tensor::randint(1000, [5], (Kind::Int64, Device::Cpu));
    tch::manual_seed(99); // move the generator elsewhere
    set_state(Device::Cpu, &state).unwrap();
    let a2 = Tensor::randn([33], (Kind::Float, Device::Cpu));
    let b2 = Tensor::randint(1000, [5], (Kind::Int64, Device::Cpu));
    assert!(a.equal(&a2), "randn after restore differs");
    assert!(b.equal(&b2), "randint after restore differs");
}

#[test]
fn restoring_garbage_is_an_error() {
    let bad = Tensor::zeros([3], (Kind::Uint8, Device::Cpu));
    assert!(set_state(Device::Cpu, &bad).is_err());
}
