//! `--cache_latents` / `--cache_latents_to_disk`: one VAE sample per image (and per flip), in
//! sd-scripts' order and batching, kept in memory or in `.npz` files sd-scripts can read.
//! spec: sdscripts_cli_data.md §3.11.
use super::bucket::get_crop_ltrb;
use super::dataset::{progress_bar, DatasetGroup};
use super::image::{load_image_rgb, splitext_stem, trim_and_resize, trim_offsets};
use super::loader::CachedLatents;
use super::log::train_util;
use super::npz::{npz_keys, read_npz, write_npz, NpyArray, NpyData};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The VAE as the cache needs it. The trainer implements it: move `images` to the VAE's
/// device/dtype, `vae.encode(x).latent_dist.sample()` (a sample, not the mean), unscaled, and
/// return it on the CPU in the VAE dtype.
pub trait LatentEncoder {
    /// `images`: (B, 3, H, W) f32 in [-1, 1] on the CPU → (B, 4, H/8, W/8).
    fn encode(&self, images: &Tensor) -> Result<Tensor>;
}

/// `SdSdxlLatentsCachingStrategy.get_latents_npz_path`: the legacy `<stem>.npz` if it exists,
/// else `<stem>_{W:04}x{H:04}_sd.npz` with the original image size.
pub fn latents_npz_path(image_path: &str, image_size: (i64, i64)) -> PathBuf {
    let stem = splitext_stem(image_path);
    let old = PathBuf::from(format!("{stem}.npz"));
    if old.exists() {
        return old;
    }
    PathBuf::from(format!(
        "{stem}_{:04}x{:04}_sd.npz",
        image_size.0, image_size.1
    ))
}

/// `_default_is_disk_cached_latents_expected` (shapes are not checked, as in sd-scripts).
pub fn disk_cache_valid(npz: &Path, flip_aug: bool, skip_check: bool) -> bool {
    if !npz.exists() {
        return false;
    }
    if skip_check {
        return true;
    }
    match npz_keys(npz) {
        Ok(keys) => {
            keys.iter().any(|k| k == "latents")
                && (!flip_aug || keys.iter().any(|k| k == "latents_flipped"))
        }
        Err(_) => false,
    }
}

/// Reads `latents` and `latents_flipped` from a cache file.
pub fn load_npz_latents(npz: &Path) -> Result<(NpyArray, Option<NpyArray>)> {
    let mut arrays = read_npz(npz)?;
    let mut take = |k: &str| {
        arrays
            .iter()
            .position(|(n, _)| n == k)
            .map(|i| arrays.remove(i).1)
    };
    let Some(l) = take("latents") else {
        bail!("latents not found in {}", npz.display());
    };
    let f = take("latents_flipped");
    Ok((l, f))
}

fn tensor_to_npy(t: &Tensor) -> Result<NpyArray> {
    let t = t.to_kind(Kind::Float).contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
    let v: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1))?;
    Ok(NpyArray::f32(shape, v))
}

/// `save_latents_to_disk`: existing keys kept, then latents, original_size, crop_ltrb and
/// latents_flipped written (f32, int64, float64, f32).
pub fn save_latents_npz(
    npz: &Path,
    latents: &Tensor,
    original_size: (i64, i64),
    crop_ltrb: [f64; 4],
    flipped: Option<&Tensor>,
) -> Result<()> {
    let mut arrays: Vec<(String, NpyArray)> = if npz.exists() {
        read_npz(npz).unwrap_or_default()
    } else {
        vec![]
    };
    let mut set = |k: &str, a: NpyArray| {
        if let Some(slot) = arrays.iter_mut().find(|(n, _)| n == k) {
            slot.1 = a;
        } else {
            arrays.push((k.to_string(), a));
        }
    };
    set("latents", tensor_to_npy(latents)?);
    set(
        "original_size",
        NpyArray {
            shape: vec![2],
            data: NpyData::I64(vec![original_size.0, original_size.1]),
        },
    );
    set(
        "crop_ltrb",
        NpyArray {
            shape: vec![4],
            data: NpyData::F64(crop_ltrb.to_vec()),
        },
    );
    if let Some(f) = flipped {
        set("latents_flipped", tensor_to_npy(f)?);
    }
    write_npz(npz, &arrays)
}

