//! Writing whole checkpoints without holding them twice: a `.safetensors` file is laid out from
//! the tensors' names, dtypes and shapes first, then each tensor is produced, written and dropped,
//! so peak memory is about one tensor (plus what the producer keeps). The file goes to a temp
//! sibling that is renamed into place ([`crate::io::write_atomic`]).
use super::loading::dtype_of_kind;
use anyhow::{anyhow, Context, Result};
use safetensors::tensor::Dtype;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

/// One tensor of the file to write.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
}

/// Writes `plan` as a safetensors file with `metadata` (None: no `__metadata__`), asking
/// `produce` for each tensor in file order (the safetensors crate's order: larger dtypes first,
/// then by name). A produced tensor must match its plan.
pub fn write_safetensors_streaming(
    path: &Path,
    plan: &[Planned],
    metadata: Option<&BTreeMap<String, String>>,
    mut produce: impl FnMut(&Planned) -> Result<Tensor>,
) -> Result<()> {
    let mut order: Vec<(&Planned, Dtype)> = plan
        .iter()
        .map(|p| Ok((p, dtype_of_kind(p.kind).with_context(|| p.name.clone())?)))
        .collect::<Result<_>>()?;
    order.sort_by(|(a, da), (b, db)| db.cmp(da).then(a.name.cmp(&b.name)));
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        let md: serde_json::Map<String, serde_json::Value> = m
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(md));
    }
    let mut offset = 0u64;
    for (p, d) in &order {
        let n: i64 = p.shape.iter().product();
        let bytes = n as u64 * p.kind.elt_size_in_bytes() as u64;
        header.insert(
            p.name.clone(),
            serde_json::json!({
                "dtype": format!("{d:?}"),
                "shape": p.shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // the header is padded with spaces to a multiple of 8 bytes, as safetensors writes it
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    crate::io::write_atomic(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&json)?;
        let mut buf = Vec::new();
        for (p, _) in &order {
            let t = produce(p).with_context(|| format!("tensor `{}`", p.name))?;
            if t.kind() != p.kind || t.size() != p.shape {
                return Err(anyhow!(
                    "internal: tensor `{}` came out {:?} {:?}, planned {:?} {:?}",
                    p.name,
                    t.kind(),
                    t.size(),
                    p.kind,
                    p.shape
                ));
            }
            let t = t.to_device(tch::Device::Cpu).contiguous();
            let n = t.numel();
            buf.resize(n * t.kind().elt_size_in_bytes(), 0);
            if n > 0 {
                t.f_copy_data_u8(&mut buf, n)?;
            }
            w.write_all(&buf)?;
        }
        w.flush()?;
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))
}
