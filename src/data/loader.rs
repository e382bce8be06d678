//! Epoch iteration in sd-scripts' order, with images decoded on background threads.
//!
//! sd-scripts wraps its dataset in a torch DataLoader (batch_size=1, shuffle=True): per epoch
//! the sampler permutes the batch indices with a fresh generator seeded from the global torch
//! RNG, and each fetched batch is read through the fetching process's copy of the dataset, whose
//! bucket order is reshuffled (`random.seed(dataset_seed + epoch)`) only by the collate *after*
//! that process's first fetch of the epoch. We replay that exactly, one "virtual worker" per
//! DataLoader worker (or the main process with 0 workers), so the same seed visits the same
//! images in the same order and draws the same augmentations.
//! spec: sdscripts_cli_data.md §3.6, §3.7, §6.3.4, §6.5.
use super::caption::{
    input_ids_windows, max_length_for, process_caption, CaptionContext, TextTokenizer,
};
use super::dataset::{Dataset, DatasetGroup, OrderState};
use super::image::{
    apply_color_aug, draw_color_aug, load_image_rgb, trim_and_resize, trim_offsets, ColorAug,
    Image8,
};
use super::log::DataLog;
use super::pyrandom::{PyRandom, TorchCpuGenerator};
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// Where the DataLoader's two per-epoch int64 draws come from (`_base_seed`, then the
/// RandomSampler's seed). In training this is libtorch's global CPU generator, shared with
/// model init and timestep sampling.
pub trait SeedSource {
    fn draw_i64(&mut self) -> i64;
}

/// `torch.empty((), dtype=torch.int64).random_()` on libtorch's global CPU generator.
pub struct GlobalTorchSeeds;

impl SeedSource for GlobalTorchSeeds {
    fn draw_i64(&mut self) -> i64 {
        let mut t = Tensor::empty([] as [i64; 0], (Kind::Int64, Device::Cpu));
        let _ = t.random_();
        t.int64_value(&[])
    }
}

/// Memory-cached latents of one image (`info.latents`, `info.latents_flipped`).
pub struct CachedLatents {
    pub latents: Tensor,
    pub flipped: Option<Tensor>,
    pub original_size: (i64, i64),
    pub crop_ltrb: [f64; 4],
}

/// What one sample of a batch will be, decided in sd-scripts' draw order.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemPlan {
    pub image: usize,
    pub loss_weight: f64,
    pub flipped: bool,
    /// Trim (bucketing) or crop (no bucketing) offsets (left, top) after any resize.
    pub offsets: (usize, usize),
    pub color: ColorAug,
    pub caption: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BatchPlan {
    /// Position in the epoch (0-based) and the group index the sampler chose.
    pub step_in_epoch: usize,
    pub group_index: usize,
    pub dataset: usize,
    /// Which sd-scripts process fetched it: None = main process, Some(w) = worker w.
    pub worker: Option<usize>,
    pub items: Vec<ItemPlan>,
}

/// One dataset copy as seen by one fetching process.
#[derive(Clone)]
struct VirtualWorker {
    rng: PyRandom,
    orders: Vec<OrderState>,
}

impl VirtualWorker {
    fn fresh(group: &DatasetGroup, rng: PyRandom) -> Self {
        VirtualWorker {
            rng,
            orders: group
                .datasets
                .iter()
                .map(|d| d.initial_order.clone())
                .collect(),
        }
    }

    /// The collate's `set_current_epoch(epoch)` on every dataset of this copy.
    fn collate(&mut self, group: &DatasetGroup, epoch: i64, main_process: bool) {
        for (o, d) in self.orders.iter_mut().zip(&group.datasets) {
            o.set_current_epoch(epoch, d.seed, &mut self.rng, Some(&group.log), main_process);
        }
    }
}

/// One sample's pixel work, self-contained so it can run on any thread.
#[derive(Clone, Debug)]
struct PixelJob {
    path: PathBuf,
    npz: Option<PathBuf>,
    enable_bucket: bool,
    bucket: (usize, usize),
    resized: (usize, usize),
    offsets: (usize, usize),
    target: (usize, usize),
    interp: Option<String>,
    flipped: bool,
    color: ColorAug,
}

