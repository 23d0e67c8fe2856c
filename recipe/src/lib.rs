//! Recipes: YAML files mapped to typed structs. Unknown fields are rejected, and every error names
//! the field path, the bad value and what is allowed, e.g.
//! `train.lr: expected a positive number, got "fast"`.
//! `--set path.to.field=value` overrides are applied to the YAML tree before it is typed, so they
//! are checked exactly like the file.
//!
//! One file per section; [`value`] holds the validated scalars, [`overrides`] the `--set` logic,
//! and this file the [`Recipe`] itself with the one path that types, validates and reports.

pub mod checkpoint;
pub mod data;
pub mod deploy;
pub mod drafter;
pub mod finetune;
pub mod link;
pub mod model;
pub mod overrides;
pub mod run;
pub mod sync;
pub mod train;
pub mod value;

pub use checkpoint::*;
pub use data::*;
pub use link::*;
pub use model::*;
pub use overrides::apply_override;
pub use run::*;
pub use sync::*;
pub use train::*;
pub use value::*;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub run: RunSection,
    /// Multi-learner synchronisation (`atoll simulate`, later `atoll run`).
    #[serde(default)]
    pub sync: SyncSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// Launch material for real clusters (`atoll deploy`); read by nothing else.
    #[serde(default, skip_serializing_if = "deploy::DeploySection::is_default")]
    pub deploy: deploy::DeploySection,
    /// LoRA adapters for `atoll finetune`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<finetune::LoraSection>,
    /// Instruction data and memory switches for `atoll finetune`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<finetune::FinetuneSection>,
}

/// A section with every field at its serde default: deserialising an empty mapping means the
/// `Default` impls and the `#[serde(default = ...)]` attributes cannot drift apart.
pub(crate) fn field_defaults<T: serde::de::DeserializeOwned>() -> T {
    serde_yaml::from_value(Value::Mapping(Mapping::new())).expect("every field has a default")
}

mod defaults {
    pub fn seed() -> u64 {
        1234
    }
}

