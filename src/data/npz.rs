//! `.npz` files as numpy writes them (`np.savez`: a stored zip of `.npy` v1.0 arrays) — enough
//! to exchange latent caches with sd-scripts in both directions.
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::path::Path;

/// Element types found in sd-scripts' caches.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<u16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    U8(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl NpyArray {
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Self {
        NpyArray {
            shape,
            data: NpyData::F32(v),
        }
    }

    /// Values as f32 (fp16 and float64 converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::F16(v) => v.iter().map(|&h| f16_to_f32(h)).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::U8(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            NpyData::F64(v) => v.clone(),
            NpyData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::I32(v) => v.iter().map(|&x| x as f64).collect(),
            _ => self.to_f32().into_iter().map(|x| x as f64).collect(),
        }
    }

    fn descr(&self) -> &'static str {
        match self.data {
            NpyData::F32(_) => "<f4",
            NpyData::F64(_) => "<f8",
            NpyData::F16(_) => "<f2",
            NpyData::I64(_) => "<i8",
            NpyData::I32(_) => "<i4",
            NpyData::U8(_) => "|u1",
        }
    }

    /// The `.npy` v1.0 bytes (header padded to a multiple of 64 as numpy 2 does).
    pub fn to_npy(&self) -> Vec<u8> {
        let shape = match self.shape.len() {
            0 => "()".to_string(),
            1 => format!("({},)", self.shape[0]),
            _ => format!(
                "({})",
                self.shape
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            self.descr()
        );
        let total = 10 + header.len() + 1;
        let pad = (64 - total % 64) % 64;
        header.push_str(&" ".repeat(pad));
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        match &self.data {
            NpyData::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            NpyData::F64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            NpyData::F16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            NpyData::I64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            NpyData::I32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            NpyData::U8(v) => out.extend_from_slice(v),
        }
        out
    }

    pub fn from_npy(bytes: &[u8], what: &str) -> Result<Self> {
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            bail!("{what}: not a .npy array");
        }
        let major = bytes[6];
        let (hlen, off) = if major == 1 {
            (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
        } else {
            if bytes.len() < 12 {
                bail!("{what}: truncated .npy header");
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        };
        let header = std::str::from_utf8(
            bytes
                .get(off..off + hlen)
                .ok_or_else(|| anyhow!("{what}: truncated .npy header"))?,
        )?;
        let descr = dict_value(header, "descr")
            .ok_or_else(|| anyhow!("{what}: .npy header without descr"))?;
        let descr = descr.trim_matches(|c| c == '\'' || c == '"');
        if dict_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
            bail!("{what}: Fortran-ordered arrays are not supported");
        }
        let shape_s = dict_value(header, "shape")
            .ok_or_else(|| anyhow!("{what}: .npy header without shape"))?;
        let shape: Vec<usize> = shape_s
            .trim_matches(|c| c == '(' || c == ')')
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("{what}: bad shape {shape_s}"))?;
        let n: usize = shape.iter().product();
        let body = &bytes[off + hlen..];
        let need = |size: usize| -> Result<&[u8]> {
            body.get(..n * size).ok_or_else(|| {
                anyhow!(
                    "{what}: truncated data ({} bytes, need {})",
                    body.len(),
                    n * size
                )
            })
        };
        let data = match descr {
            "<f4" => NpyData::F32(
                need(4)?
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "<f8" => NpyData::F64(
                need(8)?
                    .chunks(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "<f2" => NpyData::F16(
                need(2)?
                    .chunks(2)
                    .map(|c| u16::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "<i8" => NpyData::I64(
                need(8)?
                    .chunks(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "<i4" => NpyData::I32(
                need(4)?
                    .chunks(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            "|u1" => NpyData::U8(need(1)?.to_vec()),
            other => bail!("{what}: unsupported dtype {other}"),
        };
        Ok(NpyArray { shape, data })
    }
}

/// The text after `'key':` in a numpy header dict, up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("'{key}':");
    let start = header.find(&pat)? + pat.len();
    let rest = header[start..].trim_start();
    if rest.starts_with('(') {
        let end = rest.find(')')?;
        return Some(&rest[..=end]);
    }
    let end = rest.find(',').unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if mant == 0 {
            sign
        } else {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut m = mant;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (mant << 13)
    } else {
        sign | ((exp + 127 - 15) << 23) | (mant << 13)
    };
    f32::from_bits(bits)
}

/// Reads every array of an `.npz`, in file order.
pub fn read_npz(path: &Path) -> Result<Vec<(String, NpyArray)>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut z = zip::ZipArchive::new(f)
        .with_context(|| format!("{}: not an .npz (zip) file", path.display()))?;
    let mut out = Vec::new();
    for i in 0..z.len() {
        let mut e = z.by_index(i)?;
        let name = e.name().to_string();
        let mut buf = Vec::new();
        e.read_to_end(&mut buf)
            .with_context(|| format!("{}: reading {name}", path.display()))?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        let arr = NpyArray::from_npy(&buf, &format!("{}:{key}", path.display()))?;
        out.push((key, arr));
    }
    Ok(out)
}

/// Lists the keys of an `.npz` without reading the arrays.
pub fn npz_keys(path: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let z = zip::ZipArchive::new(f)
        .with_context(|| format!("{}: not an .npz (zip) file", path.display()))?;
    Ok(z.file_names()
        .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
        .collect())
}

/// Writes an `.npz` like `np.savez` (stored, `<key>.npy` entries), atomically.
pub fn write_npz(path: &Path, arrays: &[(String, NpyArray)]) -> Result<()> {
    crate::io::write_atomic(path, |f| {
        let mut z = zip::ZipWriter::new(f);
        let opts = zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(false);
        for (k, a) in arrays {
            z.start_file(format!("{k}.npy"), opts)?;
            z.write_all(&a.to_npy())?;
        }
        z.finish()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_roundtrip_examples() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    }

    #[test]
    fn npy_roundtrip() {
        let a = NpyArray::f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let b = NpyArray::from_npy(&a.to_npy(), "t").unwrap();
        assert_eq!(a, b);
        // 64-byte aligned header, then 6 f32 = 24 bytes of data
        assert_eq!(a.to_npy().len() % 64, 24);
    }
}
