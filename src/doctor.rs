//! `sdlora doctor`: what this binary runs on. Device names and memory come from the CUDA driver
//! API (dlopen'd, so a CPU-only machine needs no CUDA at all), since tch exposes only counts.
use anyhow::Result;
use std::ffi::{c_char, c_int, c_void, CStr};

/// Everything doctor reports, so tests can check it without parsing text.
#[derive(Debug, Clone)]
pub struct Report {
    pub sdlora_version: &'static str,
    pub libtorch_version: &'static str,
    pub libtorch_lib: &'static str,
    pub linked_cuda: bool,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub devices: Vec<GpuInfo>,
    pub cpu_threads: i32,
}

#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub total_memory: u64,
    pub compute_capability: (i32, i32),
}

impl GpuInfo {
    /// bf16 tensor-core math needs compute capability 8.0 (Ampere) or newer.
    pub fn bf16_supported(&self) -> bool {
        self.compute_capability.0 >= 8
    }
}

pub fn report() -> Result<Report> {
    // Touch libtorch first: a broken install fails here, not halfway through training.
    let t = tch::Tensor::from_slice(&[1f32, 2.0, 3.0]);
    let s = t.sum(tch::Kind::Float).double_value(&[]);
    anyhow::ensure!((s - 6.0).abs() < 1e-6, "libtorch computed 1+2+3 = {s}");
    let cuda_available = tch::Cuda::is_available();
    let devices = if cuda_available {
        cuda_devices()
    } else {
        Vec::new()
    };
    Ok(Report {
        sdlora_version: env!("CARGO_PKG_VERSION"),
        libtorch_version: env!("SDLORA_LIBTORCH_VERSION"),
        libtorch_lib: env!("SDLORA_LIBTORCH_LIB"),
        linked_cuda: cfg!(sdlora_linked_cuda),
        cuda_available,
        cudnn_available: cuda_available && tch::Cuda::cudnn_is_available(),
        devices,
        cpu_threads: tch::get_num_threads(),
    })
}

pub fn run() -> Result<i32> {
    let r = match report() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: libtorch could not initialise: {e:#}");
            return Ok(2);
        }
    };
    println!("sdlora {}", r.sdlora_version);
    println!("libtorch {} ({})", r.libtorch_version, r.libtorch_lib);
    println!("libtorch_cuda linked: {}", yes_no(r.linked_cuda));
    println!("CPU threads: {}", r.cpu_threads);
    println!("CUDA available: {}", yes_no(r.cuda_available));
    if r.cuda_available {
        println!("cuDNN available: {}", yes_no(r.cudnn_available));
        println!("CUDA devices: {}", tch::Cuda::device_count());
        for d in &r.devices {
            println!(
                "  cuda:{} {} — {:.1} GiB, compute capability {}.{}, bf16: {}",
                d.index,
                d.name,
                d.total_memory as f64 / (1u64 << 30) as f64,
                d.compute_capability.0,
                d.compute_capability.1,
                yes_no(d.bf16_supported())
            );
        }
    } else if r.linked_cuda {
        println!("  (libtorch has CUDA support, but no CUDA driver or GPU was found)");
    }
    Ok(0)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

type CuInit = unsafe extern "C" fn(u32) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;

const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;

unsafe fn sym<T: Copy>(lib: *mut c_void, name: &CStr) -> Option<T> {
    let p = libc::dlsym(lib, name.as_ptr());
    if p.is_null() {
        None
    } else {
        Some(std::mem::transmute_copy::<*mut c_void, T>(&p))
    }
}

/// Names, memory and compute capability of every CUDA device, via the driver API.
fn cuda_devices() -> Vec<GpuInfo> {
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return Vec::new();
        }
        let (Some(init), Some(count), Some(get), Some(name), Some(mem), Some(attr)) = (
            sym::<CuInit>(lib, c"cuInit"),
            sym::<CuDeviceGetCount>(lib, c"cuDeviceGetCount"),
            sym::<CuDeviceGet>(lib, c"cuDeviceGet"),
            sym::<CuDeviceGetName>(lib, c"cuDeviceGetName"),
            sym::<CuDeviceTotalMem>(lib, c"cuDeviceTotalMem_v2"),
            sym::<CuDeviceGetAttribute>(lib, c"cuDeviceGetAttribute"),
        ) else {
            return Vec::new();
        };
        if init(0) != 0 {
            return Vec::new();
        }
        let mut n: c_int = 0;
        if count(&mut n) != 0 {
            return Vec::new();
        }
        (0..n)
            .filter_map(|i| {
                let mut dev: c_int = 0;
                if get(&mut dev, i) != 0 {
                    return None;
                }
                let mut buf = [0 as c_char; 256];
                name(buf.as_mut_ptr(), buf.len() as c_int, dev);
                let mut total: usize = 0;
                mem(&mut total, dev);
                let (mut major, mut minor) = (0, 0);
                attr(
                    &mut major,
                    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    dev,
                );
                attr(
                    &mut minor,
                    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    dev,
                );
                Some(GpuInfo {
                    index: i as usize,
                    name: CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned(),
                    total_memory: total as u64,
                    compute_capability: (major, minor),
                })
            })
            .collect()
    }
}