impl Recipe {
    /// Parses recipe YAML text, applies `--set` overrides, and types it.
    pub fn from_yaml(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let mut tree: Value =
            serde_yaml::from_str(text).map_err(|e| anyhow!("{origin}: invalid YAML: {e}"))?;
        if tree.is_null() {
            tree = Value::Mapping(Mapping::new());
        }
        if !tree.is_mapping() {
            bail!(
                "{origin}: a recipe must be a YAML mapping of sections (model, data, train, run)"
            );
        }
        for o in overrides {
            apply_override(&mut tree, o)?;
        }
        let recipe: Recipe = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." {
                anyhow!("{origin}: {inner}")
            } else {
                anyhow!("{origin}: {path}: {inner}")
            }
        })?;
        recipe.validate().map_err(|e| anyhow!("{origin}: {e}"))?;
        Ok(recipe)
    }

    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        let mut recipe = Self::from_yaml(&text, &path.display().to_string(), overrides)?;
        if recipe.name.is_none() {
            recipe.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        Ok(recipe)
    }

    fn validate(&self) -> Result<()> {
        match (&self.model.preset, &self.model.init_from) {
            (None, None) => bail!("model: set either model.preset (e.g. gemma3-tiny) or model.init_from (a checkpoint directory)"),
            (Some(_), Some(_)) => bail!("model: model.preset and model.init_from are mutually exclusive"),
            _ => {}
        }
        if self.sync.quorum.0 > self.sync.learners.0 {
            bail!(
                "sync.quorum: expected at most sync.learners ({}), got {}",
                self.sync.learners.0,
                self.sync.quorum.0
            );
        }
        let regions = self.sync.region_names();
        for key in self.sync.wan.keys() {
            if key != "all" && !regions.contains(key) {
                bail!(
                    "sync.wan.{key}: not a region of this job (regions: {}; or `all`)",
                    regions.join(", ")
                );
            }
        }
        if !self.sync.regions.is_empty() {
            if self.sync.regions.len() != self.sync.learners.0 {
                bail!(
                    "sync.regions: {} regions named for sync.learners = {}; name one per learner",
                    self.sync.regions.len(),
                    self.sync.learners.0
                );
            }
            let mut seen = std::collections::BTreeSet::new();
            for r in &self.sync.regions {
                let valid = !r.is_empty()
                    && r.len() <= 64
                    && r.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !valid {
                    bail!("sync.regions: {r:?} is not a valid region name (letters, digits, '-', '_'; at most 64)");
                }
                if !seen.insert(r) {
                    bail!("sync.regions: region {r:?} is listed twice");
                }
            }
        }
        if self.sync.speeds.len() > self.sync.learners.0 {
            bail!(
                "sync.speeds: {} speeds given for {} learners",
                self.sync.speeds.len(),
                self.sync.learners.0
            );
        }
        // QUIC's smallest datagram (1200 bytes) plus IPv6 and UDP headers.
        if self.sync.link.mtu < 1248 {
            bail!(
                "sync.link.mtu: {} bytes is below QUIC's minimum path MTU of 1248 (1200-byte datagrams plus IPv6 and UDP headers)",
                self.sync.link.mtu
            );
        }
        atoll_coordinator::plan::check_part_values(self.sync.link.part_values)
            .map_err(|e| anyhow!("sync.link.part_values: {e}"))?;
        if !(0..=22).contains(&self.sync.zstd_level) {
            bail!(
                "sync.zstd_level: expected 0 (off) to 22, got {}",
                self.sync.zstd_level
            );
        }
        if let Some(p) = &self.model.preset {
            if !PRESET_NAMES.contains(&p.as_str()) {
                bail!("model.preset: {}", unknown_preset(p));
            }
        }
        self.deploy.validate(&regions)?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("run")
    }

    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, sets: &[&str]) -> Result<Recipe> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::from_yaml(text, "r.yaml", &sets)
    }

    fn err(text: &str, sets: &[&str]) -> String {
        format!("{:#}", parse(text, sets).unwrap_err())
    }

    #[test]
    fn defaults_fill_everything_but_the_model() {
        let r = parse("model: {preset: gemma3-tiny}", &[]).unwrap();
        assert_eq!(r.train, TrainSection::default());
        assert!(
            r.run.save_final,
            "an absent run section keeps the field defaults"
        );
        assert_eq!(r.train.lr.0, 3e-3);
        assert_eq!(r.data.corpus, "builtin:tinyshakespeare");
    }

    #[test]
    fn errors_name_the_field_the_value_and_what_is_allowed() {
        let e = err("model: {preset: gemma3-tiny}\ntrain: {lr: fast}", &[]);
        assert!(
            e.contains("train.lr: expected a positive number, got \"fast\""),
            "{e}"
        );
        let e = err("model: {preset: gemma3-tiny}\ntrain: {batch_size: -2}", &[]);
        assert!(
            e.contains("train.batch_size: expected a positive integer, got -2"),
            "{e}"
        );
        let e = err(
            "model: {preset: gemma3-tiny}\ntrain: {betas: [0.9, 1.5]}",
            &[],
        );
        assert!(
            e.contains("train.betas[1]: expected a number in [0, 1), got 1.5"),
            "{e}"
        );
        let e = err("model: {preset: gemma3-tiny, dtype: f8}", &[]);
        assert!(
            e.contains("model.dtype: unknown variant `f8`, expected `f32` or `bf16`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let e = err("model: {preset: gemma3-tiny}\ntrain: {lrr: 0.1}", &[]);
        assert!(
            e.contains("train.lrr: unknown field `lrr`, expected one of"),
            "{e}"
        );
        let e = err("model: {preset: gemma3-tiny}\ntrian: {}", &[]);
        assert!(e.contains("unknown field `trian`"), "{e}");
    }

    #[test]
    fn set_overrides_are_typed_like_the_file() {
        let r = parse(
            "model: {preset: gemma3-tiny}",
            &[
                "train.lr=1e-4",
                "train.max_steps=30",
                "data.tokenizer.vocab_size=512",
            ],
        )
        .unwrap();
        assert_eq!(r.train.lr.0, 1e-4);
        assert_eq!(r.train.max_steps.0, 30);
        assert_eq!(r.data.tokenizer.vocab_size.0, 512);
        let e = err("model: {preset: gemma3-tiny}", &["train.lr=fast"]);
        assert!(
            e.contains("train.lr: expected a positive number, got \"fast\""),
            "{e}"
        );
        let e = err(
            "model: {preset: gemma3-tiny}\ntrain: {lr: 0.1}",
            &["train.lr.x=1"],
        );
        assert!(e.contains("`train.lr` is a value, not a section"), "{e}");
        let e = err("model: {preset: gemma3-tiny}", &["train.lr.x=1"]);
        assert!(
            e.contains("train.lr: invalid type: map, expected a positive number"),
            "{e}"
        );
        assert!(err("model: {preset: gemma3-tiny}", &["novalue"])
            .contains("expected path.to.field=value"));
    }

    #[test]
    fn sync_values_are_checked() {
        let base = "model: {preset: gemma3-tiny}";
        assert!(err(base, &["sync.quorum=5", "sync.learners=4"])
            .contains("sync.quorum: expected at most sync.learners (4), got 5"));
        assert!(err(base, &["sync.h=0"]).contains("sync.h: expected a positive integer, got 0"));
        assert!(err(base, &["sync.link.mtu=1000"])
            .contains("sync.link.mtu: 1000 bytes is below QUIC's minimum path MTU of 1248"));
        assert_eq!(
            parse(base, &["sync.link.mtu=9000"]).unwrap().sync.link.mtu,
            9000
        );
        assert_eq!(parse(base, &[]).unwrap().sync.link.mtu, 1500);
        assert!(err(base, &["sync.codec=int3"]).contains("sync.codec: unknown variant `int3`"));
        assert!(err(base, &["sync.outer_lr=-0.7"])
            .contains("sync.outer_lr: expected a positive number, got -0.7"));
        assert!(err(base, &["sync.mode=async"]).contains("sync.mode: unknown variant `async`"));
        let r = parse(base, &["sync.mode=ddp", "sync.speeds=[1.0, 0.5]"]).unwrap();
        assert_eq!(r.sync.mode, SyncMode::Ddp);
        assert_eq!(r.sync.speeds.len(), 2);
    }

    #[test]
    fn model_choice_is_checked() {
        assert!(err("seed: 1", &[]).contains("missing field `model`"));
        assert!(err("model: {}", &[]).contains("set either model.preset"));
        assert!(err("model: {preset: gemma9}", &[]).contains("unknown model preset `gemma9`"));
    }

    #[test]
    fn resolved_recipe_round_trips_through_yaml() {
        let r = parse("model: {preset: gemma3-tiny}\ntrain: {lr: 0.01}", &[]).unwrap();
        let again = parse(&r.to_yaml().unwrap(), &[]).unwrap();
        assert_eq!(r, again);
    }
}
