//! A restricted unpickler for the `data.pkl` that `torch.save` writes for a state dict.
//!
//! Nothing here ever calls anything: the opcodes are interpreted on a small value model, and
//! the only "callables" are the handful of globals `torch.save` emits for a dict of tensors
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`/`_v3`,
//! `torch._utils._rebuild_parameter`, the storage classes such as `torch.BFloat16Storage`,
//! and the dtype objects such as `torch.bfloat16`). Every other global is refused by its
//! name the moment the pickle names it, before anything could use it. The result is a list
//! of tensor descriptions (storage key, dtype, offset, shape, stride); the bytes themselves
//! stay in the zip file and are located by `io::torch_zip`.
//!
//! Every size comes from the input and is bounded before it is used: the pickle's length,
//! the stack, the memo, the nesting depth of containers and the work spent copying them
//! (values are shared, copy-on-write, so a memo trick cannot blow up memory or time).

use std::collections::HashMap;
use std::rc::Rc;

use crate::dtype::DType;

/// A `data.pkl` larger than this is refused (a state dict of 100k tensors is about 20 MiB).
pub const MAX_PICKLE_LEN: usize = 32 << 20;
/// Items on the stack at once.
const MAX_STACK: usize = 1 << 20;
/// Memo entries.
const MAX_MEMO: usize = 1 << 20;
/// Nesting of tuples, lists and dicts (a state dict needs 3 or 4).
const MAX_DEPTH: u8 = 32;
/// Dimensions of one tensor.
pub const MAX_DIMS: usize = 64;

/// One tensor of the state dict, as the pickle describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    /// The storage's key: its bytes are the zip entry `<archive>/data/<key>`.
    pub storage: String,
    /// Element type of the tensor.
    pub dtype: DType,
    /// Offset into the storage, in elements of `dtype`.
    pub offset: u64,
    pub shape: Vec<u64>,
    /// Strides in elements of `dtype`.
    pub stride: Vec<u64>,
}

/// Objects the unpickler may name. Nothing else is ever looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildV2,
    RebuildV3,
    RebuildParameter,
    RebuildParameterWithState,
    /// A storage class; `None` for `UntypedStorage` (sized in bytes).
    Storage(Option<DType>),
    DType(DType),
}

fn known_global(module: &str, name: &str) -> Option<Global> {
    use DType::*;
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildV3,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") => Global::Storage(None),
        ("torch", s) if s.ends_with("Storage") => Global::Storage(Some(match s {
            "FloatStorage" => F32,
            "HalfStorage" => F16,
            "BFloat16Storage" => BF16,
            "DoubleStorage" => F64,
            "LongStorage" => I64,
            "IntStorage" => I32,
            "ShortStorage" => I16,
            "CharStorage" => I8,
            "ByteStorage" => U8,
            "BoolStorage" => Bool,
            "Float8_e4m3fnStorage" => F8E4M3,
            "Float8_e5m2Storage" => F8E5M2,
            _ => return None,
        })),
        ("torch", d) => Global::DType(match d {
            "float32" | "float" => F32,
            "float16" | "half" => F16,
            "bfloat16" => BF16,
            "float64" | "double" => F64,
            "int64" | "long" => I64,
            "int32" | "int" => I32,
            "int16" | "short" => I16,
            "int8" => I8,
            "uint8" => U8,
            "uint16" => U16,
            "uint32" => U32,
            "uint64" => U64,
            "bool" => Bool,
            "float8_e4m3fn" => F8E4M3,
            "float8_e5m2" => F8E5M2,
            _ => return None,
        }),
        _ => return None,
    })
}

#[derive(Debug)]
struct Storage {
    key: String,
    /// `None`: an untyped storage, its size in bytes.
    dtype: Option<DType>,
}

#[derive(Clone, Debug)]
enum Value {
    None,
    /// True or False (torch passes `requires_grad`; its value does not matter here).
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Tuple(Rc<Seq>),
    List(Rc<Seq>),
    Dict(Rc<Map>),
    Global(Global),
    Storage(Rc<Storage>),
    Tensor(Rc<TensorDesc>),
}

#[derive(Clone, Debug, Default)]
struct Seq {
    items: Vec<Value>,
    depth: u8,
}

#[derive(Clone, Debug, Default)]
struct Map {
    items: Vec<(Value, Value)>,
    depth: u8,
}

impl Value {
    fn depth(&self) -> u8 {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(m) => m.depth,
            _ => 0,
        }
    }

    /// What it is, for a message (never the contents: they may be huge).
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

fn opname(op: u8) -> &'static str {
    match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        b'P' => "PERSID",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'L' => "LONG",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'T' | b'U' | b'C' | b'B' | 0x8e => "BYTES",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        0x82..=0x84 => "EXT",
        b'g' | b'p' => "GET/PUT (text)",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        _ => "unknown",
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Elements copied by copy-on-write so far; bounded by the input's length.
    work: usize,
    work_cap: usize,
    /// Storage key -> dtype, so one storage is not read as two types.
    storages: HashMap<String, Option<DType>>,
}

type R<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "data.pkl is cut short: an opcode at byte {} needs {n} more bytes",
                    self.pos
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn utf8(&mut self, n: usize) -> R<Rc<str>> {
        let at = self.pos;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(Rc::from)
            .map_err(|_| format!("data.pkl has a string that is not UTF-8 at byte {at}"))
    }

    fn push(&mut self, v: Value) -> R<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!(
                "data.pkl needs more than {MAX_STACK} stack entries; not a state dict"
            ));
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> R<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!(
                "data.pkl pops an empty stack at byte {}; the file is damaged",
                self.pos
            ));
        }
        Ok(self.stack.pop().unwrap())
    }
    fn top(&mut self) -> R<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!(
                "data.pkl reads an empty stack at byte {}; the file is damaged",
                self.pos
            ));
        }
        Ok(self.stack.last_mut().unwrap())
    }
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let m = self.marks.pop().ok_or_else(|| {
            format!(
                "data.pkl closes a MARK it never opened at byte {}; the file is damaged",
                self.pos
            )
        })?;
        Ok(self.stack.split_off(m))
    }
    fn charge(&mut self, n: usize) -> R<()> {
        self.work = self.work.saturating_add(n);
        if self.work > self.work_cap {
            return Err(
                "data.pkl copies far more values than a state dict needs; refusing to go on".into(),
            );
        }
        Ok(())
    }

    fn seq(&mut self, items: Vec<Value>) -> R<Seq> {
        let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
        if depth > MAX_DEPTH {
            return Err(format!(
                "data.pkl nests containers more than {MAX_DEPTH} deep; not a state dict"
            ));
        }
        Ok(Seq { items, depth })
    }

    fn memo_put(&mut self, k: u32) -> R<()> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&k) {
            return Err(format!(
                "data.pkl memoizes more than {MAX_MEMO} objects; not a state dict"
            ));
        }
        self.memo.insert(k, v);
        Ok(())
    }
    fn memo_get(&mut self, k: u32) -> R<()> {
        let v = self.memo.get(&k).cloned().ok_or_else(|| {
            format!(
                "data.pkl refers to memo entry {k}, which was never stored (byte {}); the file is damaged",
                self.pos
            )
        })?;
        self.push(v)
    }

    /// Adds `pairs` to the dict on top of the stack (SETITEM/SETITEMS).
    fn set_items(&mut self, pairs: Vec<Value>) -> R<()> {
        if !pairs.len().is_multiple_of(2) {
            return Err("data.pkl has a SETITEMS with an odd number of items".into());
        }
        let add_depth = pairs.iter().map(Value::depth).max().unwrap_or(0) + 1;
        let at = self.pos;
        let before = match self.top()? {
            Value::Dict(m) => Rc::strong_count(m) > 1,
            other => {
                return Err(format!(
                    "data.pkl sets items on {} at byte {at}; only dicts take items",
                    other.kind()
                ))
            }
        };
        if before {
            let n = match self.top()? {
                Value::Dict(m) => m.items.len(),
                _ => 0,
            };
            self.charge(n)?;
        }
        let Value::Dict(m) = self.top()? else {
            unreachable!("checked above")
        };
        let m = Rc::make_mut(m);
        m.depth = m.depth.max(add_depth);
        if m.depth > MAX_DEPTH {
            return Err(format!(
                "data.pkl nests containers more than {MAX_DEPTH} deep; not a state dict"
            ));
        }
        let mut it = pairs.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            m.items.push((k, v));
        }
        Ok(())
    }

    fn append(&mut self, vals: Vec<Value>) -> R<()> {
        let add_depth = vals.iter().map(Value::depth).max().unwrap_or(0) + 1;
        let at = self.pos;
        let shared = match self.top()? {
            Value::List(s) => (Rc::strong_count(s) > 1).then(|| s.items.len()),
            other => {
                return Err(format!(
                    "data.pkl appends to {} at byte {at}; only lists take appends",
                    other.kind()
                ))
            }
        };
        if let Some(n) = shared {
            self.charge(n)?;
        }
        let Value::List(s) = self.top()? else {
            unreachable!("checked above")
        };
        let s = Rc::make_mut(s);
        s.depth = s.depth.max(add_depth);
        if s.depth > MAX_DEPTH {
            return Err(format!(
                "data.pkl nests containers more than {MAX_DEPTH} deep; not a state dict"
            ));
        }
        s.items.extend(vals);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> R<()> {
        match known_global(module, name) {
            Some(g) => self.push(Value::Global(g)),
            None => Err(refused(module, name)),
        }
    }

    fn persistent_load(&mut self, pid: Value) -> R<Value> {
        let bad = || {
            "data.pkl has a persistent id that is not a torch storage reference \
             ('storage', type, key, location, size)"
                .to_string()
        };
        let Value::Tuple(t) = pid else {
            return Err(bad());
        };
        let [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), _location, Value::Int(_size)] =
            t.items.as_slice()
        else {
            return Err(bad());
        };
        if &**tag != "storage" {
            return Err(bad());
        }
        if key.is_empty()
            || key.len() > 64
            || !key.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            return Err(format!(
                "data.pkl names storage {:?}, which is not a plain storage key",
                key.chars().take(80).collect::<String>()
            ));
        }
        if let Some(prev) = self.storages.insert(key.to_string(), *dtype) {
            if prev != *dtype {
                return Err(format!(
                    "data.pkl reads storage {key} as two different types ({} and {})",
                    dt_name(prev),
                    dt_name(*dtype)
                ));
            }
        }
        Ok(Value::Storage(Rc::new(Storage {
            key: key.to_string(),
            dtype: *dtype,
        })))
    }

    fn reduce(&mut self, f: Value, args: Value) -> R<Value> {
        let Value::Global(g) = f else {
            return Err(format!(
                "data.pkl calls {}, which is not one of the functions torch.save uses",
                f.kind()
            ));
        };
        let Value::Tuple(args) = args else {
            return Err("data.pkl calls a function with arguments that are not a tuple".into());
        };
        let a = args.items.as_slice();
        match g {
            Global::OrderedDict if a.is_empty() => Ok(Value::Dict(Rc::new(Map::default()))),
            Global::RebuildV2 if a.len() == 6 || a.len() == 7 => {
                let Value::Storage(s) = &a[0] else {
                    return Err(arg_err("_rebuild_tensor_v2", "a storage", &a[0]));
                };
                let dtype = s.dtype.ok_or(
                    "data.pkl rebuilds a tensor from an untyped storage without saying its dtype",
                )?;
                tensor(s, dtype, &a[1], &a[2], &a[3], "_rebuild_tensor_v2")
            }
            Global::RebuildV3 if a.len() == 7 || a.len() == 8 => {
                let Value::Storage(s) = &a[0] else {
                    return Err(arg_err("_rebuild_tensor_v3", "a storage", &a[0]));
                };
                let Value::Global(Global::DType(dtype)) = a[6] else {
                    return Err(arg_err("_rebuild_tensor_v3", "a dtype", &a[6]));
                };
                if s.dtype.is_some_and(|d| d != dtype) {
                    return Err(format!(
                        "data.pkl views a {} storage as {dtype}; smelt reads tensors in their storage's type only",
                        dt_name(s.dtype)
                    ));
                }
                tensor(s, dtype, &a[1], &a[2], &a[3], "_rebuild_tensor_v3")
            }
            Global::RebuildParameter | Global::RebuildParameterWithState
                if matches!(a.len(), 3 | 4) =>
            {
                match &a[0] {
                    t @ Value::Tensor(_) => Ok(t.clone()),
                    other => Err(arg_err("_rebuild_parameter", "a tensor", other)),
                }
            }
            g => Err(format!(
                "data.pkl calls {} with {} arguments, which torch.save never does",
                global_name(g),
                a.len()
            )),
        }
    }
}

fn dt_name(d: Option<DType>) -> String {
    d.map_or("untyped".to_string(), |d| d.to_string())
}

fn global_name(g: Global) -> String {
    match g {
        Global::OrderedDict => "collections.OrderedDict".into(),
        Global::RebuildV2 => "torch._utils._rebuild_tensor_v2".into(),
        Global::RebuildV3 => "torch._utils._rebuild_tensor_v3".into(),
        Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
        Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state".into(),
        Global::Storage(d) => format!("a {} storage class", dt_name(d)),
        Global::DType(d) => format!("the dtype {d}"),
    }
}

fn arg_err(f: &str, want: &str, got: &Value) -> String {
    format!(
        "data.pkl calls torch._utils.{f} with {} where torch passes {want}",
        got.kind()
    )
}

/// The message for a global smelt does not know, naming it.
fn refused(module: &str, name: &str) -> String {
    let clip = |s: &str| s.chars().take(100).collect::<String>();
    format!(
        "data.pkl refers to `{}.{}`; smelt reads only tensors and refuses every other pickled object \
         (no pickle code is run). If you trust the file, load it in Python and save it as safetensors \
         (e.g. transformers' `save_pretrained(..., safe_serialization=True)`), or ask its author for safetensors weights",
        clip(module),
        clip(name)
    )
}

fn dims(v: &Value, what: &str, f: &str) -> R<Vec<u64>> {
    let items = match v {
        Value::Tuple(s) | Value::List(s) => &s.items,
        other => return Err(arg_err(f, &format!("a {what} tuple"), other)),
    };
    if items.len() > MAX_DIMS {
        return Err(format!(
            "data.pkl gives a tensor {} dimensions; at most {MAX_DIMS} are supported",
            items.len()
        ));
    }
    items
        .iter()
        .map(|d| match d {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            other => Err(format!(
                "data.pkl gives a tensor {what} entry that is {} (torch writes non-negative ints)",
                match other {
                    Value::Int(_) => "negative",
                    o => o.kind(),
                }
            )),
        })
        .collect()
}

fn tensor(
    s: &Storage,
    dtype: DType,
    off: &Value,
    size: &Value,
    stride: &Value,
    f: &str,
) -> R<Value> {
    let Value::Int(offset) = *off else {
        return Err(arg_err(f, "an int offset", off));
    };
    if offset < 0 {
        return Err("data.pkl gives a tensor a negative storage offset".into());
    }
    let shape = dims(size, "size", f)?;
    let stride = dims(stride, "stride", f)?;
    if shape.len() != stride.len() {
        return Err(format!(
            "data.pkl gives a tensor {} sizes but {} strides",
            shape.len(),
            stride.len()
        ));
    }
    Ok(Value::Tensor(Rc::new(TensorDesc {
        storage: s.key.clone(),
        dtype,
        offset: offset as u64,
        shape,
        stride,
    })))
}

/// Reads a `data.pkl` whose top object is a dict of tensors. Errors are plain sentences
/// (the caller adds the file's path).
pub fn load_state_dict(data: &[u8]) -> R<Vec<(String, TensorDesc)>> {
    if data.len() > MAX_PICKLE_LEN {
        return Err(format!(
            "data.pkl is {} bytes, more than the {MAX_PICKLE_LEN}-byte limit for a state dict",
            data.len()
        ));
    }
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        work: 0,
        work_cap: data.len().saturating_mul(16).max(1 << 20),
        storages: HashMap::new(),
    };
    let top = loop {
        let at = m.pos;
        let op = m
            .u8()
            .map_err(|_| "data.pkl ends before its STOP opcode (truncated file?)".to_string())?;
        match op {
            0x80 => {
                let p = m.u8()?;
                if p > 5 {
                    return Err(format!("data.pkl uses pickle protocol {p}; smelt knows 2 to 5"));
                }
            }
            0x95 => {
                m.u64()?;
            }
            b'.' => break m.pop()?,
            b'(' => {
                if m.marks.len() >= MAX_STACK {
                    return Err("data.pkl opens too many MARKs".into());
                }
                m.marks.push(m.stack.len())
            }
            b'0' => {
                m.pop()?;
            }
            b'N' => m.push(Value::None)?,
            0x88 | 0x89 => m.push(Value::Bool)?,
            b'J' => {
                let v = m.u32()? as i32;
                m.push(Value::Int(v as i64))?
            }
            b'K' => {
                let v = m.u8()?;
                m.push(Value::Int(v as i64))?
            }
            b'M' => {
                let v = m.u16()?;
                m.push(Value::Int(v as i64))?
            }
            0x8a => {
                let n = m.u8()? as usize;
                let b = m.take(n)?;
                if n > 8 {
                    return Err(format!(
                        "data.pkl has an integer of {n} bytes at byte {at}; tensors need at most 8"
                    ));
                }
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                m.push(Value::Int(v))?
            }
            b'G' => {
                m.take(8)?;
                m.push(Value::Float)?
            }
            b'X' => {
                let n = m.u32()? as usize;
                let s = m.utf8(n)?;
                m.push(Value::Str(s))?
            }
            0x8c => {
                let n = m.u8()? as usize;
                let s = m.utf8(n)?;
                m.push(Value::Str(s))?
            }
            0x8d => {
                let n = m.u64()?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                let s = m.utf8(n)?;
                m.push(Value::Str(s))?
            }
            b'}' => m.push(Value::Dict(Rc::new(Map {
                items: Vec::new(),
                depth: 1,
            })))?,
            b']' => m.push(Value::List(Rc::new(Seq {
                items: Vec::new(),
                depth: 1,
            })))?,
            b')' => m.push(Value::Tuple(Rc::new(Seq {
                items: Vec::new(),
                depth: 1,
            })))?,
            b't' => {
                let items = m.pop_mark()?;
                let s = m.seq(items)?;
                m.push(Value::Tuple(Rc::new(s)))?
            }
            b'l' => {
                let items = m.pop_mark()?;
                let s = m.seq(items)?;
                m.push(Value::List(Rc::new(s)))?
            }
            b'd' => {
                let items = m.pop_mark()?;
                m.push(Value::Dict(Rc::new(Map {
                    items: Vec::new(),
                    depth: 1,
                })))?;
                m.set_items(items)?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(m.pop()?);
                }
                items.reverse();
                let s = m.seq(items)?;
                m.push(Value::Tuple(Rc::new(s)))?
            }
            b'q' => {
                let k = m.u8()? as u32;
                m.memo_put(k)?
            }
            b'r' => {
                let k = m.u32()?;
                m.memo_put(k)?
            }
            0x94 => {
                let k = u32::try_from(m.memo.len()).unwrap_or(u32::MAX);
                m.memo_put(k)?
            }
            b'h' => {
                let k = m.u8()? as u32;
                m.memo_get(k)?
            }
            b'j' => {
                let k = m.u32()?;
                m.memo_get(k)?
            }
            b'c' => {
                let module = line(&mut m)?;
                let name = line(&mut m)?;
                m.global(&module, &name)?
            }
            0x93 => {
                let name = m.pop()?;
                let module = m.pop()?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => m.global(&module, &name)?,
                    _ => {
                        return Err(format!(
                            "data.pkl has a STACK_GLOBAL at byte {at} whose names are not strings"
                        ))
                    }
                }
            }
            b'R' => {
                let args = m.pop()?;
                let f = m.pop()?;
                let v = m.reduce(f, args)?;
                m.push(v)?
            }
            b'Q' => {
                let pid = m.pop()?;
                let v = m.persistent_load(pid)?;
                m.push(v)?
            }
            b's' => {
                let v = m.pop()?;
                let k = m.pop()?;
                m.set_items(vec![k, v])?
            }
            b'u' => {
                let items = m.pop_mark()?;
                m.set_items(items)?
            }
            b'a' => {
                let v = m.pop()?;
                m.append(vec![v])?
            }
            b'e' => {
                let items = m.pop_mark()?;
                m.append(items)?
            }
            b'b' => {
                // torch.save's only BUILD: an OrderedDict's `_metadata` attribute (module
                // versions), which smelt does not need.
                let state = m.pop()?;
                let target = m.top()?;
                if !matches!(target, Value::Dict(_)) || !matches!(state, Value::Dict(_) | Value::Tuple(_) | Value::None) {
                    return Err(format!(
                        "data.pkl sets the state of {} at byte {at}; torch.save does that only for an OrderedDict",
                        target.kind()
                    ));
                }
            }
            other => {
                return Err(format!(
                    "data.pkl uses pickle opcode 0x{other:02x} ({}) at byte {at}, which torch.save never writes for a state dict",
                    opname(other)
                ))
            }
        }
    };
    if m.pos != data.len() {
        // Trailing bytes are harmless to Python but say the file is not what it claims.
        return Err(format!(
            "data.pkl has {} bytes after its STOP opcode; the file is damaged",
            data.len() - m.pos
        ));
    }
    let Value::Dict(d) = top else {
        return Err(format!(
            "data.pkl holds {}, not a dict of tensors (a state dict)",
            top.kind()
        ));
    };
    let mut out = Vec::with_capacity(d.items.len());
    let mut seen = std::collections::HashSet::new();
    let mut dims_out = 0usize;
    for (k, v) in &d.items {
        let Value::Str(k) = k else {
            return Err(format!(
                "data.pkl's state dict has a key that is {}, not a tensor name",
                k.kind()
            ));
        };
        let Value::Tensor(t) = v else {
            return Err(format!(
                "data.pkl's entry {k} is {}, not a tensor; smelt reads a plain state dict (name -> tensor). \
                 Save `model.state_dict()` or convert the file to safetensors",
                v.kind()
            ));
        };
        if !seen.insert(k.clone()) {
            return Err(format!("data.pkl lists tensor {k} twice"));
        }
        // Shared values could make a small pickle describe a huge list of tensors: every
        // dimension handed out must be paid for by a byte of input (a real state dict spends
        // dozens of bytes per tensor).
        dims_out += 2 * t.shape.len();
        if dims_out > data.len() {
            return Err(
                "data.pkl describes more tensor dimensions than a pickle of its size can hold; \
                 the file is damaged or was not written by torch.save"
                    .into(),
            );
        }
        out.push((k.to_string(), (**t).clone()));
    }
    Ok(out)
}

/// A text line of a GLOBAL opcode (module or name), printable ASCII only.
fn line(m: &mut Machine<'_>) -> R<String> {
    let rest = &m.data[m.pos..];
    let n = rest
        .iter()
        .take(256)
        .position(|&c| c == b'\n')
        .ok_or_else(|| {
            format!(
                "data.pkl has a GLOBAL at byte {} without a proper name",
                m.pos
            )
        })?;
    let s = &rest[..n];
    if !s.iter().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "data.pkl has a GLOBAL at byte {} whose name is not printable ASCII",
            m.pos
        ));
    }
    m.pos += n + 1;
    Ok(String::from_utf8_lossy(s).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{'w': tensor}` as protocol 2 writes it, by hand (the real fixtures come from torch),
    /// with `global` as the function that rebuilds the tensor.
    fn tiny(global: &[u8]) -> Vec<u8> {
        let mut p = b"\x80\x02}q\x00(X\x01\x00\x00\x00wc".to_vec();
        p.extend_from_slice(global);
        p.extend_from_slice(
            b"q\x01((X\x07\x00\x00\x00storagectorch\nBFloat16Storage\nX\x01\x00\x00\x000\
              X\x03\x00\x00\x00cpuK\x06tQK\x00K\x02K\x03\x86K\x03K\x01\x86\x89\
              ccollections\nOrderedDict\n)RtRu.",
        );
        p
    }

    #[test]
    fn reads_a_tensor_and_refuses_other_globals() {
        let t = load_state_dict(&tiny(b"torch._utils\n_rebuild_tensor_v2\n")).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, "w");
        assert_eq!(
            t[0].1,
            TensorDesc {
                storage: "0".into(),
                dtype: DType::BF16,
                offset: 0,
                shape: vec![2, 3],
                stride: vec![3, 1],
            }
        );
        let e = load_state_dict(&tiny(b"os\nsystem\n")).unwrap_err();
        assert!(e.contains("`os.system`"), "{e}");
    }

    #[test]
    fn every_prefix_is_an_error_not_a_panic() {
        let ok = tiny(b"torch._utils\n_rebuild_tensor_v2\n");
        for n in 0..ok.len() {
            assert!(load_state_dict(&ok[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn one_tensor_under_many_names_is_bounded() {
        // A 64-dimension tensor memoized once, then listed under 200 names by BINGET: each
        // name costs ~10 bytes of pickle but would hand out 128 dimensions.
        let mut p = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n\
              ((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000\
              X\x03\x00\x00\x00cpuK\x01tQK\x00("
            .to_vec();
        p.extend(std::iter::repeat_n(*b"K\x01", 64).flatten());
        p.extend_from_slice(b"t(");
        p.extend(std::iter::repeat_n(*b"K\x01", 64).flatten());
        p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRq\x01");
        let one = {
            let mut q = p.clone();
            q.extend_from_slice(b"u.");
            q
        };
        let t = load_state_dict(&one).unwrap();
        assert_eq!(t[0].1.shape.len(), 64);
        for i in 0..200u32 {
            let k = format!("{i:05}");
            p.push(b'X');
            p.extend_from_slice(&(k.len() as u32).to_le_bytes());
            p.extend_from_slice(k.as_bytes());
            p.extend_from_slice(b"h\x01");
        }
        p.extend_from_slice(b"u.");
        let e = load_state_dict(&p).unwrap_err();
        assert!(e.contains("more tensor dimensions"), "{e}");
    }

    #[test]
    fn memo_doubling_is_bounded() {
        // t = (); repeat { t = (t, t) } — shared values, so no blow-up; depth is refused.
        let mut p = vec![0x80, 2, b')', b'q', 0];
        for _ in 0..40 {
            p.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let e = load_state_dict(&p).unwrap_err();
        assert!(e.contains("deep"), "{e}");
    }
}