enum PixelOut {
    /// CHW f32 in [-1, 1]
    Image {
        w: usize,
        h: usize,
        chw: Vec<f32>,
    },
    Latents {
        shape: Vec<i64>,
        data: Vec<f32>,
    },
}

fn run_job(job: &PixelJob) -> Result<PixelOut> {
    if let Some(npz) = &job.npz {
        let (lat, flipped) = super::cache::load_npz_latents(npz)?;
        let pick = if job.flipped {
            flipped.ok_or_else(|| {
                anyhow!(
                    "{}: latents_flipped missing (flip_aug is on; delete the file to recache)",
                    npz.display()
                )
            })?
        } else {
            lat
        };
        return Ok(PixelOut::Latents {
            shape: pick.shape.iter().map(|&s| s as i64).collect(),
            data: pick.to_f32(),
        });
    }
    let img = load_image_rgb(&job.path)?;
    let mut img = if job.enable_bucket {
        trim_and_resize(
            &img,
            job.bucket,
            job.resized,
            job.offsets,
            job.interp.as_deref(),
        )?
    } else {
        let w = job.target.0.min(img.w);
        let h = job.target.1.min(img.h);
        let out = img.crop(job.offsets.0, job.offsets.1, w, h);
        if out.w != job.target.0 || out.h != job.target.1 {
            bail!(
                "image size is small / 画像サイズが小さいようです: {} ({}x{} for resolution {}x{}; enable bucketing or cache latents)",
                job.path.display(),
                img.w,
                img.h,
                job.target.0,
                job.target.1
            );
        }
        out
    };
    apply_color_aug(&mut img, job.color);
    if job.flipped {
        img = img.flip_horizontal();
    }
    Ok(PixelOut::Image {
        w: img.w,
        h: img.h,
        chw: img.to_chw_normalized(),
    })
}

type JobMsg = (usize, Vec<PixelJob>);
type ResultMsg = (usize, Vec<std::result::Result<PixelOut, String>>);

