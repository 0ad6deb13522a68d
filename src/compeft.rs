//! ComPEFT compression of a task vector (Yadav et al. 2023, arXiv 2311.13171; docs/ALGORITHMS.md
//! §16): τ = model − base over the whole model is reduced to its largest-magnitude entries,
//! each replaced by its sign times one scale, α·σ (σ the standard deviation of all of τ).
//!
//! What the reference (`get_compressed_lora_weights`) computes, and smelt reproduces:
//! σ = std(τ), unbiased, over all d elements before pruning; an element is kept when
//! |τ| ≥ the (d − int(d·density))-th smallest |τ| (1-based), which keeps int(d·density) + 1
//! elements plus ties at the threshold; τ' = α·σ·sign(τ ⊙ keep) (a kept exact zero stays 0).
//!
//! The statistics (one sum / sum-of-squares reduction and a two-level radix selection over
//! the whole model) and the ternarisation run on the backend, one tensor at a time; the bits
//! are packed on the CPU. Memory is that of one tensor.
//!
//! # File layout (`compeft.safetensors`, format `smelt-compeft` version 1)
//! For every float tensor `NAME` of n elements, with nnz the number of non-zeros of τ':
//! * `NAME.keep`: U8, shape `[ceil(n / 8)]`: bit `e % 8` (least significant first) of byte
//!   `e / 8` is set when element `e` (row-major flat index) is non-zero.
//! * `NAME.sign`: U8, shape `[ceil(nnz / 8)]`: bit `j % 8` of byte `j / 8` is set when the
//!   j-th non-zero element (in flat order) is negative.
//!
//! `__metadata__` (strings): `format` = `smelt-compeft`, `version` = `1`, `scale` (α·σ as an
//! f32, decimal), `sigma`, `alpha`, `density`, `threshold` (the kept |τ| bound, f32), `kept`
//! and `total` (element counts), `shapes` (JSON: tensor name → shape), `base` (the base
//! folder's absolute path when compressed), `base_digest` (smelt's input digest of it) and
//! `model`. Decompression: `θ = base + scale·(±1 at the set keep bits, signs in order)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::backend::{bucket_of, Backend, Job, Segments, Source, Vector};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::model::ModelFolder;
use crate::io::safetensors::SafetensorsFile;
use crate::io::writer::{HashAlgo, Layout, OutTensor, StagedOutput, Start};

pub const FILE_NAME: &str = "compeft.safetensors";
pub const FORMAT: &str = "smelt-compeft";
pub const VERSION: &str = "1";

/// Elements per packing chunk (a multiple of 8, so keep bytes never straddle chunks).
const CHUNK: usize = 1 << 16;

/// Does `dir` hold a compressed task vector?
pub fn is_compressed(dir: &Path) -> bool {
    dir.is_dir() && dir.join(FILE_NAME).is_file()
}

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Share of the elements kept, in (0, 1): ComPEFT's k / 100.
    pub density: f64,
    /// ComPEFT's `replace_factor`: the kept values become ±alpha·σ.
    pub alpha: f64,
}

impl Settings {
    pub fn check(&self) -> Result<()> {
        if !(self.density > 0.0 && self.density < 1.0) {
            return Err(Error::Other(format!(
                "--density {} is not in (0, 1): it is the share of the task vector kept (ComPEFT's k/100)",
                self.density
            )));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::Other(format!(
                "--alpha {} must be a positive number (the kept values become ±alpha·σ)",
                self.alpha
            )));
        }
        // the scale α·σ is stored as an f32: α itself must be one
        if !(self.alpha as f32).is_finite() {
            return Err(Error::Other(format!(
                "--alpha {} is too large: the kept values ±alpha·σ are stored as f32 (at most {:e}); pass a smaller --alpha",
                self.alpha,
                f32::MAX
            )));
        }
        Ok(())
    }
}

/// The whole-model statistics of a compression.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Elements of the task vector.
    pub total: u64,
    /// Elements with |τ| at or above the threshold.
    pub kept: u64,
    /// Unbiased standard deviation of τ, in f64.
    pub sigma: f64,
    /// The f32 magnitude of every kept value: f32(σ)·f32(α).
    pub scale: f32,
    /// The smallest kept |τ|.
    pub threshold: f32,
}

