//! Parameter values as mergekit writes them: scalars, gradients (lists interpolated over the
//! layer position `t`), and `{filter, value}` lists matched by substring of the tensor name.

use std::fmt;

use serde_norway::Value;

#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Num(f64),
    Bool(bool),
    Str(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Num(x) => write!(f, "{x}"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Str(s) => write!(f, "{s:?}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Conditional {
    pub filter: Option<String>,
    pub value: Setting,
}

/// One parameter's setting, before it is evaluated for a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Scalar(Scalar),
    /// A gradient: numbers are interpolated piecewise-linearly over `t`; other scalars are
    /// picked by `int(t * (len - 1))`.
    List(Vec<Scalar>),
    /// The first conditional whose filter matches wins.
    Cond(Vec<Conditional>),
}

pub use crate::methods::params::{fmt_num, Kind, Value1};

fn scalar_from(v: &Value) -> Option<Scalar> {
    match v {
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        Value::Number(n) => n.as_f64().map(Scalar::Num),
        Value::String(s) => Some(Scalar::Str(s.clone())),
        _ => None,
    }
}

fn scalar_or_gradient(v: &Value) -> Result<Setting, String> {
    if let Some(s) = scalar_from(v) {
        return Ok(Setting::Scalar(s));
    }
    if let Value::Sequence(items) = v {
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            out.push(scalar_from(it).ok_or_else(|| {
                format!(
                    "a gradient must be a list of plain values, found {}",
                    describe(it)
                )
            })?);
        }
        return Ok(Setting::List(out));
    }
    Err(format!(
        "expected a value or a gradient list, found {}",
        describe(v)
    ))
}

fn conditional(v: &Value) -> Result<Conditional, String> {
    let Value::Mapping(m) = v else {
        return Err(format!(
            "expected a {{filter, value}} mapping, found {}",
            describe(v)
        ));
    };
    let mut filter = None;
    let mut value = None;
    for (k, val) in m {
        match k.as_str() {
            Some("filter") => {
                filter = match val {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    other => {
                        return Err(format!(
                            "`filter` must be a string, found {}",
                            describe(other)
                        ))
                    }
                }
            }
            Some("value") => value = Some(scalar_or_gradient(val)?),
            _ => {
                return Err(format!(
                    "unknown key {} in a conditional parameter; expected `filter` and `value`",
                    describe(k)
                ))
            }
        }
    }
    let value = value.ok_or("a conditional parameter needs a `value`")?;
    Ok(Conditional { filter, value })
}

/// A mapping key as an error message names it: the string itself, else its description.
pub fn key_name(key: &Value) -> String {
    key.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| describe(key))
}

pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("{n}"),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

impl Setting {
    /// Reads a setting from YAML. `None` means the value was null (unset).
    pub fn from_yaml(v: &Value) -> Result<Option<Setting>, String> {
        match v {
            Value::Null => Ok(None),
            Value::Mapping(_) => Ok(Some(Setting::Cond(vec![conditional(v)?]))),
            Value::Sequence(items) if !items.is_empty() && items.iter().all(|i| matches!(i, Value::Mapping(_))) => {
                Ok(Some(Setting::Cond(items.iter().map(conditional).collect::<Result<_, _>>()?)))
            }
            Value::Sequence(items) if items.iter().any(|i| matches!(i, Value::Mapping(_))) => {
                Err("a list must hold either plain values (a gradient) or {filter, value} mappings, not both".into())
            }
            _ => scalar_or_gradient(v).map(Some),
        }
    }

