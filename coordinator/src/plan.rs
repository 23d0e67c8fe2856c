//! The fragment plan: a deterministic partition of the model's tensors into P fragments,
//! derived only from tensor names and shapes, so every learner and the syncer compute the same one.
//!
//! Embedding tensors (`embed_tokens`, an untied `lm_head`) form a fragment of their own (merged
//! with a plain weighted mean); the other tensors are bin-packed into the remaining P − 1
//! fragments by longest-processing-time-first (largest tensor first, ties by name, into the
//! lightest fragment, ties by index), which keeps the largest fragment within 4/3 of optimal.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<u64>,
}

impl TensorInfo {
    pub fn new(name: impl Into<String>, shape: &[u64]) -> Self {
        TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Embeddings are not near-orthogonal across learners, so they are averaged, not RDA-merged.
pub fn is_embedding(name: &str) -> bool {
    name.contains("embed_tokens") || name.ends_with("lm_head.weight")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fragment {
    pub id: usize,
    /// Indices into the plan's tensor list, in that list's order.
    pub tensors: Vec<usize>,
    pub elements: u64,
    pub embedding: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FragmentPlan {
    pub tensors: Vec<TensorInfo>,
    pub fragments: Vec<Fragment>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("sync.fragments must be at least 1")]
    NoFragments,
    #[error(
        "sync.fragments = {fragments} but the model has only {tensors} tensors to spread over them"
    )]
    TooManyFragments { fragments: usize, tensors: usize },
    #[error("tensor names must be unique; `{0}` appears twice")]
    DuplicateName(String),
}

impl FragmentPlan {
    /// Values in the model's largest tensor: what bounds one data-plane part.
    pub fn largest_tensor(&self) -> u64 {
        self.tensors
            .iter()
            .map(TensorInfo::elements)
            .max()
            .unwrap_or(0)
    }

    pub fn new(tensors: Vec<TensorInfo>, fragments: usize) -> Result<Self, PlanError> {
        if fragments == 0 {
            return Err(PlanError::NoFragments);
        }
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(PlanError::DuplicateName(w[0].to_string()));
        }
        let (embed, dense): (Vec<usize>, Vec<usize>) =
            (0..tensors.len()).partition(|&i| is_embedding(&tensors[i].name));
        let separate_embedding = fragments >= 2 && !embed.is_empty();
        let dense_bins = if separate_embedding {
            fragments - 1
        } else {
            fragments
        };
        let packable = if separate_embedding {
            dense.len()
        } else {
            tensors.len()
        };
        if packable < dense_bins {
            return Err(PlanError::TooManyFragments {
                fragments,
                tensors: tensors.len(),
            });
        }
        let mut order: Vec<usize> = if separate_embedding {
            dense
        } else {
            (0..tensors.len()).collect()
        };
        order.sort_by(|&a, &b| {
            tensors[b]
                .elements()
                .cmp(&tensors[a].elements())
                .then_with(|| tensors[a].name.cmp(&tensors[b].name))
        });
        let mut bins: Vec<(u64, Vec<usize>)> = vec![(0, Vec::new()); dense_bins];
        for i in order {
            let lightest = (0..bins.len())
                .min_by_key(|&b| (bins[b].0, b))
                .expect("at least one bin");
            bins[lightest].0 += tensors[i].elements();
            bins[lightest].1.push(i);
        }
        let mut out = Vec::with_capacity(fragments);
        if separate_embedding {
            let elements = embed.iter().map(|&i| tensors[i].elements()).sum();
            out.push(Fragment {
                id: 0,
                tensors: embed,
                elements,
                embedding: true,
            });
        }
        for (elements, mut members) in bins {
            members.sort_unstable();
            out.push(Fragment {
                id: out.len(),
                tensors: members,
                elements,
                embedding: false,
            });
        }
        Ok(FragmentPlan {
            tensors,
            fragments: out,
        })
    }

    /// The element count of each tensor of fragment `p`, in the fragment's order.
    pub fn fragment_shapes(&self, p: usize) -> Vec<u64> {
        self.fragments[p]
            .tensors
            .iter()
            .map(|&t| self.tensors[t].elements())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.fragments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fragments.is_empty()
    }

    /// A stable fingerprint of the plan (FNV-1a over names, shapes and assignment), compared at
    /// join time so a learner with a different model is refused.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= *b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for f in &self.fragments {
            eat(&(f.id as u64).to_le_bytes());
            for &t in &f.tensors {
                eat(self.tensors[t].name.as_bytes());
                for d in &self.tensors[t].shape {
                    eat(&d.to_le_bytes());
                }
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Vec<TensorInfo> {
        let mut t = vec![TensorInfo::new("model.embed_tokens.weight", &[1000, 64])];
        for l in 0..4 {
            for (n, s) in [
                ("q_proj", [128, 64]),
                ("k_proj", [64, 64]),
                ("o_proj", [64, 128]),
                ("up_proj", [256, 64]),
            ] {
                t.push(TensorInfo::new(format!("model.layers.{l}.{n}.weight"), &s));
            }
            t.push(TensorInfo::new(
                format!("model.layers.{l}.norm.weight"),
                &[64],
            ));
        }
        t.push(TensorInfo::new("model.norm.weight", &[64]));
        t
    }

    #[test]
    fn the_plan_is_a_partition_with_the_embedding_alone() {
        let plan = FragmentPlan::new(model(), 4).unwrap();
        assert_eq!(plan.len(), 4);
        let mut seen: Vec<usize> = plan
            .fragments
            .iter()
            .flat_map(|f| f.tensors.clone())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..plan.tensors.len()).collect::<Vec<_>>());
        assert!(plan.fragments[0].embedding && plan.fragments[0].tensors == vec![0]);
        let loads: Vec<u64> = plan.fragments[1..].iter().map(|f| f.elements).collect();
        let (max, min) = (*loads.iter().max().unwrap(), *loads.iter().min().unwrap());
        assert!(max as f64 <= 1.34 * min as f64, "balanced: {loads:?}");
    }

    #[test]
    fn the_plan_is_identical_across_runs_and_input_orders() {
        let a = FragmentPlan::new(model(), 3).unwrap();
        assert_eq!(a, FragmentPlan::new(model(), 3).unwrap());
        let mut shuffled = model();
        shuffled.reverse();
        let b = FragmentPlan::new(shuffled, 3).unwrap();
        let names = |p: &FragmentPlan| -> Vec<Vec<String>> {
            p.fragments
                .iter()
                .map(|f| {
                    let mut n: Vec<String> = f
                        .tensors
                        .iter()
                        .map(|&i| p.tensors[i].name.clone())
                        .collect();
                    n.sort();
                    n
                })
                .collect()
        };
        assert_eq!(names(&a), names(&b));
        assert_eq!(
            a.fingerprint(),
            FragmentPlan::new(model(), 3).unwrap().fingerprint()
        );
        assert_ne!(
            a.fingerprint(),
            FragmentPlan::new(model(), 4).unwrap().fingerprint()
        );
    }

    #[test]
    fn bad_fragment_counts_are_refused() {
        assert_eq!(FragmentPlan::new(model(), 0), Err(PlanError::NoFragments));
        assert!(matches!(
            FragmentPlan::new(model(), 100),
            Err(PlanError::TooManyFragments { .. })
        ));
        let one = FragmentPlan::new(model(), 1).unwrap();
        assert_eq!(one.fragments[0].tensors.len(), model().len());
    }
}
