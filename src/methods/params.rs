//! What a method's parameters are (names, kinds, scopes, defaults) and what they resolve to
//! for one tensor. The recipe parser fills these in; the methods read them.

use std::fmt;

use super::MethodInfo;

/// The type a parameter's evaluated value must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Float,
    Bool,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Float => "number",
            Kind::Bool => "boolean",
        })
    }
}

/// A resolved parameter value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value1 {
    Float(f64),
    Bool(bool),
}

impl fmt::Display for Value1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value1::Float(x) => write!(f, "{}", fmt_num(*x)),
            Value1::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Shortest text for a number (`0.5`, `1`, `0.30000001`).
pub fn fmt_num(x: f64) -> String {
    let s = format!("{x}");
    if s.len() > 10 {
        format!("{x:.6}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        s
    }
}

/// Where a parameter is set and to which inputs it applies (mergekit's scopes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One value per output tensor (`parameters:` at the top or slice level).
    Shared,
    /// One value per input model, base included.
    Input,
    /// One value per input model other than the base.
    NonBase,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Default {
    Required,
    /// Optional with no value (the method then does without it).
    Unset,
    Float(f64),
    Bool(bool),
}

#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub default: Default,
    pub help: &'static str,
}

pub const fn p(
    name: &'static str,
    kind: Kind,
    scope: Scope,
    default: Default,
    help: &'static str,
) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        scope,
        default,
        help,
    }
}

/// A tensor's parameters after gradients, filters, precedence and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// By the method's shared parameters, in spec order.
    pub shared: Vec<(&'static str, Option<Value1>)>,
    /// Per merged input, in order (the base is not among them).
    pub per_input: Vec<Vec<(&'static str, Option<Value1>)>>,
}

impl Params {
    /// Every parameter of `method` at its default for `inputs` merged inputs, with `set`
    /// overriding by name (benchmarks and tests build parameters without a recipe).
    pub fn for_method(method: &MethodInfo, inputs: usize, set: &[(&str, Value1)]) -> Params {
        let value = |p: &ParamSpec| {
            set.iter()
                .find(|(n, _)| *n == p.name)
                .map(|(_, v)| *v)
                .or(match p.default {
                    Default::Float(x) => Some(Value1::Float(x)),
                    Default::Bool(b) => Some(Value1::Bool(b)),
                    Default::Required | Default::Unset => None,
                })
        };
        Params {
            shared: method
                .params
                .iter()
                .filter(|p| p.scope == Scope::Shared)
                .map(|p| (p.name, value(p)))
                .collect(),
            per_input: (0..inputs)
                .map(|_| {
                    method
                        .params
                        .iter()
                        .filter(|p| p.scope != Scope::Shared)
                        .map(|p| (p.name, value(p)))
                        .collect()
                })
                .collect(),
        }
    }

    pub fn shared_f(&self, name: &str) -> f64 {
        match self.shared.iter().find(|(n, _)| *n == name) {
            Some((_, Some(Value1::Float(x)))) => *x,
            other => panic!("shared float parameter {name} not resolved: {other:?}"),
        }
    }
    /// A shared float parameter that may be unset.
    pub fn shared_opt(&self, name: &str) -> Option<f64> {
        self.shared
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| match v {
                Some(Value1::Float(x)) => Some(*x),
                _ => None,
            })
    }
    pub fn shared_b(&self, name: &str) -> bool {
        match self.shared.iter().find(|(n, _)| *n == name) {
            Some((_, Some(Value1::Bool(x)))) => *x,
            other => panic!("shared bool parameter {name} not resolved: {other:?}"),
        }
    }
    /// Float parameter of model input `i` (index into `per_input`), if set.
    pub fn input_f(&self, i: usize, name: &str) -> Option<f64> {
        self.per_input[i]
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| match v {
                Some(Value1::Float(x)) => Some(*x),
                _ => None,
            })
    }
}
