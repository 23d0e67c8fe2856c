//! `--set path.to.field=value`: overrides applied to the YAML tree before it is typed, so they are
//! checked exactly like the file.

use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::{Mapping, Value};

/// Applies one `path.to.field=value` override; the value is parsed as YAML (`3e-4`, `true`,
/// `[0.9, 0.99]`, `gemma3-tiny`).
pub fn apply_override(tree: &mut Value, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {assignment}: expected path.to.field=value"))?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(str::is_empty) {
        bail!("--set {assignment}: `{path}` is not a field path like train.lr");
    }
    let value: Value = serde_yaml::from_str(raw)
        .with_context(|| format!("--set {assignment}: cannot parse value `{raw}`"))?;
    let mut node = tree;
    let mut walked = Vec::new();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        walked.push(*part);
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(map) = node else {
            bail!(
                "--set {assignment}: `{}` is a value, not a section",
                walked[..walked.len() - 1].join(".")
            );
        };
        let key = Value::String(part.to_string());
        if i == parts.len() - 1 {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert(Value::Null);
    }
    unreachable!("the path has at least one part")
}
