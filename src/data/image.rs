//! Image files: listing, captions, decoding to RGB, resizing (OpenCV INTER_AREA / PIL LANCZOS and
//! BOX), trimming, flipping, colour augmentation and normalisation, as sd-scripts does them.
//! spec: sdscripts_cli_data.md §3.1, §3.2, §3.8–§3.10.
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// `TU:IMAGE_EXTENSIONS`, in sd-scripts' order (matching is case-sensitive, like glob on Linux).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP",
];

/// `TU:glob_images(dir, "*")`: non-hidden files with a listed extension, sorted as Python sorts
/// the joined path strings.
pub fn glob_images(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // glob's "*" does not match a leading dot
        if name.starts_with('.') {
            continue;
        }
        if !IMAGE_EXTENSIONS.iter().any(|ext| name.ends_with(ext)) {
            continue;
        }
        // glob matches names, so a directory called "x.png" is listed too; sd-scripts would then
        // fail to open it, we report it at validation.
        out.push(join_py(dir, &name));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `os.path.join(dir, name)` as a string (keeps the user's spelling of `dir`).
pub fn join_py(dir: &Path, name: &str) -> String {
    let d = dir.to_string_lossy();
    if d.is_empty() {
        name.to_string()
    } else if d.ends_with('/') {
        format!("{d}{name}")
    } else {
        format!("{d}/{name}")
    }
}

/// `os.path.splitext(path)[0]`.
pub fn splitext_stem(path: &str) -> &str {
    let base_start = path.rfind('/').map(|i| i + 1).unwrap_or(0);
    let base = &path[base_start..];
    // leading dots of the base name are not an extension
    let lead = base.len() - base.trim_start_matches('.').len();
    match base[lead..].rfind('.') {
        Some(i) => &path[..base_start + lead + i],
        None => path,
    }
}

/// `read_caption`: `<stem><ext>`, then the face-crop name without its last four `_` fields.
/// Returns Ok(None) when no caption file exists.
pub fn read_caption(
    img_path: &str,
    caption_extension: &str,
    enable_wildcard: bool,
) -> Result<Option<String>> {
    let base = splitext_stem(img_path);
    let tokens: Vec<&str> = base.split('_').collect();
    let base_face = if tokens.len() >= 5 {
        tokens[..tokens.len() - 4].join("_")
    } else {
        base.to_string()
    };
    for cand in [
        format!("{base}{caption_extension}"),
        format!("{base_face}{caption_extension}"),
    ] {
        let p = Path::new(&cand);
        if !p.is_file() {
            continue;
        }
        let bytes = std::fs::read(p).with_context(|| format!("reading caption file {cand}"))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow!(
                "illegal char in file (not UTF-8) / ファイルにUTF-8以外の文字があります: {cand}"
            )
        })?;
        // Python's readlines() in text mode splits on \n, \r and \r\n (universal newlines).
        let lines = py_lines(&text);
        if lines.is_empty() {
            bail!("caption file is empty / キャプションファイルが空です: {cand}");
        }
        let caption = if enable_wildcard {
            lines
                .iter()
                .map(|l| py_strip(l))
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            py_strip(lines[0]).to_string()
        };
        return Ok(Some(caption));
    }
    Ok(None)
}

fn py_lines(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\n' || b[i] == b'\r' {
            let end = if b[i] == b'\r' && i + 1 < b.len() && b[i + 1] == b'\n' {
                i + 2
            } else {
                i + 1
            };
            out.push(&text[start..end]);
            start = end;
            i = end;
        } else {
            i += 1;
        }
    }
    if start < b.len() {
        out.push(&text[start..]);
    }
    out
}

/// Python's `str.strip()` (Unicode whitespace; a BOM is not whitespace and stays).
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// An 8-bit image, rows of `w * c` bytes, RGB (c = 3) unless noted.
#[derive(Clone, Debug, PartialEq)]
pub struct Image8 {
    pub w: usize,
    pub h: usize,
    pub c: usize,
    pub data: Vec<u8>,
}

impl Image8 {
    pub fn new(w: usize, h: usize, c: usize) -> Self {
        Image8 {
            w,
            h,
            c,
            data: vec![0; w * h * c],
        }
    }

