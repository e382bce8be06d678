//! Dataset config (sd-scripts TOML schema) and the data pipeline.