/// Background decoding threads (`--max_data_loader_n_workers`).
struct Pool {
    tx: Option<Sender<JobMsg>>,
    rx: Receiver<ResultMsg>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    fn new(n: usize) -> Self {
        let (tx, jrx) = channel::<JobMsg>();
        let (rtx, rx) = channel::<ResultMsg>();
        let jrx = Arc::new(Mutex::new(jrx));
        let mut handles = vec![];
        for _ in 0..n.max(1) {
            let jrx = Arc::clone(&jrx);
            let rtx = rtx.clone();
            handles.push(std::thread::spawn(move || loop {
                let msg = { jrx.lock().unwrap().recv() };
                let Ok((k, jobs)) = msg else { break };
                let out = jobs
                    .iter()
                    .map(|j| run_job(j).map_err(|e| format!("{e:#}")))
                    .collect();
                if rtx.send((k, out)).is_err() {
                    break;
                }
            }));
        }
        Pool {
            tx: Some(tx),
            rx,
            handles,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// sd-scripts' DataLoader over a [`DatasetGroup`].
pub struct Loader {
    /// DataLoader workers sd-scripts would use: min(--max_data_loader_n_workers, os.cpu_count()).
    pub n_workers: usize,
    pub persistent: bool,
    main: VirtualWorker,
    workers: Vec<VirtualWorker>,
    /// The group's log: its rich draws land on the main process's RNG.
    log: DataLog,
    pool: Pool,
    /// Batches planned and decoded ahead of the consumer.
    pub prefetch: usize,
    /// `current_step` as the trainer publishes it (token warmup reads it at fetch time).
    pub current_step: i64,
    pub max_train_steps: i64,
}

/// `min(max_data_loader_n_workers, os.cpu_count())`: how many DataLoader workers sd-scripts
/// starts (`train_network.py`), which decides which copy of the dataset fetches each batch.
pub fn effective_workers(max_data_loader_n_workers: i64) -> usize {
    (max_data_loader_n_workers.max(0) as usize).min(python_cpu_count())
}

/// What Python's `os.cpu_count()` returns on this machine: the number of *online* CPUs
/// (`sysconf(_SC_NPROCESSORS_ONLN)`), not the CPUs this process may run on. The two differ in
/// containers with a CPU quota and under `taskset`, where Rust's `available_parallelism` (affinity
/// and cgroup quota) is smaller; using it made sdlora start fewer virtual workers than sd-scripts
/// and visit the images in another order from the third batch on.
/// `SDLORA_CPU_COUNT` overrides it, to reproduce a run made on a machine with another CPU count.
pub fn python_cpu_count() -> usize {
    cpu_count_with(std::env::var("SDLORA_CPU_COUNT").ok().as_deref())
}

fn cpu_count_with(over: Option<&str>) -> usize {
    if let Some(n) = over.and_then(|v| v.trim().parse::<usize>().ok()) {
        if n > 0 {
            return n;
        }
    }
    // SAFETY: sysconf only reads system configuration.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        usable_cpus()
    }
}

/// CPUs this process may use (affinity, cgroup quota): how many decoding threads are worth it.
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl Loader {
    /// A loader replaying `n_workers` sd-scripts workers; decoding uses `threads` threads.
    pub fn new(group: &DatasetGroup, n_workers: usize, persistent: bool, threads: usize) -> Self {
        Loader {
            n_workers,
            persistent,
            main: VirtualWorker::fresh(group, group.main_rng.clone()),
            log: group.log.clone(),
            workers: vec![],
            pool: Pool::new(threads),
            prefetch: (2 * threads).max(2),
            current_step: 0,
            max_train_steps: 1600,
        }
    }

    /// As sd-scripts configures it from the group's arguments.
    pub fn from_args(group: &DatasetGroup) -> Self {
        let w = effective_workers(group.args.max_data_loader_n_workers);
        // sd-scripts may start more workers than there are usable cores (os.cpu_count() ignores
        // affinity and quotas); the replay keeps all of them, the decoding threads do not.
        let threads = w.min(usable_cpus()).max(1);
        Self::new(group, w, group.args.persistent_data_loader_workers, threads)
    }

    /// The main process's Python RNG (other main-process draws, e.g. multires noise, use it),
    /// after the draws rich owes it for the lines logged since it was last used.
    pub fn main_rng(&mut self) -> &mut PyRandom {
        self.log.settle(&mut self.main.rng);
        &mut self.main.rng
    }

    /// Starts epoch `epoch` (1-based, as sd-scripts' `current_epoch.value`): draws the two
    /// DataLoader seeds from `seeds` and returns the batches in order.
    pub fn epoch<'a>(
        &'a mut self,
        group: &'a DatasetGroup,
        epoch: i64,
        seeds: &mut dyn SeedSource,
        tokenizer: Option<&'a dyn TextTokenizer>,
    ) -> Result<EpochIter<'a>> {
        let need_base = self.n_workers == 0 || !self.persistent || self.workers.is_empty();
        if need_base {
            let base_seed = seeds.draw_i64();
            if self.n_workers > 0 {
                self.workers = (0..self.n_workers)
                    .map(|w| {
                        VirtualWorker::fresh(group, PyRandom::new(base_seed as i128 + w as i128))
                    })
                    .collect();
            }
        }
        let sampler_seed = seeds.draw_i64();
        let perm = TorchCpuGenerator::new(sampler_seed as u64).randperm(group.len());
        let max_length = max_length_for(group.args.max_token_length)?;
        Ok(EpochIter {
            loader: self,
            group,
            epoch,
            perm,
            next_plan: 0,
            next_out: 0,
            planned: BTreeMap::new(),
            parked: BTreeMap::new(),
            in_flight: 0,
            tokenizer,
            max_length,
        })
    }

    /// Plans (all random draws, no pixels) of a whole epoch: what sd-scripts would fetch.
    pub fn plan_epoch(
        &mut self,
        group: &DatasetGroup,
        epoch: i64,
        seeds: &mut dyn SeedSource,
    ) -> Result<Vec<BatchPlan>> {
        let mut it = self.epoch(group, epoch, seeds, None)?;
        let mut out = vec![];
        while it.next_plan < it.perm.len() {
            out.push(it.plan_next());
        }
        Ok(out)
    }
}

