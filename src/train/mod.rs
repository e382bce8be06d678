//! `sdlora train`: the train_network run.
pub mod args;
pub mod optim;
pub mod rng_replay;

use anyhow::Result;

/// Entry point for `sdlora train <sd-scripts flags>`.
pub fn run_cli(args: &[String]) -> Result<i32> {
    anyhow::bail!(
        "sdlora train is not implemented yet (got {} arguments)",
        args.len()
    )
}
