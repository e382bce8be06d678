//! `sdlora inspect FILE`.
use anyhow::Result;
use std::path::Path;

pub fn run(file: &Path) -> Result<i32> {
    anyhow::bail!(
        "sdlora inspect is not implemented yet (file: {})",
        file.display()
    )
}
