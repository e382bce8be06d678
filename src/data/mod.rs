//! Dataset config (sd-scripts TOML schema) and the data pipeline: subsets, regularisation
//! images, buckets, latent caching, captions and sd-scripts' epoch order.
//!
//! Entry points: fill a [`DataArgs`] from the command line, call [`build_dataset_group`], then
//! optionally [`cache_latents`], then per epoch [`Loader::epoch`].
pub mod args;
pub mod bucket;
pub mod cache;
pub mod caption;
pub mod config;
pub mod dataset;
pub mod image;
pub mod loader;
pub mod log;
pub mod npz;
pub mod pyrandom;

pub use args::{parse_face_crop_aug_range, parse_resolution, DataArgs};
pub use cache::{cache_latents, LatentEncoder};
pub use caption::TextTokenizer;
pub use dataset::{build_dataset_group, build_dataset_group_with_log, Dataset, DatasetGroup};
pub use loader::{Batch, GlobalTorchSeeds, Loader, SeedSource};
pub use log::DataLog;
pub use pyrandom::{PyRandom, TorchCpuGenerator};