    /// Evaluates for a tensor at layer position `t` in [0, 1]. `None` when no conditional
    /// matches (the next, lower-precedence setting is then consulted).
    pub fn eval(&self, tensor: &str, t: f64, kind: Kind) -> Result<Option<Value1>, String> {
        match self {
            Setting::Scalar(s) => validate(s, kind).map(Some),
            Setting::List(items) => {
                if items.is_empty() {
                    return Ok(None);
                }
                let vals = items
                    .iter()
                    .map(|s| validate(s, kind))
                    .collect::<Result<Vec<_>, _>>()?;
                if kind != Kind::Float {
                    let i = (t * (vals.len() - 1) as f64) as usize;
                    return Ok(Some(vals[i.min(vals.len() - 1)]));
                }
                let nums: Vec<f64> = vals
                    .iter()
                    .map(|v| match v {
                        Value1::Float(x) => *x,
                        Value1::Bool(_) => unreachable!(),
                    })
                    .collect();
                let scaled = t * (nums.len() - 1) as f64;
                let i0 = (scaled as usize).min(nums.len() - 1);
                let i1 = (i0 + 1).min(nums.len() - 1);
                let frac = scaled - i0 as f64;
                Ok(Some(Value1::Float(
                    (1.0 - frac) * nums[i0] + frac * nums[i1],
                )))
            }
            Setting::Cond(conds) => {
                for c in conds {
                    let hit = match c.filter.as_deref() {
                        None | Some("*") => true,
                        Some(f) => tensor.contains(f),
                    };
                    if hit {
                        return c.value.eval(tensor, t, kind);
                    }
                }
                Ok(None)
            }
        }
    }
}

pub(crate) fn validate(s: &Scalar, kind: Kind) -> Result<Value1, String> {
    match (kind, s) {
        (Kind::Float, Scalar::Num(x)) => Ok(Value1::Float(*x)),
        (Kind::Float, Scalar::Str(t)) => t
            .trim()
            .parse::<f64>()
            .map(Value1::Float)
            .map_err(|_| format!("expected a number, found {s}")),
        (Kind::Bool, Scalar::Bool(b)) => Ok(Value1::Bool(*b)),
        (Kind::Bool, Scalar::Num(x)) if *x == 0.0 || *x == 1.0 => Ok(Value1::Bool(*x == 1.0)),
        (Kind::Bool, Scalar::Str(t)) => match t.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(Value1::Bool(true)),
            "false" | "no" | "off" | "0" => Ok(Value1::Bool(false)),
            _ => Err(format!("expected true or false, found {s}")),
        },
        (k, s) => Err(format!("expected a {k}, found {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Setting {
        Setting::from_yaml(&serde_norway::from_str(s).unwrap())
            .unwrap()
            .unwrap()
    }

    fn f(s: &Setting, name: &str, t: f64) -> Option<f64> {
        s.eval(name, t, Kind::Float).unwrap().map(|v| match v {
            Value1::Float(x) => x,
            _ => panic!(),
        })
    }

    #[test]
    fn gradient_interpolates() {
        let g = yaml("[0.0, 0.5, 1.0]");
        assert_eq!(f(&g, "x", 0.0), Some(0.0));
        assert_eq!(f(&g, "x", 0.25), Some(0.25));
        assert_eq!(f(&g, "x", 0.5), Some(0.5));
        assert_eq!(f(&g, "x", 1.0), Some(1.0));
        // mergekit's example: 5 entries over t = 1/3
        let g = yaml("[0, 0.5, 0.3, 0.7, 1]");
        let want = (1.0 - (4.0f64 / 3.0 - 1.0)) * 0.5 + (4.0f64 / 3.0 - 1.0) * 0.3;
        assert!((f(&g, "x", 1.0 / 3.0).unwrap() - want).abs() < 1e-15);
    }

    #[test]
    fn filters_first_match_wins() {
        let s =
            yaml("[{filter: self_attn, value: [0, 1]}, {filter: mlp, value: 0.7}, {value: 0.5}]");
        assert_eq!(
            f(&s, "model.layers.0.self_attn.q_proj.weight", 0.5),
            Some(0.5)
        );
        assert_eq!(f(&s, "model.layers.0.mlp.up_proj.weight", 0.5), Some(0.7));
        assert_eq!(f(&s, "model.norm.weight", 0.5), Some(0.5));
        let none = yaml("[{filter: mlp, value: 1}]");
        assert_eq!(f(&none, "model.norm.weight", 0.0), None);
    }

    #[test]
    fn bools_and_errors() {
        let b = yaml("true");
        assert_eq!(
            b.eval("x", 0.0, Kind::Bool).unwrap(),
            Some(Value1::Bool(true))
        );
        assert!(yaml("\"abc\"").eval("x", 0.0, Kind::Float).is_err());
        assert!(Setting::from_yaml(&serde_norway::from_str("[1, {value: 2}]").unwrap()).is_err());
        assert!(
            Setting::from_yaml(&serde_norway::from_str("{filter: a, valu: 2}").unwrap()).is_err()
        );
    }
}