/// The samples of one training step, as sd-scripts' collate returns them.
pub struct Batch {
    pub dataset: usize,
    /// (B, 3, H, W) f32 in [-1, 1] when latents are not cached.
    pub images: Option<Tensor>,
    /// (B, 4, H/8, W/8), unscaled, in the cache's dtype (memory) or f32 (disk).
    pub latents: Option<Tensor>,
    pub captions: Vec<String>,
    /// (B, n, 77) i64 when a tokenizer was given.
    pub input_ids: Option<Tensor>,
    /// (B) f32: prior_loss_weight for reg images, else 1.
    pub loss_weights: Tensor,
    pub is_reg: Vec<bool>,
    pub image_keys: Vec<String>,
    pub paths: Vec<PathBuf>,
    pub flipped: Vec<bool>,
    pub original_sizes_hw: Vec<(i64, i64)>,
    pub crop_top_lefts: Vec<(i64, i64)>,
    pub target_sizes_hw: Vec<(i64, i64)>,
    pub network_multipliers: Vec<f64>,
    pub plan: BatchPlan,
}

pub struct EpochIter<'a> {
    loader: &'a mut Loader,
    group: &'a DatasetGroup,
    epoch: i64,
    perm: Vec<usize>,
    next_plan: usize,
    next_out: usize,
    planned: BTreeMap<usize, (BatchPlan, bool)>,
    parked: BTreeMap<usize, Vec<std::result::Result<PixelOut, String>>>,
    in_flight: usize,
    tokenizer: Option<&'a dyn TextTokenizer>,
    max_length: usize,
}

