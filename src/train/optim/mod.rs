//! Optimizers over LoRA parameter groups (spec: sdscripts_cli_data.md §1.5, §1.6).
pub mod adafactor;
pub mod adamw;
pub mod adamw8bit;
pub mod build;
pub mod common;
pub mod lion;
pub mod optimizer_args;
pub mod sgd;
