//! kohya-compatible LoRA network (sd-scripts' `networks.lora`).
pub mod inspect;
