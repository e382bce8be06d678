//! kohya-compatible LoRA network (sd-scripts' `networks.lora`): modules attached to the models'
//! layers through `models::layers::VisitLayers`, kohya-layout `.safetensors` save/load with
//! sd-scripts' metadata and hashes, and `sdlora inspect`.
pub mod file;
pub mod inspect;
pub mod metadata;
pub mod module;
pub mod network;

pub use file::LoraFile;
pub use metadata::{DatasetFacts, PyValue, TrainingFacts};
pub use module::{Alpha, LoraModule, WrappedKind};
pub use network::{LoadInfo, LoraNetwork, LoraOptions, ParamGroup};
