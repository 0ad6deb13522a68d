//! Writing an adapter folder that PEFT loads: `adapter_config.json` and
//! `adapter_model.safetensors` (metadata `{"format": "pt"}`), staged in a hidden partial
//! folder and renamed into place only when complete, like every smelt output.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::adapter::{CONFIG_NAME, WEIGHTS_NAME};
use crate::dtype::{self, DType};
use crate::error::Result;
use crate::io::writer::{HashAlgo, Layout, OutTensor, StagedOutput, Start};

/// Writes `tensors` (key, shape, values) in `dtype` with `config` into `out`. `card` becomes
/// README.md.
pub fn write_adapter(
    out: &Path,
    force: bool,
    config: &Map<String, Value>,
    tensors: &[(String, Vec<usize>, &[f32])],
    dtype: DType,
    card: &str,
) -> Result<PathBuf> {
    let outs: Vec<OutTensor> = tensors
        .iter()
        .map(|(k, s, _)| OutTensor {
            name: k,
            dtype,
            shape: s,
        })
        .collect();
    let layout = Layout::named(&outs, u64::MAX, WEIGHTS_NAME);
    // A fingerprint for the journal; adapters are small and never resumed.
    let fp = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(serde_json::to_string(config).unwrap_or_default().as_bytes());
        for s in &layout.shards {
            h.update(&s.header);
        }
        crate::io::writer::hex(&h.finalize())
    };
    let mut staged =
        StagedOutput::create(out, Start::Fresh { force }, layout, fp, HashAlgo::Blake3)?;
    for (i, (_, _, data)) in tensors.iter().enumerate() {
        let mut bytes = vec![0u8; data.len() * dtype.size()];
        dtype::encode(dtype, data, &mut bytes);
        staged.write_tensor(i, &bytes)?;
    }
    staged.finish_shard(0)?;
    staged.write_file(
        CONFIG_NAME,
        (serde_json::to_string_pretty(&Value::Object(config.clone())).unwrap() + "\n").as_bytes(),
    )?;
    staged.write_file("README.md", card.as_bytes())?;
    staged.commit()
}