/// `DatasetGroup.new_cache_latents`: per dataset, images sorted (stable) by bucket area,
/// batched up to `--vae_batch_size` while (bucket, flip_aug) stay equal; disk mode skips valid
/// files. Memory mode stores the encoder's output dtype.
pub fn cache_latents(
    group: &mut DatasetGroup,
    encoder: &dyn LatentEncoder,
    progress: bool,
) -> Result<()> {
    let to_disk = group.args.cache_latents_to_disk;
    let vae_batch = group.args.vae_batch_size.max(1) as usize;
    let skip_check = group.args.skip_cache_check;
    let log = group.log.clone();
    if !group.is_latent_cacheable() {
        bail!("when caching latents, either color_aug or random_crop cannot be used / latentをキャッシュするときはcolor_augとrandom_cropは使えません");
    }
    group.latents = group
        .datasets
        .iter()
        .map(|d| (0..d.images.len()).map(|_| None).collect())
        .collect();
    for di in 0..group.datasets.len() {
        log.info(train_util(2627), format!("[Dataset {di}]"));
        log.info(train_util(1120), "caching latents with caching strategy.");
        let ds = &mut group.datasets[di];
        let mut order: Vec<usize> = (0..ds.images.len()).collect();
        order.sort_by_key(|&i| ds.images[i].bucket_reso.0 * ds.images[i].bucket_reso.1);
        log.info(train_util(1170), "caching latents...");
        let pb = progress_bar(progress, order.len() as u64, "caching latents");
        let mut batch: Vec<usize> = vec![];
        let mut cond: Option<((i64, i64), bool)> = None;
        let mut results: Vec<(usize, CachedLatents)> = vec![];
        let mut flush = |batch: &mut Vec<usize>,
                         flip: bool,
                         ds: &mut super::dataset::Dataset|
         -> Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            let mut tensors = vec![];
            let mut metas = vec![];
            for &i in batch.iter() {
                let info = &ds.images[i];
                let img = load_image_rgb(&info.absolute_path)?;
                let orig = (img.w as i64, img.h as i64);
                let bucket = (info.bucket_reso.0 as usize, info.bucket_reso.1 as usize);
                let resized = (info.resized_size.0 as usize, info.resized_size.1 as usize);
                let offs = trim_offsets(resized, bucket, false, &mut |_, _| 0);
                let img = trim_and_resize(
                    &img,
                    bucket,
                    resized,
                    offs,
                    info.resize_interpolation.as_deref(),
                )
                .with_context(|| format!("caching latents of {}", info.absolute_path.display()))?;
                tensors.push(Tensor::from_slice(&img.to_chw_normalized()).view([
                    3,
                    img.h as i64,
                    img.w as i64,
                ]));
                metas.push((orig, get_crop_ltrb(info.bucket_reso, orig)));
            }
            let x = Tensor::stack(&tensors, 0);
            let lat = encoder.encode(&x)?;
            let lat_f = if flip {
                Some(encoder.encode(&x.flip([3]))?)
            } else {
                None
            };
            for (k, &i) in batch.iter().enumerate() {
                let l = lat.get(k as i64);
                let f = lat_f.as_ref().map(|t| t.get(k as i64));
                let (orig, ltrb) = metas[k];
                if to_disk {
                    let npz = ds.images[i].latents_npz.clone().unwrap();
                    save_latents_npz(&npz, &l, orig, ltrb, f.as_ref())?;
                } else {
                    results.push((
                        i,
                        CachedLatents {
                            latents: l,
                            flipped: f,
                            original_size: orig,
                            crop_ltrb: ltrb,
                        },
                    ));
                }
            }
            batch.clear();
            Ok(())
        };
        for &i in &order {
            let flip = ds.subsets[ds.images[i].subset].params.flip_aug;
            if to_disk {
                let info = &ds.images[i];
                let npz = latents_npz_path(&info.image_key, info.image_size.unwrap_or((0, 0)));
                let valid = disk_cache_valid(&npz, flip, skip_check);
                ds.images[i].latents_npz = Some(npz);
                if valid {
                    pb.inc(1);
                    continue;
                }
            }
            let c = (ds.images[i].bucket_reso, flip);
            if !batch.is_empty() && cond != Some(c) {
                let f = cond.unwrap().1;
                flush(&mut batch, f, ds)?;
            }
            batch.push(i);
            cond = Some(c);
            if batch.len() >= vae_batch {
                flush(&mut batch, c.1, ds)?;
            }
            pb.inc(1);
        }
        if let Some(c) = cond {
            flush(&mut batch, c.1, ds)?;
        }
        pb.finish_and_clear();
        for (i, c) in results {
            group.latents[di][i] = Some(c);
        }
    }
    Ok(())
}