    /// Rows `top..top+h` and columns `left..left+w`.
    pub fn crop(&self, left: usize, top: usize, w: usize, h: usize) -> Image8 {
        assert!(
            left + w <= self.w && top + h <= self.h,
            "crop outside the image"
        );
        let mut out = Image8::new(w, h, self.c);
        for y in 0..h {
            let src = ((top + y) * self.w + left) * self.c;
            let dst = y * w * self.c;
            out.data[dst..dst + w * self.c].copy_from_slice(&self.data[src..src + w * self.c]);
        }
        out
    }

    /// `img[:, ::-1]`.
    pub fn flip_horizontal(&self) -> Image8 {
        let mut out = Image8::new(self.w, self.h, self.c);
        for y in 0..self.h {
            for x in 0..self.w {
                let s = (y * self.w + x) * self.c;
                let d = (y * self.w + (self.w - 1 - x)) * self.c;
                out.data[d..d + self.c].copy_from_slice(&self.data[s..s + self.c]);
            }
        }
        out
    }

    /// `ToTensor` + `Normalize([0.5], [0.5])`: CHW f32 in [-1, 1].
    pub fn to_chw_normalized(&self) -> Vec<f32> {
        let (w, h, c) = (self.w, self.h, self.c);
        let plane = w * h;
        let mut out = vec![0f32; 3 * plane];
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in self.data.chunks_exact(c).enumerate() {
            // same float ops as ToTensor (v / 255) then Normalize ((x - 0.5) / 0.5)
            r[i] = (px[0] as f32 / 255.0 - 0.5) / 0.5;
            g[i] = (px[1] as f32 / 255.0 - 0.5) / 0.5;
            b[i] = (px[2] as f32 / 255.0 - 0.5) / 0.5;
        }
        out
    }
}

/// Reads width and height from the file header (as `imagesize.get`), failing with the path.
pub fn image_size(path: &Path) -> Result<(i64, i64)> {
    let r = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let (w, h) = r.into_dimensions().map_err(|e| {
        anyhow!(
            "cannot read the size of image {}: {e} (is the file an image and complete?)",
            path.display()
        )
    })?;
    if w == 0 || h == 0 {
        bail!("image {} has zero width or height", path.display());
    }
    Ok((w as i64, h as i64))
}

/// `TU:load_image(path, alpha=False)`: decode by content (not extension) and convert to RGB;
/// alpha is dropped without compositing, greyscale replicated, palette expanded. JPEG goes
/// through libjpeg-turbo's decoder (as PIL's does) so pixels are identical.
pub fn load_image_rgb(path: &Path) -> Result<Image8> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        // libjpeg only warns on truncated data; every file already passed `check_image`
        // (a full decode by the `image` crate) before training.
        if let Some(img) = decode_jpeg_libjpeg(&bytes) {
            return Ok(img);
        }
    }
    decode_generic(&bytes, path)
}

/// Full decode with the `image` crate: also the corruption check every file goes through.
pub fn check_image(path: &Path) -> Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_generic(&bytes, path).map(|_| ())
}

fn decode_generic(bytes: &[u8], path: &Path) -> Result<Image8> {
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .map_err(|e| {
            anyhow!(
                "cannot decode image {}: {e} (corrupt or truncated file? re-export it or remove it from the folder)",
                path.display()
            )
        })?;
    let rgb = match img {
        // 16-bit greyscale: PIL opens it as mode I;16 and converting to RGB clips at 255;
        // 16-bit colour: PIL keeps the high byte. image's to_rgb8 rounds value/257 (≤ 1 off).
        image::DynamicImage::ImageLuma16(ref g) => {
            let mut out = Image8::new(g.width() as usize, g.height() as usize, 3);
            for (i, p) in g.pixels().enumerate() {
                let v = p.0[0].min(255) as u8;
                out.data[i * 3..i * 3 + 3].copy_from_slice(&[v, v, v]);
            }
            return Ok(out);
        }
        other => other.to_rgb8(),
    };
    Ok(Image8 {
        w: rgb.width() as usize,
        h: rgb.height() as usize,
        c: 3,
        data: rgb.into_raw(),
    })
}