/// The float tensors of the task vector (model vs base), checked to pair up.
fn pairs(model: &ModelFolder, base: &ModelFolder) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for name in model.names() {
        let t = model.get(name).unwrap();
        let Some(b) = base.get(name) else {
            return Err(Error::MissingTensor {
                model: base.label.clone(),
                tensor: name.clone(),
                hint: format!(
                    " (it is in {}; a task vector needs the same architecture)",
                    model.label
                ),
            });
        };
        if b.shape() != t.shape() {
            return Err(Error::ShapeMismatch {
                tensor: name.clone(),
                reference_model: base.label.clone(),
                expected: b.shape().to_vec(),
                model: model.label.clone(),
                got: t.shape().to_vec(),
                hint: String::new(),
            });
        }
        if !t.dtype().is_mergeable() || !b.dtype().is_mergeable() {
            // integer buffers are not part of a task vector: they must be the base's
            if t.bytes() != b.bytes() || t.dtype() != b.dtype() {
                return Err(Error::Param {
                    tensor: name.clone(),
                    msg: format!(
                        "{} tensor differs between {} and the base {}; only float tensors can be compressed",
                        t.dtype(),
                        model.label,
                        base.label
                    ),
                });
            }
            continue;
        }
        for (m, r) in [(model, t), (base, b)] {
            if let Some((i, v)) = crate::dtype::first_nonfinite(r.dtype(), r.bytes()) {
                return Err(Error::Param {
                    tensor: name.clone(),
                    msg: format!("element {i} of {} is {v}", m.label),
                });
            }
        }
        names.push(name.clone());
    }
    if let Some(extra) = base.names().iter().find(|n| model.get(n).is_none()) {
        return Err(Error::MissingTensor {
            model: model.label.clone(),
            tensor: extra.clone(),
            hint: format!(" (it is in the base {})", base.label),
        });
    }
    Ok(names)
}

fn with_job<T>(
    model: &ModelFolder,
    base: &ModelFolder,
    name: &str,
    backend: &dyn Backend,
    out_dtype: DType,
    f: impl FnOnce(&Job) -> Result<T>,
) -> Result<T> {
    fn input<'a>(m: &'a ModelFolder, name: &str) -> crate::backend::Input<'a> {
        let r = m.get(name).unwrap();
        crate::backend::Input {
            bytes: r.bytes(),
            dtype: r.dtype(),
        }
    }
    let job = Job::new(
        name,
        Some(input(base, name)),
        vec![input(model, name)],
        DType::F32,
        out_dtype,
    );
    let r = f(&job);
    backend.end_job(&job);
    r
}

/// σ and the threshold of the whole task vector: two passes over the model on the backend.
pub fn statistics(
    model: &ModelFolder,
    base: &ModelFolder,
    s: &Settings,
    backend: &dyn Backend,
    tick: &dyn Fn(&str),
) -> Result<(Stats, Vec<String>)> {
    s.check()?;
    let names = pairs(model, base)?;
    let mut h1 = vec![0u64; 1 << 16];
    let (mut sum, mut sum2, mut total) = (0f64, 0f64, 0u64);
    for name in &names {
        tick(name);
        with_job(model, base, name, backend, DType::F32, |job| {
            let h = backend.histogram(job, &[(Source::Delta(0), None)])?;
            h1.iter_mut().zip(&h[0]).for_each(|(a, c)| *a += c);
            let d = backend.dots(
                job,
                &[Vector::Delta(0), Vector::Ones],
                &[(0, 0), (0, 1)],
                Segments::Whole,
            )?;
            sum2 += d[0];
            sum += d[1];
            total += job.numel as u64;
            Ok(())
        })?;
    }
    if total < 2 {
        return Err(Error::Other(format!(
            "the task vector of {} has {total} float elements; ComPEFT needs at least 2",
            model.label
        )));
    }
    let n = total as f64;
    let var = ((sum2 - sum * (sum / n)) / (n - 1.0)).max(0.0);
    let sigma = var.sqrt();
    // ascending 0-based position of the (d − int(d·density))-th smallest |τ|
    let keep_n = crate::backend::py_int_mul(s.density, total as usize);
    let j = total - keep_n - 1;
    let (hb, within) = bucket_of(&h1, j);
    let below_hi: u64 = h1[..hb as usize].iter().sum();
    let mut h2 = vec![0u64; 1 << 16];
    for name in &names {
        tick(name);
        with_job(model, base, name, backend, DType::F32, |job| {
            let h = backend.histogram(job, &[(Source::Delta(0), Some(hb))])?;
            h2.iter_mut().zip(&h[0]).for_each(|(a, c)| *a += c);
            Ok(())
        })?;
    }
    let (lb, _) = bucket_of(&h2, within);
    let below_lo: u64 = h2[..lb as usize].iter().sum();
    let threshold = f32::from_bits((hb << 16) | lb);
    let stats = Stats {
        total,
        kept: total - below_hi - below_lo,
        sigma,
        scale: (sigma as f32) * (s.alpha as f32),
        threshold,
    };
    if !stats.scale.is_finite() {
        return Err(Error::Other(format!(
            "--alpha {} times the task vector's σ {sigma:e} is {}, not a finite f32 scale; pass a smaller --alpha",
            s.alpha, stats.scale
        )));
    }
    Ok((stats, names))
}

