//! Aspect-ratio buckets as sd-scripts builds and assigns them.
//! spec: sdscripts_cli_data.md §3.5 (`MU:make_bucket_resolutions`, `TU:BucketManager`).
use std::collections::{BTreeSet, HashMap};

pub type Reso = (i64, i64);

/// Predefined bucket list for `max_reso` (W, H), sorted as (w, h) tuples.
pub fn make_bucket_resolutions(
    max_reso: Reso,
    min_size: i64,
    max_size: i64,
    divisible: i64,
) -> Vec<Reso> {
    let (mw, mh) = max_reso;
    let max_area = mw * mh;
    let mut set = BTreeSet::new();
    // int(math.sqrt(area) // d) * d, with a float sqrt as Python does
    let w = ((max_area as f64).sqrt() / divisible as f64).floor() as i64 * divisible;
    set.insert((w, w));
    let mut width = min_size;
    while width <= max_size {
        let height = max_size.min((max_area / width) / divisible * divisible);
        if height >= min_size {
            set.insert((width, height));
            set.insert((height, width));
        }
        width += divisible;
    }
    set.into_iter().collect()
}

/// Result of assigning one image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assignment {
    pub bucket_reso: Reso,
    pub resized_size: Reso,
    pub ar_error: f64,
}

/// `TU:BucketManager`: the predefined list (or none with `bucket_no_upscale`), the buckets in use
/// and their image keys.
#[derive(Clone, Debug)]
pub struct BucketManager {
    pub no_upscale: bool,
    pub max_area: i64,
    pub reso_steps: i64,
    predefined: Vec<Reso>,
    predefined_ar: Vec<f64>,
    pub resos: Vec<Reso>,
    reso_to_id: HashMap<Reso, usize>,
    /// Indices into the dataset's image list, one entry per repeat.
    pub buckets: Vec<Vec<usize>>,
}

impl BucketManager {
    pub fn new(no_upscale: bool, max_reso: Reso, reso_steps: i64) -> Self {
        BucketManager {
            no_upscale,
            max_area: max_reso.0 * max_reso.1,
            reso_steps,
            predefined: vec![],
            predefined_ar: vec![],
            resos: vec![],
            reso_to_id: HashMap::new(),
            buckets: vec![],
        }
    }

    pub fn set_predefined_resos(&mut self, resos: Vec<Reso>) {
        self.predefined_ar = resos.iter().map(|&(w, h)| w as f64 / h as f64).collect();
        self.predefined = resos;
    }

    pub fn predefined_resos(&self) -> &[Reso] {
        &self.predefined
    }

    fn add_if_new_reso(&mut self, reso: Reso) {
        if !self.reso_to_id.contains_key(&reso) {
            self.reso_to_id.insert(reso, self.resos.len());
            self.resos.push(reso);
            self.buckets.push(vec![]);
        }
    }

    fn round_to_steps(&self, x: f64) -> i64 {
        let x = (x + 0.5) as i64;
        x - x % self.reso_steps
    }

    /// `select_bucket(w, h)`.
    pub fn select_bucket(&mut self, w: i64, h: i64) -> Assignment {
        let ar = w as f64 / h as f64;
        let (reso, resized) = if !self.no_upscale {
            let mut reso = (w, h);
            if !self.predefined.contains(&reso) {
                // np.argmin: the first minimum
                let mut best = 0;
                let mut best_err = f64::INFINITY;
                for (i, bar) in self.predefined_ar.iter().enumerate() {
                    let e = (bar - ar).abs();
                    if e < best_err {
                        best_err = e;
                        best = i;
                    }
                }
                reso = self.predefined[best];
            }
            let ar_reso = reso.0 as f64 / reso.1 as f64;
            let scale = if ar > ar_reso {
                reso.1 as f64 / h as f64
            } else {
                reso.0 as f64 / w as f64
            };
            let resized = (
                (w as f64 * scale + 0.5) as i64,
                (h as f64 * scale + 0.5) as i64,
            );
            (reso, resized)
        } else {
            let resized = if w * h > self.max_area {
                let rw = (self.max_area as f64 * ar).sqrt();
                let rh = self.max_area as f64 / rw;
                let bw1 = self.round_to_steps(rw);
                let bh1 = self.round_to_steps(bw1 as f64 / ar);
                let ar1 = bw1 as f64 / bh1 as f64;
                let bh2 = self.round_to_steps(rh);
                let bw2 = self.round_to_steps(bh2 as f64 * ar);
                let ar2 = bw2 as f64 / bh2 as f64;
                if (ar1 - ar).abs() < (ar2 - ar).abs() {
                    (bw1, (bw1 as f64 / ar + 0.5) as i64)
                } else {
                    ((bh2 as f64 * ar + 0.5) as i64, bh2)
                }
            } else {
                (w, h)
            };
            let reso = (
                resized.0 - resized.0 % self.reso_steps,
                resized.1 - resized.1 % self.reso_steps,
            );
            (reso, resized)
        };
        self.add_if_new_reso(reso);
        Assignment {
            bucket_reso: reso,
            resized_size: resized,
            ar_error: reso.0 as f64 / reso.1 as f64 - ar,
        }
    }

    /// `sort()`: buckets ordered by resolution.
    pub fn sort(&mut self) {
        let mut order: Vec<usize> = (0..self.resos.len()).collect();
        order.sort_by_key(|&i| self.resos[i]);
        let resos: Vec<Reso> = order.iter().map(|&i| self.resos[i]).collect();
        let buckets: Vec<Vec<usize>> = order
            .iter()
            .map(|&i| std::mem::take(&mut self.buckets[i]))
            .collect();
        self.reso_to_id = resos.iter().enumerate().map(|(i, r)| (*r, i)).collect();
        self.resos = resos;
        self.buckets = buckets;
    }

    pub fn add_image(&mut self, reso: Reso, image: usize) {
        let id = self.reso_to_id[&reso];
        self.buckets[id].push(image);
    }
}

/// `BucketManager.get_crop_ltrb` (float values; kept for the latent cache's `crop_ltrb` key).
pub fn get_crop_ltrb(bucket_reso: Reso, image_size: Reso) -> [f64; 4] {
    let bucket_ar = bucket_reso.0 as f64 / bucket_reso.1 as f64;
    let image_ar = image_size.0 as f64 / image_size.1 as f64;
    let (rw, rh) = if bucket_ar > image_ar {
        (bucket_reso.1 as f64 * image_ar, bucket_reso.1 as f64)
    } else {
        (bucket_reso.0 as f64, bucket_reso.0 as f64 / image_ar)
    };
    let l = ((bucket_reso.0 as f64 - rw) / 2.0).floor();
    let t = ((bucket_reso.1 as f64 - rh) / 2.0).floor();
    [l, t, l + rw, t + rh]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_512() {
        // spec §3.5 lists the 17 buckets for 512x512, 256..1024, step 64
        let b = make_bucket_resolutions((512, 512), 256, 1024, 64);
        assert_eq!(b.len(), 17);
        assert_eq!(b[0], (256, 832));
        assert_eq!(b[8], (512, 512));
        assert_eq!(b[16], (1024, 256));
    }
}