/// libjpeg(-turbo) decode to RGB with its defaults (islow IDCT, fancy upsampling), as PIL.
/// None for anything it cannot do (e.g. CMYK); the caller then keeps the generic decode.
fn decode_jpeg_libjpeg(bytes: &[u8]) -> Option<Image8> {
    std::panic::catch_unwind(|| -> Option<Image8> {
        let d = mozjpeg::Decompress::new_mem(bytes).ok()?;
        if !matches!(
            d.color_space(),
            mozjpeg::ColorSpace::JCS_YCbCr
                | mozjpeg::ColorSpace::JCS_GRAYSCALE
                | mozjpeg::ColorSpace::JCS_RGB
        ) {
            return None;
        }
        let mut s = d.rgb().ok()?;
        let (w, h) = (s.width(), s.height());
        let data: Vec<u8> = s.read_scanlines::<u8>().ok()?;
        s.finish().ok()?;
        (data.len() == w * h * 3).then_some(Image8 { w, h, c: 3, data })
    })
    .ok()
    .flatten()
}

/// The interpolation sd-scripts resolves for a resize (`UT:resize_image`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interp {
    /// OpenCV INTER_AREA
    Area,
    /// PIL LANCZOS
    Lanczos,
    /// PIL BOX
    Box,
}

/// `UT:resize_image`: INTER_AREA when neither side grows, else PIL LANCZOS; or the named method.
pub fn resize_image(
    img: &Image8,
    new_w: usize,
    new_h: usize,
    interpolation: Option<&str>,
) -> Result<Image8> {
    let interp = match interpolation {
        None => {
            if img.w >= new_w && img.h >= new_h {
                Interp::Area
            } else {
                Interp::Lanczos
            }
        }
        Some("lanczos") | Some("lanczos4") => Interp::Lanczos,
        Some("box") => Interp::Box,
        Some("area") => Interp::Area,
        Some(other) => bail!(
            "resize_interpolation `{other}` is not supported by sdlora yet (supported: lanczos, box, area, or unset)"
        ),
    };
    Ok(match interp {
        Interp::Area => {
            if img.w < new_w || img.h < new_h {
                // OpenCV's INTER_AREA falls back to bilinear when enlarging; not implemented.
                bail!("resize_interpolation `area` when enlarging is not supported by sdlora yet");
            }
            resize_area(img, new_w, new_h)
        }
        Interp::Lanczos => resize_pil(img, new_w, new_h, PilFilter::Lanczos),
        Interp::Box => resize_pil(img, new_w, new_h, PilFilter::Box),
    })
}