/// One tensor's keep and sign bit maps (see the module docs), and its non-zero count: the
/// ternary codes sign(τ)·[|τ| ≥ threshold] come from the backend (as bf16, exact for
/// -1, 0, 1), the bits are packed here.
pub fn pack(
    model: &ModelFolder,
    base: &ModelFolder,
    name: &str,
    threshold: f32,
    backend: &dyn Backend,
) -> Result<Packed> {
    let n = model.get(name).unwrap().numel();
    let mut codes = vec![0u8; n * 2];
    with_job(model, base, name, backend, DType::BF16, |job| {
        backend.ternary(job, threshold.to_bits(), &mut codes)
    })?;
    // bf16 codes: 0x3f80 = 1, 0xbf80 = -1, 0 = 0
    let parts: Vec<(Vec<u8>, Vec<u64>, usize)> = codes
        .par_chunks(CHUNK * 2)
        .map(|c| {
            let len = c.len() / 2;
            let mut keep = vec![0u8; len.div_ceil(8)];
            let mut signs = vec![0u64; len.div_ceil(64)];
            let mut nnz = 0usize;
            for (e, w) in c.chunks_exact(2).enumerate() {
                let v = u16::from_le_bytes([w[0], w[1]]);
                let on = v & 0x7fff != 0;
                keep[e >> 3] |= (on as u8) << (e & 7);
                signs[nnz >> 6] |= ((on && v >> 15 == 1) as u64) << (nnz & 63);
                nnz += on as usize;
            }
            (keep, signs, nnz)
        })
        .collect();
    let nnz: usize = parts.iter().map(|p| p.2).sum();
    let mut keep = Vec::with_capacity(n.div_ceil(8));
    let mut sign = vec![0u8; nnz.div_ceil(8)];
    let mut at = 0usize;
    for (k, s, c) in parts {
        keep.extend_from_slice(&k);
        for j in 0..c {
            if (s[j >> 6] >> (j & 63)) & 1 == 1 {
                let p = at + j;
                sign[p >> 3] |= 1 << (p & 7);
            }
        }
        at += c;
    }
    Ok(Packed { keep, sign, nnz })
}

pub struct Packed {
    pub keep: Vec<u8>,
    pub sign: Vec<u8>,
    pub nnz: usize,
}

/// What `compress` did.
#[derive(Clone, Debug)]
pub struct Report {
    pub stats: Stats,
    /// Non-zeros written (kept minus kept exact zeros).
    pub nnz: u64,
    /// Bytes of the model's float tensors, as stored.
    pub model_bytes: u64,
    /// Bytes of the bit maps written.
    pub packed_bytes: u64,
    pub out_dir: PathBuf,
}

impl Report {
    /// Stored model bytes per compressed byte.
    pub fn ratio(&self) -> f64 {
        self.model_bytes as f64 / self.packed_bytes.max(1) as f64
    }
}

