//! sdlora: a LoRA trainer for Stable Diffusion 1.x/2.x on libtorch, a drop-in for
//! kohya-ss/sd-scripts' `train_network.py`. The binary is a thin wrapper over this crate so tests
//! and benchmarks call the same code.
pub mod cli;
pub mod data;
pub mod doctor;
pub mod io;
pub mod lora;
pub mod models;
pub mod modelspec;
pub mod tools;
pub mod train;
