//! Command line: subcommands dispatch to the library. `train` takes sd-scripts' flags verbatim,
//! so its arguments are handed unparsed to the training module's own parser.
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "sdlora",
    version,
    about = "LoRA trainer for Stable Diffusion 1.x/2.x, a drop-in for sd-scripts' train_network.py"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a LoRA with sd-scripts' train_network.py flags (alias: train_network)
    #[command(alias = "train_network", disable_help_flag = true)]
    Train {
        /// sd-scripts flags, e.g. --pretrained_model_name_or_path=model.safetensors --dataset_config=config.toml
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fold LoRAs into a checkpoint, or merge LoRAs into one (sd-scripts networks/merge_lora.py)
    #[command(name = "merge_lora", disable_help_flag = true)]
    MergeLora {
        /// merge_lora.py flags, e.g. --sd_model=model.safetensors --models a.safetensors --ratios 0.8 --save_to=out.safetensors
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Merge LoRAs into one of a given rank by SVD (sd-scripts networks/svd_merge_lora.py)
    #[command(name = "svd_merge_lora", disable_help_flag = true)]
    SvdMergeLora {
        /// svd_merge_lora.py flags
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Resize a LoRA to a new rank by SVD (sd-scripts networks/resize_lora.py)
    #[command(name = "resize_lora", disable_help_flag = true)]
    ResizeLora {
        /// resize_lora.py flags, e.g. --model=in.safetensors --new_rank=8 --save_to=out.safetensors
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Extract a LoRA from the difference of two checkpoints (sd-scripts networks/extract_lora_from_models.py)
    #[command(name = "extract_lora_from_models", disable_help_flag = true)]
    ExtractLoraFromModels {
        /// extract_lora_from_models.py flags
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show a LoRA file's metadata, module counts, ranks, alphas, dtypes and weight norms
    Inspect {
        /// the LoRA .safetensors file
        file: std::path::PathBuf,
    },
    /// Report the sdlora and libtorch versions, CUDA devices, cuDNN and bf16 support
    Doctor,
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train { args } => crate::train::run_cli(&args),
        Command::MergeLora { args } => crate::tools::merge_lora::run(&args),
        Command::SvdMergeLora { args } => crate::tools::svd_merge_lora::run(&args),
        Command::ResizeLora { args } => crate::tools::resize_lora::run(&args),
        Command::ExtractLoraFromModels { args } => crate::tools::extract_lora::run(&args),
        Command::Inspect { file } => crate::lora::inspect::run(&file),
        Command::Doctor => crate::doctor::run(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
