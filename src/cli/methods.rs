//! `smelt methods`: the merge methods with their parameters and defaults.

use std::io::Write as _;

use anyhow::Context as _;

use smelt::methods::{self, Default, Scope};

#[derive(clap::Args)]
pub struct MethodsArgs {
    /// Show only this method.
    pub name: Option<String>,
}

pub fn run(args: MethodsArgs) -> anyhow::Result<()> {
    let name = args.name;
    let list: Vec<_> = match &name {
        Some(n) => vec![methods::find(n).with_context(|| {
            let hint = methods::suggest(n)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            format!("unknown method `{n}`{hint}")
        })?],
        None => methods::all().iter().collect(),
    };
    let mut o = std::io::stdout().lock();
    for m in list {
        writeln!(o, "{} — {}", m.name, m.pretty)?;
        writeln!(o, "  {}", m.summary)?;
        writeln!(o, "  paper: {}", m.reference)?;
        writeln!(
            o,
            "  base model: {}",
            match m.base {
                methods::BasePolicy::Required => "required",
                methods::BasePolicy::Optional => "optional (merges task vectors when given)",
                methods::BasePolicy::Ignored => "not used",
            }
        )?;
        for p in &m.params {
            let scope = match p.scope {
                Scope::Shared => "global",
                Scope::Input => "per model",
                Scope::NonBase => "per model (not the base)",
            };
            let def = match p.default {
                Default::Required => "required".to_string(),
                Default::Unset => "unset".to_string(),
                Default::Float(x) => format!("default {x}"),
                Default::Bool(b) => format!("default {b}"),
            };
            writeln!(
                o,
                "    {:<10} {:<7} {:<26} {:<14} {}",
                p.name,
                p.kind.to_string(),
                scope,
                def,
                p.help
            )?;
        }
        writeln!(o)?;
    }
    Ok(())
}