/// OpenCV `cv::resize(..., INTER_AREA)` for 8-bit images when shrinking (both scales ≥ 1).
pub fn resize_area(img: &Image8, dw: usize, dh: usize) -> Image8 {
    let (sw, sh, c) = (img.w, img.h, img.c);
    if sw == dw && sh == dh {
        return img.clone();
    }
    let scale_x = sw as f64 / dw as f64;
    let scale_y = sh as f64 / dh as f64;
    let ix = scale_x.round() as usize;
    let iy = scale_y.round() as usize;
    let mut out = Image8::new(dw, dh, c);
    if (scale_x - ix as f64).abs() < f64::EPSILON && (scale_y - iy as f64).abs() < f64::EPSILON {
        // resizeAreaFast: integer block average. The 2x2 SIMD path rounds (sum + 2) >> 2; the
        // generic path multiplies by a float 1/area and rounds half to even.
        let area = ix * iy;
        let inv = 1.0f32 / area as f32;
        for y in 0..dh {
            for x in 0..dw {
                for ch in 0..c {
                    let mut sum: u32 = 0;
                    for yy in 0..iy {
                        for xx in 0..ix {
                            sum += img.data[((y * iy + yy) * sw + x * ix + xx) * c + ch] as u32;
                        }
                    }
                    let v = if ix == 2 && iy == 2 {
                        (sum + 2) >> 2
                    } else {
                        (sum as f32 * inv).round_ties_even().clamp(0.0, 255.0) as u32
                    };
                    out.data[(y * dw + x) * c + ch] = v as u8;
                }
            }
        }
        return out;
    }
    let xtab = area_tab(sw, dw, scale_x);
    let ytab = area_tab(sh, dh, scale_y);
    let mut buf = vec![0f32; dw * c];
    let mut sum = vec![0f32; dw * c];
    let mut prev_dy: Option<usize> = None;
    let flush = |dy: usize, sum: &mut [f32], out: &mut Image8| {
        for (i, s) in sum.iter().enumerate() {
            out.data[dy * dw * c + i] = s.round_ties_even().clamp(0.0, 255.0) as u8;
        }
    };
    for &(dy, sy, beta) in &ytab {
        buf.iter_mut().for_each(|b| *b = 0.0);
        let row = &img.data[sy * sw * c..(sy + 1) * sw * c];
        for &(dx, sx, alpha) in &xtab {
            for ch in 0..c {
                buf[dx * c + ch] += row[sx * c + ch] as f32 * alpha;
            }
        }
        if prev_dy != Some(dy) {
            if let Some(p) = prev_dy {
                flush(p, &mut sum, &mut out);
            }
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s = beta * b;
            }
            prev_dy = Some(dy);
        } else {
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s += beta * b;
            }
        }
    }
    if let Some(p) = prev_dy {
        flush(p, &mut sum, &mut out);
    }
    out
}

