//! A model as a merge reads it: a model folder, with the LoRA adapters (`BASE+ADAPTER`,
//! `adapters:`) or the compressed task vector (`smelt compress`) applied on top. The folder
//! itself is [`crate::io::model::ModelFolder`]; this layer sits above io, lora and compeft.

use std::ops::Deref;
use std::path::Path;

use crate::compeft::Compressed;
use crate::error::{Error, Result};
use crate::io::model::{sampled_digest, ModelFolder, TensorRef};
use crate::lora::{Adapter, LoraModule};

/// A model folder with what is applied on top of it. It reads as its folder (`Deref`), except
/// that [`ModelInput::get`] sees the adapters' full replacement tensors.
pub struct ModelInput {
    pub folder: ModelFolder,
    /// LoRA adapters applied on top, in order (`BASE+ADAPTER`, `adapters:`): each one's full
    /// tensors replace the tensor as it stands, and its ΔW (times its scale) is added to the
    /// tensors it targets when they are merged.
    pub adapters: Vec<AppliedAdapter>,
    /// A compressed task vector (`smelt compress`) added on top: `BASE+COMPRESSED`, or a
    /// recipe model that names the compressed folder itself.
    pub compeft: Option<Box<Compressed>>,
}

/// A LoRA adapter applied to a model, with the factor its ΔW is multiplied by.
pub struct AppliedAdapter {
    pub adapter: Adapter,
    pub scale: f64,
}

impl Deref for ModelInput {
    type Target = ModelFolder;
    fn deref(&self) -> &ModelFolder {
        &self.folder
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadModel {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl ModelInput {
    /// The folder with nothing applied yet.
    pub fn new(folder: ModelFolder) -> Self {
        ModelInput {
            folder,
            adapters: Vec::new(),
            compeft: None,
        }
    }

    /// Opens a model folder ([`ModelFolder::open`]) with nothing applied.
    pub fn open(path: &Path, label: &str) -> Result<Self> {
        ModelFolder::open(path, label).map(ModelInput::new)
    }

    /// Applies a LoRA adapter on top of this model (after those already applied), with its
    /// ΔW multiplied by `scale`, after checking every module and full tensor of it against
    /// this model's tensors.
    pub fn attach_adapter(&mut self, adapter: Adapter, scale: f64) -> Result<()> {
        if self.compeft.is_some() {
            return Err(bad(
                &adapter.dir,
                "a model with a compressed task vector cannot also take a LoRA adapter",
            ));
        }
        adapter.check_against(&self.folder)?;
        self.adapters.push(AppliedAdapter { adapter, scale });
        Ok(())
    }

    /// Adds a compressed task vector on top of this model (which must be the base it was
    /// made against).
    pub fn attach_compressed(&mut self, c: Compressed) -> Result<()> {
        if !self.adapters.is_empty() {
            return Err(bad(
                &c.dir,
                "a model with a LoRA adapter cannot also take a compressed task vector",
            ));
        }
        c.check_against(&self.folder)?;
        self.compeft = Some(Box::new(c));
        Ok(())
    }

    /// The index of the last applied adapter that replaces `name` with a full tensor: the
    /// tensor as stored comes from it, and only its ΔW and later ones apply on top.
    fn replaced_by(&self, name: &str) -> Option<usize> {
        self.folder.get(name)?;
        self.adapters
            .iter()
            .rposition(|a| a.adapter.replacement(name).is_some())
    }

    /// A tensor as stored: the full replacement of the last adapter that has one, the
    /// model's own otherwise (the ΔWs of LoRA modules are not in here; see
    /// [`ModelInput::deltas_for`]).
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        if let Some(i) = self.replaced_by(name) {
            let ad = &self.adapters[i].adapter;
            return Some(TensorRef {
                file: &ad.file,
                info: ad.replacement(name).unwrap(),
            });
        }
        self.folder.get(name)
    }

    /// The LoRA modules whose ΔW is added to tensor `name`, in the order the adapters are
    /// applied, with each adapter's scale: applying the adapters one after another adds the
    /// ΔW of every adapter from the last full replacement of the tensor on.
    pub fn deltas_for(&self, name: &str) -> Vec<(&AppliedAdapter, &LoraModule)> {
        let from = self.replaced_by(name).unwrap_or(0);
        self.adapters[from..]
            .iter()
            .filter_map(|a| a.adapter.module_for(name).map(|m| (a, m)))
            .collect()
    }

    /// Where a later adapter's full tensor replaces what an earlier adapter changed, so the
    /// earlier change is lost (as when the adapters are applied one after another).
    pub fn adapter_overrides(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, later) in self.adapters.iter().enumerate() {
            let mut replaced: Vec<&String> = later.adapter.replaced_tensors().collect();
            replaced.sort();
            for t in replaced {
                for earlier in &self.adapters[..k] {
                    let what = if earlier.adapter.module_for(t).is_some() {
                        "adds a ΔW to"
                    } else if earlier.adapter.replacement(t).is_some() {
                        "replaces"
                    } else {
                        continue;
                    };
                    out.push(format!(
                        "{}: adapter {} {what} {t}, but the later adapter {} replaces that tensor with its own full copy, so the earlier change is discarded",
                        self.label, earlier.adapter.label, later.adapter.label
                    ));
                }
            }
        }
        out
    }
}

/// The digest of a model input ([`sampled_digest`]): applied adapters are part of the input,
/// with their order, scales, configs and tensors, and so is a compressed task vector.
pub fn input_digest(m: &ModelInput) -> String {
    let prefix: Vec<Vec<u8>> = m
        .adapters
        .iter()
        .flat_map(|a| {
            [
                a.scale.to_le_bytes().to_vec(),
                serde_json::to_string(&a.adapter.config.raw)
                    .unwrap_or_default()
                    .into_bytes(),
            ]
        })
        .collect();
    let compeft = m.compeft.iter().map(|c| &c.file);
    let files = m
        .files()
        .iter()
        .chain(m.adapters.iter().map(|a| &a.adapter.file))
        .chain(compeft);
    sampled_digest(&prefix, files)
}