/// Compresses `model`'s task vector against `base` into the folder `out`.
#[allow(clippy::too_many_arguments)]
pub fn compress(
    model: &ModelFolder,
    base: &ModelFolder,
    s: &Settings,
    backend: &dyn Backend,
    out: &Path,
    force: bool,
    tick: &dyn Fn(&str),
    card: &dyn Fn(&Report) -> String,
) -> Result<Report> {
    let (stats, names) = statistics(model, base, s, backend, tick)?;
    // the bit maps, tensor by tensor; the header needs each sign map's size, known only once
    // packed, so every tensor is ternarised twice (a counting pass, then the writing pass):
    // four passes over the inputs in all, but never more than one tensor's bits in memory
    let counts: Vec<usize> = names
        .iter()
        .map(|n| {
            tick(n);
            pack(model, base, n, stats.threshold, backend).map(|p| p.nnz)
        })
        .collect::<Result<_>>()?;
    let shapes: BTreeMap<&str, &[usize]> = names
        .iter()
        .map(|n| (n.as_str(), model.get(n).unwrap().shape()))
        .collect();
    let mut tnames = Vec::new();
    let mut tshapes = Vec::new();
    for (n, &c) in names.iter().zip(&counts) {
        let numel = model.get(n).unwrap().numel();
        tnames.push(format!("{n}.keep"));
        tshapes.push(vec![numel.div_ceil(8)]);
        tnames.push(format!("{n}.sign"));
        tshapes.push(vec![c.div_ceil(8)]);
    }
    let outs: Vec<OutTensor> = tnames
        .iter()
        .zip(&tshapes)
        .map(|(n, s)| OutTensor {
            name: n,
            dtype: DType::U8,
            shape: s,
        })
        .collect();
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let meta: BTreeMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("version", VERSION.to_string()),
        ("scale", format!("{:?}", stats.scale)),
        ("sigma", format!("{:?}", stats.sigma)),
        ("alpha", format!("{:?}", s.alpha)),
        ("density", format!("{:?}", s.density)),
        ("threshold", format!("{:?}", stats.threshold)),
        ("kept", stats.kept.to_string()),
        ("total", stats.total.to_string()),
        ("shapes", serde_json::to_string(&shapes).unwrap()),
        ("base", abs(&base.path).display().to_string()),
        ("base_digest", base.digest()),
        ("model", abs(&model.path).display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let layout = Layout::with_metadata(&outs, u64::MAX, FILE_NAME, &meta);
    let fp = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(&layout.shards[0].header);
        crate::io::writer::hex(&h.finalize())
    };
    let packed_bytes = layout.total_bytes;
    let mut staged =
        StagedOutput::create(out, Start::Fresh { force }, layout, fp, HashAlgo::Blake3)?;
    let mut nnz = 0u64;
    for (i, n) in names.iter().enumerate() {
        tick(n);
        let p = pack(model, base, n, stats.threshold, backend)?;
        debug_assert_eq!(p.nnz, counts[i]);
        nnz += p.nnz as u64;
        staged.write_tensor(2 * i, &p.keep)?;
        staged.write_tensor(2 * i + 1, &p.sign)?;
    }
    staged.finish_shard(0)?;
    let model_bytes: u64 = names
        .iter()
        .map(|n| model.get(n).unwrap().bytes().len() as u64)
        .sum();
    let mut report = Report {
        stats,
        nnz,
        model_bytes,
        packed_bytes,
        out_dir: out.to_path_buf(),
    };
    staged.write_file("README.md", card(&report).as_bytes())?;
    report.out_dir = staged.commit()?;
    Ok(report)
}

/// A compressed task vector, opened for use as a recipe input.
pub struct Compressed {
    pub dir: PathBuf,
    pub file: SafetensorsFile,
    pub scale: f32,
    /// The base it was made against, as recorded (absolute path) and its digest.
    pub base: PathBuf,
    pub base_digest: String,
    pub shapes: BTreeMap<String, Vec<usize>>,
}