/// OpenCV `computeResizeAreaTab`: (dst, src, weight) triples.
fn area_tab(ssize: usize, dsize: usize, scale: f64) -> Vec<(usize, usize, f32)> {
    let mut tab = Vec::new();
    for dx in 0..dsize {
        let fsx1 = dx as f64 * scale;
        let fsx2 = fsx1 + scale;
        let cell = scale.min(ssize as f64 - fsx1);
        let mut sx2 = fsx2.floor() as i64;
        let mut sx1 = fsx1.ceil() as i64;
        sx2 = sx2.min(ssize as i64 - 1);
        sx1 = sx1.min(sx2);
        if sx1 as f64 - fsx1 > 1e-3 {
            tab.push((dx, (sx1 - 1) as usize, ((sx1 as f64 - fsx1) / cell) as f32));
        }
        for sx in sx1..sx2 {
            tab.push((dx, sx as usize, (1.0 / cell) as f32));
        }
        if fsx2 - sx2 as f64 > 1e-3 {
            tab.push((
                dx,
                sx2 as usize,
                ((fsx2 - sx2 as f64).min(1.0).min(cell) / cell) as f32,
            ));
        }
    }
    tab
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PilFilter {
    Lanczos,
    Box,
}

impl PilFilter {
    fn support(self) -> f64 {
        match self {
            PilFilter::Lanczos => 3.0,
            PilFilter::Box => 0.5,
        }
    }
    fn eval(self, x: f64) -> f64 {
        match self {
            PilFilter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            PilFilter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel (first source index,
/// fixed-point weights).
fn pil_coeffs(in_size: usize, out_size: usize, filter: PilFilter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let mut out = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n)
            .map(|x| filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|v| *v /= ww);
        }
        let fixed = k
            .iter()
            .map(|&v| {
                let s = v * (1u32 << PRECISION_BITS) as f64;
                if v < 0.0 {
                    (s - 0.5) as i32
                } else {
                    (s + 0.5) as i32
                }
            })
            .collect();
        out.push((xmin, fixed));
    }
    out
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize(size, resample)` for 8-bit RGB: horizontal pass then vertical, each
/// rounded to 8 bits in between, exactly as Pillow's Resample.c.
pub fn resize_pil(img: &Image8, dw: usize, dh: usize, filter: PilFilter) -> Image8 {
    if img.w == dw && img.h == dh {
        return img.clone();
    }
    let c = img.c;
    let mut cur = img.clone();
    if dw != cur.w {
        let coeffs = pil_coeffs(cur.w, dw, filter);
        let mut out = Image8::new(dw, cur.h, c);
        let sw = cur.w;
        for (src_row, dst_row) in cur
            .data
            .chunks_exact(sw * c)
            .zip(out.data.chunks_exact_mut(dw * c))
        {
            for (x, (xmin, k)) in coeffs.iter().enumerate() {
                let src = &src_row[xmin * c..(xmin + k.len()) * c];
                let mut acc = [1i64 << (PRECISION_BITS - 1); 4];
                for (px, &kv) in src.chunks_exact(c).zip(k) {
                    for ch in 0..c {
                        acc[ch] += px[ch] as i64 * kv as i64;
                    }
                }
                for ch in 0..c {
                    dst_row[x * c + ch] = clip8(acc[ch]);
                }
            }
        }
        cur = out;
    }
    if dh != cur.h {
        let coeffs = pil_coeffs(cur.h, dh, filter);
        let rowlen = cur.w * c;
        let mut out = Image8::new(cur.w, dh, c);
        let mut acc = vec![0i64; rowlen];
        for (y, (ymin, k)) in coeffs.iter().enumerate() {
            acc.iter_mut()
                .for_each(|a| *a = 1i64 << (PRECISION_BITS - 1));
            for (i, &kv) in k.iter().enumerate() {
                let row = &cur.data[(ymin + i) * rowlen..(ymin + i + 1) * rowlen];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v as i64 * kv as i64;
                }
            }
            for (d, a) in out.data[y * rowlen..(y + 1) * rowlen].iter_mut().zip(&acc) {
                *d = clip8(*a);
            }
        }
        cur = out;
    }
    cur
}

/// Offsets of `trim_and_resize_if_required` after the resize: (left, top).
/// `rand` is called for the width trim first, then the height trim (random_crop only).
pub fn trim_offsets(
    resized: (usize, usize),
    bucket: (usize, usize),
    random_crop: bool,
    rand: &mut dyn FnMut(i64, i64) -> i64,
) -> (usize, usize) {
    let mut left = 0;
    let mut top = 0;
    if resized.0 > bucket.0 {
        let t = resized.0 - bucket.0;
        left = if random_crop {
            rand(0, t as i64) as usize
        } else {
            t / 2
        };
    }
    if resized.1 > bucket.1 {
        let t = resized.1 - bucket.1;
        top = if random_crop {
            rand(0, t as i64) as usize
        } else {
            t / 2
        };
    }
    (left, top)
}

/// `TU:trim_and_resize_if_required` with pre-drawn offsets.
pub fn trim_and_resize(
    img: &Image8,
    bucket: (usize, usize),
    resized: (usize, usize),
    offsets: (usize, usize),
    interpolation: Option<&str>,
) -> Result<Image8> {
    let img = if img.w != resized.0 || img.h != resized.1 {
        resize_image(img, resized.0, resized.1, interpolation)?
    } else {
        img.clone()
    };
    let w = img.w.min(bucket.0);
    let h = img.h.min(bucket.1);
    let out = img.crop(offsets.0, offsets.1, w, h);
    if out.w != bucket.0 || out.h != bucket.1 {
        bail!(
            "internal error, illegal trimmed size: {}x{} for bucket {}x{}",
            out.w,
            out.h,
            bucket.0,
            bucket.1
        );
    }
    Ok(out)
}

/// What `AugHelper.color_aug` decided for one access (drawn from the Python RNG in order).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ColorAug {
    None,
    /// hue shift already mapped into [0, 180)
    Hue(f64),
    Gamma(f64),
}

/// Draws `AugHelper.color_aug`'s random numbers in sd-scripts' order.
pub fn draw_color_aug(rng: &mut super::pyrandom::PyRandom) -> ColorAug {
    if rng.random() <= 0.33 {
        if rng.random() > 0.5 {
            let mut shift = rng.uniform(-8.0, 8.0);
            if shift < 0.0 {
                shift += 180.0;
            }
            ColorAug::Hue(shift)
        } else {
            ColorAug::Gamma(rng.uniform(0.95, 1.05))
        }
    } else {
        ColorAug::None
    }
}

/// Applies a drawn colour augmentation to an RGB image. sd-scripts hands the RGB array to
/// OpenCV as if it were BGR; the channel roles below follow that.
pub fn apply_color_aug(img: &mut Image8, aug: ColorAug) {
    match aug {
        ColorAug::None => {}
        ColorAug::Gamma(g) => {
            for v in img.data.iter_mut() {
                // numpy: uint8 ** float -> float64, clip, astype(uint8) truncates
                *v = (*v as f64).powf(g).clamp(0.0, 255.0) as u8;
            }
        }
        ColorAug::Hue(shift) => {
            let c = img.c;
            for px in img.data.chunks_mut(c) {
                let (h, s, v) = cv_bgr2hsv(px[0], px[1], px[2]);
                let h2 = ((h as f64 + shift) % 180.0) as u8;
                let (b, g, r) = cv_hsv2bgr(h2, s, v);
                px[0] = b;
                px[1] = g;
                px[2] = r;
            }
        }
    }
}

const HSV_SHIFT: i32 = 12;

/// OpenCV `RGB2HSV_b` (8-bit, hue range 180) with table divisions.
fn cv_bgr2hsv(b: u8, g: u8, r: u8) -> (u8, u8, u8) {
    let (b, g, r) = (b as i32, g as i32, r as i32);
    let v = b.max(g).max(r);
    let vmin = b.min(g).min(r);
    let diff = v - vmin;
    let vr = if v == r { -1 } else { 0 };
    let vg = if v == g { -1 } else { 0 };
    let sdiv = if v == 0 {
        0
    } else {
        ((255 << HSV_SHIFT) as f64 / v as f64).round_ties_even() as i32
    };
    let hdiv = if diff == 0 {
        0
    } else {
        ((180 << HSV_SHIFT) as f64 / (6.0 * diff as f64)).round_ties_even() as i32
    };
    let s = (diff * sdiv + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT;
    let mut h = (vr & (g - b)) + (!vr & ((vg & (b - r + 2 * diff)) + (!vg & (r - g + 4 * diff))));
    h = (h * hdiv + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT;
    if h < 0 {
        h += 180;
    }
    (h as u8, s as u8, v as u8)
}

/// OpenCV `HSV2RGB_b` (float path, hue range 180).
fn cv_hsv2bgr(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    let mut hf = h as f32 * (6.0f32 / 180.0);
    let sf = s as f32 * (1.0f32 / 255.0);
    let vf = v as f32 * (1.0f32 / 255.0);
    let (b, g, r) = if sf == 0.0 {
        (vf, vf, vf)
    } else {
        const SECTOR: [[usize; 3]; 6] = [
            [1, 3, 0],
            [1, 0, 2],
            [3, 0, 1],
            [0, 2, 1],
            [0, 1, 3],
            [2, 1, 0],
        ];
        while hf < 0.0 {
            hf += 6.0;
        }
        while hf >= 6.0 {
            hf -= 6.0;
        }
        let mut sector = hf.floor() as i32;
        hf -= sector as f32;
        if !(0..6).contains(&sector) {
            sector = 0;
            hf = 0.0;
        }
        let tab = [
            vf,
            vf * (1.0 - sf),
            vf * (1.0 - sf * hf),
            vf * (1.0 - sf * (1.0 - hf)),
        ];
        let sd = SECTOR[sector as usize];
        (tab[sd[0]], tab[sd[1]], tab[sd[2]])
    };
    let cv = |x: f32| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8;
    (cv(b), cv(g), cv(r))
}

/// A path as sd-scripts keys it (the globbed string), turned into a filesystem path.
pub fn key_path(key: &str) -> PathBuf {
    PathBuf::from(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitext_like_python() {
        assert_eq!(splitext_stem("a/b.c/zko (1).png"), "a/b.c/zko (1)");
        assert_eq!(splitext_stem("a/.hidden"), "a/.hidden");
        assert_eq!(splitext_stem("x.tar.gz"), "x.tar");
    }

    #[test]
    fn pil_identity_when_same_size() {
        let mut img = Image8::new(4, 3, 3);
        img.data
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as u8);
        assert_eq!(resize_pil(&img, 4, 3, PilFilter::Lanczos), img);
    }
}