impl EpochIter<'_> {
    /// Batches in this epoch (`len(train_dataloader)`).
    pub fn len(&self) -> usize {
        self.perm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.perm.is_empty()
    }

    /// The sampler's permutation of group indices for this epoch.
    pub fn permutation(&self) -> &[usize] {
        &self.perm
    }

    fn plan_next(&mut self) -> BatchPlan {
        let k = self.next_plan;
        self.next_plan += 1;
        let gidx = self.perm[k];
        let (d, local) = self.group.locate(gidx);
        let n_workers = self.loader.n_workers;
        let (vw, worker) = if n_workers == 0 {
            (&mut self.loader.main, None)
        } else {
            (&mut self.loader.workers[k % n_workers], Some(k % n_workers))
        };
        let ds = &self.group.datasets[d];
        let order = &vw.orders[d];
        let images: Vec<usize> = order.batch_images(local).to_vec();
        let ctx = CaptionContext {
            current_epoch: order.current_epoch,
            current_step: self.loader.current_step,
            max_train_steps: self.loader.max_train_steps,
        };
        let cached = |i: usize| {
            self.group
                .latents
                .get(d)
                .and_then(|v| v.get(i))
                .is_some_and(|l| l.is_some())
                || ds.images[i].latents_npz.is_some()
        };
        if worker.is_none() {
            // the main process's global RNG: first the draws rich made for the lines since
            self.group.log.settle(&mut vw.rng);
        }
        let mut items = vec![];
        for &i in &images {
            items.push(plan_item(ds, i, cached(i), &ctx, &mut vw.rng));
        }
        vw.collate(self.group, self.epoch, worker.is_none());
        BatchPlan {
            step_in_epoch: k,
            group_index: gidx,
            dataset: d,
            worker,
            items,
        }
    }

    fn jobs_for(&self, plan: &BatchPlan) -> Vec<PixelJob> {
        let ds = &self.group.datasets[plan.dataset];
        plan.items
            .iter()
            .filter(|it| {
                self.group
                    .latents
                    .get(plan.dataset)
                    .and_then(|v| v.get(it.image))
                    .is_none_or(|l| l.is_none())
            })
            .map(|it| {
                let info = &ds.images[it.image];
                PixelJob {
                    path: info.absolute_path.clone(),
                    npz: info.latents_npz.clone(),
                    enable_bucket: ds.params.enable_bucket,
                    bucket: (info.bucket_reso.0 as usize, info.bucket_reso.1 as usize),
                    resized: (info.resized_size.0 as usize, info.resized_size.1 as usize),
                    offsets: it.offsets,
                    target: (ds.width as usize, ds.height as usize),
                    interp: info.resize_interpolation.clone(),
                    flipped: it.flipped,
                    color: it.color,
                }
            })
            .collect()
    }

    fn fill_prefetch(&mut self) {
        while self.next_plan < self.perm.len()
            && self.next_plan < self.next_out + self.loader.prefetch
        {
            let plan = self.plan_next();
            let jobs = self.jobs_for(&plan);
            let has_jobs = !jobs.is_empty();
            if has_jobs {
                if let Some(tx) = &self.loader.pool.tx {
                    if tx.send((plan.step_in_epoch, jobs)).is_ok() {
                        self.in_flight += 1;
                    }
                }
            }
            self.planned.insert(plan.step_in_epoch, (plan, has_jobs));
        }
    }

    fn assemble(&mut self, plan: BatchPlan, outs: Vec<PixelOut>) -> Result<Batch> {
        let g = self.group;
        let ds = &g.datasets[plan.dataset];
        let mut outs = outs.into_iter();
        let mut imgs = vec![];
        let mut lats = vec![];
        let mut b = Batch {
            dataset: plan.dataset,
            images: None,
            latents: None,
            captions: vec![],
            input_ids: None,
            loss_weights: Tensor::from_slice(
                &plan
                    .items
                    .iter()
                    .map(|i| i.loss_weight as f32)
                    .collect::<Vec<_>>(),
            ),
            is_reg: vec![],
            image_keys: vec![],
            paths: vec![],
            flipped: vec![],
            original_sizes_hw: vec![],
            crop_top_lefts: vec![],
            target_sizes_hw: vec![],
            network_multipliers: vec![],
            plan: plan.clone(),
        };
        for it in &plan.items {
            let info = &ds.images[it.image];
            let mem = g
                .latents
                .get(plan.dataset)
                .and_then(|v| v.get(it.image))
                .and_then(|l| l.as_ref());
            let (target, original, crop_lt) = if let Some(c) = mem {
                let t = if it.flipped {
                    c.flipped.as_ref().ok_or_else(|| {
                        anyhow!("internal: flipped latents missing for {}", info.image_key)
                    })?
                } else {
                    &c.latents
                };
                let sz = t.size();
                lats.push(t.shallow_clone());
                let target = (sz[2] * 8, sz[1] * 8);
                let lt = crop_left_top(target, c.crop_ltrb, it.flipped);
                (target, c.original_size, lt)
            } else {
                match outs
                    .next()
                    .ok_or_else(|| anyhow!("internal: missing decoded sample"))?
                {
                    PixelOut::Image { w, h, chw } => {
                        imgs.push(Tensor::from_slice(&chw).view([3, h as i64, w as i64]));
                        let target = (w as i64, h as i64);
                        let orig = info.image_size.unwrap_or((0, 0));
                        let ltrb = if ds.params.enable_bucket {
                            super::bucket::get_crop_ltrb(info.bucket_reso, orig)
                        } else {
                            [0.0; 4]
                        };
                        (target, orig, crop_left_top(target, ltrb, it.flipped))
                    }
                    PixelOut::Latents { shape, data } => {
                        let t = Tensor::from_slice(&data).view(shape.as_slice());
                        let target = (shape[2] * 8, shape[1] * 8);
                        lats.push(t);
                        let orig = info.image_size.unwrap_or((0, 0));
                        let ltrb = super::bucket::get_crop_ltrb(info.bucket_reso, orig);
                        (target, orig, crop_left_top(target, ltrb, it.flipped))
                    }
                }
            };
            b.captions.push(it.caption.clone());
            b.is_reg.push(info.is_reg);
            b.image_keys.push(info.image_key.clone());
            b.paths.push(info.absolute_path.clone());
            b.flipped.push(it.flipped);
            b.original_sizes_hw.push((original.1, original.0));
            b.crop_top_lefts.push((crop_lt.1, crop_lt.0));
            b.target_sizes_hw.push((target.1, target.0));
            b.network_multipliers.push(ds.params.network_multiplier);
        }
        if !imgs.is_empty() && !lats.is_empty() {
            bail!("internal: a batch mixes cached and uncached samples");
        }
        if !imgs.is_empty() {
            b.images = Some(Tensor::stack(&imgs, 0).contiguous());
        }
        if !lats.is_empty() {
            b.latents = Some(Tensor::stack(&lats, 0));
        }
        if let Some(tok) = self.tokenizer {
            let v2 = g.args.v2;
            let per: Vec<Vec<[i64; 77]>> = b
                .captions
                .iter()
                .map(|c| input_ids_windows(tok, c, self.max_length, v2))
                .collect();
            let n = per[0].len() as i64;
            let flat: Vec<i64> = per
                .iter()
                .flat_map(|w| w.iter().flat_map(|x| x.iter().copied()))
                .collect();
            b.input_ids = Some(Tensor::from_slice(&flat).view([per.len() as i64, n, 77]));
        }
        Ok(b)
    }
}

