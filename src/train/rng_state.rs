//! libtorch's default generator states (CPU and CUDA), for `--save_state` / `--resume`:
//! `torch.get_rng_state()` / `torch.cuda.get_rng_state()` equivalents through a small C++ shim
//! (csrc/rng_state.cpp), since tch exposes only `manual_seed`.
use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Device, Tensor};

extern "C" {
    fn sdlora_rng_get_state(
        device_type: c_int,
        index: c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> *mut c_void;
    fn sdlora_rng_set_state(
        device_type: c_int,
        index: c_int,
        state: *const c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

fn device_args(device: Device) -> (c_int, c_int) {
    match device {
        Device::Cuda(i) => (1, i as c_int),
        _ => (0, 0),
    }
}

/// The default generator's state of `device` (CPU, or CUDA index) as a uint8 tensor on the CPU.
pub fn get_state(device: Device) -> Result<Tensor> {
    let (ty, idx) = device_args(device);
    let mut err = [0 as c_char; 512];
    // SAFETY: the shim returns a heap at::Tensor (tch's C_tensor) that from_ptr takes ownership of.
    let p = unsafe { sdlora_rng_get_state(ty, idx, err.as_mut_ptr(), err.len()) };
    if p.is_null() {
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        bail!("reading the {device:?} random generator state: {msg}");
    }
    Ok(unsafe { Tensor::from_ptr(p as *mut torch_sys::C_tensor) })
}

/// Restores a state read by [`get_state`].
pub fn set_state(device: Device, state: &Tensor) -> Result<()> {
    let (ty, idx) = device_args(device);
    let mut err = [0 as c_char; 512];
    let state = state.to_device(Device::Cpu).contiguous();
    // SAFETY: `state` outlives the call; the shim only reads it.
    let rc = unsafe {
        sdlora_rng_set_state(
            ty,
            idx,
            state.as_ptr() as *const c_void,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        bail!("restoring the {device:?} random generator state: {msg}");
    }
    Ok(())
}
