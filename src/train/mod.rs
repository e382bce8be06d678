//! `sdlora train`: the train_network run, built from the pieces below (spec:
//! sdscripts_cli_data.md §1, §4–§6; sdscripts_model_math.md §4, §5, §8).
pub mod amp;
pub mod args;
pub mod console;
pub mod counting;
pub mod lr;
pub mod noise;
pub mod optim;
pub mod rng_replay;
pub mod rng_state;
pub mod save;
pub mod step;
pub mod tensorboard;
pub mod trainer;

use anyhow::Result;

/// Entry point for `sdlora train <sd-scripts flags>`: parses and checks the arguments exactly
/// as train_network.py does, then runs the training (`trainer`).
pub fn run_cli(args: &[String]) -> Result<i32> {
    let mut train_args = match args::parse_train_args(args)? {
        args::ArgsOutcome::Help(text) => {
            println!("{text}");
            return Ok(0);
        }
        args::ArgsOutcome::ConfigWritten(path) => {
            eprintln!(
                "Saved config file / 設定ファイルを保存しました: {}",
                path.display()
            );
            return Ok(0);
        }
        args::ArgsOutcome::Run(a, notices) => {
            for n in notices {
                eprintln!("{n}");
            }
            a
        }
    };
    let warnings = train_args.verify()?;
    for w in &warnings {
        eprintln!("{w}");
    }
    trainer::train(&train_args, &warnings)
}