fn crop_left_top(target: (i64, i64), ltrb: [f64; 4], flipped: bool) -> (i64, i64) {
    if !flipped {
        (ltrb[0] as i64, ltrb[1] as i64)
    } else {
        ((target.0 as f64 - ltrb[2]) as i64, ltrb[1] as i64)
    }
}

/// The draws of `BaseDataset.__getitem__` for one sample, in order.
fn plan_item(
    ds: &Dataset,
    i: usize,
    cached: bool,
    ctx: &CaptionContext,
    rng: &mut PyRandom,
) -> ItemPlan {
    let info = &ds.images[i];
    let sp = ds.subset_of(i);
    let loss_weight = if info.is_reg {
        ds.params.prior_loss_weight
    } else {
        1.0
    };
    let flipped = sp.flip_aug && rng.random() < 0.5;
    let mut offsets = (0, 0);
    let mut color = ColorAug::None;
    if !cached {
        let (w, h) = info.image_size.unwrap_or((0, 0));
        if ds.params.enable_bucket {
            let resized = (info.resized_size.0 as usize, info.resized_size.1 as usize);
            let bucket = (info.bucket_reso.0 as usize, info.bucket_reso.1 as usize);
            offsets = trim_offsets(resized, bucket, sp.random_crop, &mut |a, b| {
                rng.randint(a, b)
            });
        } else {
            // no resize: crop height first, then width, only when larger (random_crop required)
            let (tw, th) = (ds.width, ds.height);
            let mut top = 0;
            let mut left = 0;
            if (h > th || w > tw) && sp.random_crop {
                if h > th {
                    top = rng.randint(0, h - th) as usize;
                }
                if w > tw {
                    left = rng.randint(0, w - tw) as usize;
                }
            }
            offsets = (left, top);
        }
        if sp.color_aug {
            color = draw_color_aug(rng);
        }
    }
    let caption = process_caption(sp, &info.caption, ctx, rng);
    ItemPlan {
        image: i,
        loss_weight,
        flipped,
        offsets,
        color,
        caption,
    }
}

impl Iterator for EpochIter<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next_out >= self.perm.len() {
            return None;
        }
        self.fill_prefetch();
        let k = self.next_out;
        self.next_out += 1;
        let (plan, has_jobs) = self.planned.remove(&k)?;
        let outs = if has_jobs {
            // results arrive out of order; park the others
            loop {
                if let Some(r) = self.parked.remove(&k) {
                    break r;
                }
                match self.loader.pool.rx.recv() {
                    Ok((kk, r)) => {
                        self.in_flight -= 1;
                        self.parked.insert(kk, r);
                    }
                    Err(_) => return Some(Err(anyhow!("image loading threads stopped"))),
                }
            }
        } else {
            vec![]
        };
        let mut ok = vec![];
        for r in outs {
            match r {
                Ok(o) => ok.push(o),
                Err(e) => return Some(Err(anyhow!(e))),
            }
        }
        Some(self.assemble(plan, ok))
    }
}

impl Drop for EpochIter<'_> {
    fn drop(&mut self) {
        // drain jobs still in flight so the next epoch does not receive them
        for _ in 0..self.in_flight {
            if self.loader.pool.rx.recv().is_err() {
                break;
            }
        }
    }
}