impl Compressed {
    pub fn open(dir: &Path) -> Result<Compressed> {
        let path = dir.join(FILE_NAME);
        let file = SafetensorsFile::open(&path)?;
        let bad = |msg: String| Error::BadFile {
            path: path.clone(),
            msg,
        };
        let meta = &file.header.metadata;
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("metadata has no `{k}` (not a {FORMAT} file?)")))
        };
        if get("format")? != FORMAT {
            return Err(bad(format!(
                "metadata `format` is {:?}, not {FORMAT:?}",
                meta["format"]
            )));
        }
        if get("version")? != VERSION {
            return Err(bad(format!(
                "{FORMAT} version {} is not one this smelt reads ({VERSION})",
                meta["version"]
            )));
        }
        let scale: f32 = get("scale")?
            .parse()
            .ok()
            .filter(|x: &f32| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| {
                bad(format!(
                    "metadata `scale` {:?} is not a number",
                    meta["scale"]
                ))
            })?;
        let shapes: BTreeMap<String, Vec<usize>> =
            serde_json::from_str(get("shapes")?).map_err(|e| {
                bad(format!(
                    "metadata `shapes` is not a JSON map of shapes: {e}"
                ))
            })?;
        // every tensor pair present, sized for its shape, sign map consistent with keep bits
        let mut elements = 0u64;
        for (name, shape) in &shapes {
            let n: usize = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("the shape of {name} overflows")))?;
            elements = elements
                .checked_add(n as u64)
                .ok_or_else(|| bad("the shapes' element counts overflow".into()))?;
            let k = file
                .get(&format!("{name}.keep"))
                .ok_or_else(|| bad(format!("{name}.keep is missing")))?;
            let s = file
                .get(&format!("{name}.sign"))
                .ok_or_else(|| bad(format!("{name}.sign is missing")))?;
            if k.dtype != DType::U8 || s.dtype != DType::U8 {
                return Err(bad(format!("the bit maps of {name} are not U8")));
            }
            if k.end - k.begin != n.div_ceil(8) {
                return Err(bad(format!(
                    "{name}.keep has {} bytes but {shape:?} needs {}",
                    k.end - k.begin,
                    n.div_ceil(8)
                )));
            }
            let keep = file.data(k);
            let nnz: usize = keep.iter().map(|b| b.count_ones() as usize).sum();
            if !n.is_multiple_of(8) && keep.last().is_some_and(|b| b >> (n % 8) != 0) {
                return Err(bad(format!("{name}.keep sets bits past the tensor's end")));
            }
            if s.end - s.begin != nnz.div_ceil(8) {
                return Err(bad(format!(
                    "{name}.sign has {} bytes but {name}.keep sets {nnz} bits",
                    s.end - s.begin
                )));
            }
        }
        // the recorded counts must match the maps (a file edited by hand, or cut, does not)
        let count = |k: &str| -> Result<Option<u64>> {
            meta.get(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("metadata `{k}` {v:?} is not a whole number")))
                })
                .transpose()
        };
        let (kept, total) = (count("kept")?, count("total")?);
        if let Some(t) = total {
            if t != elements {
                return Err(bad(format!(
                    "metadata `total` says {t} elements but `shapes` hold {elements}; the file is damaged or was edited: compress again"
                )));
            }
        }
        if let Some(k) = kept {
            if k > elements {
                return Err(bad(format!(
                    "metadata `kept` says {k} elements, more than the {elements} of `shapes`; the file is damaged or was edited: compress again"
                )));
            }
        }
        Ok(Compressed {
            dir: dir.to_path_buf(),
            base: PathBuf::from(get("base")?),
            base_digest: get("base_digest")?.clone(),
            scale,
            shapes,
            file,
        })
    }

    /// Checks that `base` is the model this was made against: every tensor with its shape,
    /// and the same content digest.
    pub fn check_against(&self, base: &ModelFolder) -> Result<()> {
        for (name, shape) in &self.shapes {
            let Some(t) = base.get(name) else {
                return Err(Error::MissingTensor {
                    model: base.label.clone(),
                    tensor: name.clone(),
                    hint: format!(
                        " (the compressed task vector {} has it)",
                        self.dir.display()
                    ),
                });
            };
            if t.shape() != shape.as_slice() || !t.dtype().is_mergeable() {
                return Err(Error::ShapeMismatch {
                    tensor: name.clone(),
                    reference_model: self.dir.display().to_string(),
                    expected: shape.clone(),
                    model: base.label.clone(),
                    got: t.shape().to_vec(),
                    hint: String::new(),
                });
            }
        }
        let digest = base.digest();
        if digest != self.base_digest {
            return Err(Error::BadModel {
                path: self.dir.clone(),
                msg: format!(
                    "this compressed task vector was made against the base {} (digest {}), but {} has digest {digest}: apply it to the base it came from",
                    self.base.display(),
                    self.base_digest,
                    base.label
                ),
            });
        }
        Ok(())
    }

    pub fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    fn maps(&self, name: &str) -> (&[u8], &[u8]) {
        let k = self.file.get(&format!("{name}.keep")).unwrap();
        let s = self.file.get(&format!("{name}.sign")).unwrap();
        (self.file.data(k), self.file.data(s))
    }

    /// Adds τ' of tensor `name` to `w` (its values, flat): ±scale at each kept element.
    pub fn add_to(&self, name: &str, w: &mut [f32]) {
        let (keep, sign) = self.maps(name);
        let bytes_per = CHUNK / 8;
        // sign index of each chunk's first non-zero
        let starts: Vec<usize> = keep
            .chunks(bytes_per)
            .scan(0usize, |acc, c| {
                let s = *acc;
                *acc += c.iter().map(|b| b.count_ones() as usize).sum::<usize>();
                Some(s)
            })
            .collect();
        let scale = self.scale;
        w.par_chunks_mut(CHUNK)
            .zip(keep.par_chunks(bytes_per))
            .zip(starts.par_iter())
            .for_each(|((w, k), &start)| {
                let mut j = start;
                for (e, x) in w.iter_mut().enumerate() {
                    if (k[e >> 3] >> (e & 7)) & 1 == 1 {
                        let neg = (sign[j >> 3] >> (j & 7)) & 1 == 1;
                        *x += if neg { -scale } else { scale };
                        j += 1;
                    }
                }
            });
    }

    /// τ' of tensor `name`, decompressed.
    pub fn decompress(&self, name: &str) -> Option<Vec<f32>> {
        let shape = self.shapes.get(name)?;
        let mut w = vec![0f32; shape.iter().product()];
        self.add_to(name, &mut w);
        Some(w)
    }
}
