//! Optimizers of `sdlora train` (`--optimizer_type`).
pub mod adamw8bit;