/// Decodes every image once before training, so a corrupt or unreadable file is reported with
/// its path now rather than at step 3000. Also checks the sizes the no-bucketing path requires.
pub fn verify_images(group: &DatasetGroup, progress: bool) -> Result<()> {
    let cached = group.args.cache_latents || group.args.cache_latents_to_disk;
    let mut paths: Vec<PathBuf> = vec![];
    for ds in &group.datasets {
        for info in &ds.images {
            paths.push(info.absolute_path.clone());
            if !ds.params.enable_bucket && !cached {
                let (w, h) = info.image_size.unwrap_or((0, 0));
                let sp = ds.subset_of(0);
                let _ = sp;
                let rc = ds.subsets[info.subset].params.random_crop;
                if (w > ds.width || h > ds.height) && !rc {
                    bail!("image too large, but cropping and bucketing are disabled / 画像サイズが大きいのでface_crop_aug_rangeかrandom_crop、またはbucketを有効にしてください: {} is {w}x{h}, resolution is {}x{}; enable_bucket, random_crop or --cache_latents", info.absolute_path.display(), ds.width, ds.height);
                }
                if w < ds.width || h < ds.height {
                    bail!("image size is small / 画像サイズが小さいようです: {} is {w}x{h}, resolution is {}x{}; enable_bucket or --cache_latents (which resize), or resize the image", info.absolute_path.display(), ds.width, ds.height);
                }
            }
        }
    }
    paths.sort();
    paths.dedup();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let pb = super::dataset::progress_bar(progress, paths.len() as u64, "checking images");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_err: Mutex<Option<(usize, String)>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= paths.len() {
                    break;
                }
                if let Err(e) = super::image::check_image(&paths[i]) {
                    let mut fe = first_err.lock().unwrap();
                    if fe.as_ref().is_none_or(|(j, _)| i < *j) {
                        *fe = Some((i, format!("{e:#}")));
                    }
                }
                pb.inc(1);
            });
        }
    });
    pb.finish_and_clear();
    if let Some((_, e)) = first_err.into_inner().unwrap() {
        bail!("{e}");
    }
    Ok(())
}

/// Image indices of each batch of an epoch as (dataset, image keys) — the visiting order.
pub fn visiting_order(group: &DatasetGroup, plans: &[BatchPlan]) -> Vec<(usize, Vec<String>)> {
    plans
        .iter()
        .map(|p| {
            (
                p.dataset,
                p.items
                    .iter()
                    .map(|i| group.datasets[p.dataset].images[i.image].image_key.clone())
                    .collect(),
            )
        })
        .collect()
}

/// Pixels of one sample exactly as the loader produces them (for tests and debugging).
pub fn load_sample_pixels(group: &DatasetGroup, dataset: usize, item: &ItemPlan) -> Result<Image8> {
    let ds = &group.datasets[dataset];
    let info = &ds.images[item.image];
    let img = load_image_rgb(&info.absolute_path)?;
    let mut img = if ds.params.enable_bucket {
        trim_and_resize(
            &img,
            (info.bucket_reso.0 as usize, info.bucket_reso.1 as usize),
            (info.resized_size.0 as usize, info.resized_size.1 as usize),
            item.offsets,
            info.resize_interpolation.as_deref(),
        )?
    } else {
        img.crop(
            item.offsets.0,
            item.offsets.1,
            ds.width as usize,
            ds.height as usize,
        )
    };
    apply_color_aug(&mut img, item.color);
    if item.flipped {
        img = img.flip_horizontal();
    }
    Ok(img)
}

impl EpochIter<'_> {
    /// The main process's Python RNG while an epoch runs (multires noise draws from it).
    pub fn main_rng(&mut self) -> &mut PyRandom {
        self.loader.main_rng()
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_count_with;

    #[test]
    fn cpu_count_override() {
        let online = cpu_count_with(None);
        assert!(online >= 1);
        assert_eq!(cpu_count_with(Some("16")), 16);
        assert_eq!(cpu_count_with(Some(" 3 ")), 3);
        // unusable values fall back to the machine's count
        assert_eq!(cpu_count_with(Some("0")), online);
        assert_eq!(cpu_count_with(Some("many")), online);
    }
}
