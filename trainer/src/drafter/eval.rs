//! Greedy speculative decoding, counted: the drafter proposes up to k tokens, the base model
//! checks them in one forward and keeps the longest prefix equal to its own greedy choices, plus
//! its own next token. The output is exactly the base model's greedy continuation; what is
//! measured is how many drafted tokens survive (transformers' `_assisted_decoding` without
//! sampling does the same).

use crate::models::gemma4::SharedKv;
use crate::models::gemma4_assistant::Gemma4Assistant;
use crate::models::GemmaModel;
use anyhow::{bail, Result};
use serde::Serialize;
use tch::Tensor;

/// Checks one round's drafts against the base model's greedy tokens at the same positions
/// (`target_greedy[i]` is the base's choice after the prefix that ends with draft i, so it has
/// one more entry than `drafted`). Returns how many drafts are accepted and the tokens the round
/// appends: the accepted drafts and the base's own token after them.
pub fn verify_greedy(drafted: &[i64], target_greedy: &[i64]) -> (usize, Vec<i64>) {
    assert_eq!(
        target_greedy.len(),
        drafted.len() + 1,
        "one base token per draft, plus the one after the last"
    );
    let accepted = drafted
        .iter()
        .zip(target_greedy)
        .take_while(|(d, t)| d == t)
        .count();
    (accepted, target_greedy[..=accepted].to_vec())
}

/// Counts over speculation rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct AcceptanceStats {
    /// Rounds that drafted at least one token (one base forward each).
    pub rounds: u64,
    pub drafted: u64,
    pub accepted: u64,
}

impl AcceptanceStats {
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        debug_assert!(accepted <= drafted);
        self.rounds += 1;
        self.drafted += drafted as u64;
        self.accepted += accepted as u64;
    }

    pub fn merge(&mut self, other: &AcceptanceStats) {
        self.rounds += other.rounds;
        self.drafted += other.drafted;
        self.accepted += other.accepted;
    }

    /// Accepted drafted tokens / drafted tokens.
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// Accepted drafts per round; each round also yields the base's own token, so a round
    /// produces this + 1 tokens for one base forward.
    pub fn mean_accepted_per_round(&self) -> f64 {
        self.accepted as f64 / self.rounds.max(1) as f64
    }
}

/// The base model's side: one forward over a token sequence, returning what the drafter will
/// read later and the greedy next token after every position.
pub trait Verifier {
    type State;
    fn forward(&mut self, tokens: &[i64]) -> Result<(Self::State, Vec<i64>)>;
}

/// The drafter's side: up to `k` tokens to follow `tokens`, given the base's state of a forward
/// whose first `tokens.len() - 1` tokens equal those of `tokens`.
pub trait Proposer<S> {
    fn propose(&mut self, state: &S, tokens: &[i64], k: usize) -> Result<Vec<i64>>;
}

/// Greedy speculative decoding of `new_tokens` tokens after `prompt`, drafting up to `k` per
/// round; returns the continuation (equal to the base's plain greedy one) and adds the counts
/// to `stats`. As in transformers, the first token comes from the prompt's forward alone and a
/// round drafts at most `remaining - 1` tokens, so its own token still fits.
pub fn speculative_greedy<V: Verifier, P: Proposer<V::State>>(
    verifier: &mut V,
    proposer: &mut P,
    prompt: &[i64],
    new_tokens: usize,
    k: usize,
    stats: &mut AcceptanceStats,
) -> Result<Vec<i64>> {
    if prompt.is_empty() {
        bail!("speculative decoding needs a prompt of at least one token");
    }
    let mut tokens = prompt.to_vec();
    if new_tokens == 0 {
        return Ok(Vec::new());
    }
    let (mut state, greedy) = verifier.forward(&tokens)?;
    tokens.push(*greedy.last().expect("one greedy token per position"));
    while tokens.len() - prompt.len() < new_tokens {
        let remaining = new_tokens - (tokens.len() - prompt.len());
        let budget = k.min(remaining - 1);
        let drafts = if budget > 0 {
            proposer.propose(&state, &tokens, budget)?
        } else {
            Vec::new()
        };
        let newest = tokens.len() - 1;
        let mut candidate = tokens.clone();
        candidate.extend_from_slice(&drafts);
        let (next_state, greedy) = verifier.forward(&candidate)?;
        let (accepted, appended) = verify_greedy(&drafts, &greedy[newest..]);
        if !drafts.is_empty() {
            stats.record(drafts.len(), accepted);
        }
        tokens.extend_from_slice(&appended);
        state = next_state;
    }
    Ok(tokens[prompt.len()..].to_vec())
}

/// A base model's forward: final hidden states and shared K/V, greedy tokens from its logits.
pub struct BaseVerifier<'a> {
    pub model: &'a GemmaModel,
}

pub struct BaseState {
    /// [1, T, d]
    hidden: Tensor,
    kv: SharedKv,
}

impl Verifier for BaseVerifier<'_> {
    type State = BaseState;

    fn forward(&mut self, tokens: &[i64]) -> Result<(BaseState, Vec<i64>)> {
        let _guard = tch::no_grad_guard();
        let ids = Tensor::from_slice(tokens)
            .unsqueeze(0)
            .to_device(self.model.device());
        let (hidden, kv) = self.model.hidden_states_and_shared_kv(&ids)?;
        let greedy = self
            .model
            .logits_from_hidden(&hidden)
            .argmax(-1, false)
            .view([-1])
            .to_device(tch::Device::Cpu);
        Ok((BaseState { hidden, kv }, Vec::<i64>::try_from(greedy)?))
    }
}

/// A drafter drafting from the base's state, as transformers' candidate generator does: the
/// newest token at position c, the base's hidden state at c - 1 and its K/V of positions < c.
pub struct DrafterProposer<'a> {
    pub drafter: &'a Gemma4Assistant,
    pub base: &'a GemmaModel,
}

impl Proposer<BaseState> for DrafterProposer<'_> {
    fn propose(&mut self, state: &BaseState, tokens: &[i64], k: usize) -> Result<Vec<i64>> {
        let _guard = tch::no_grad_guard();
        let context = tokens.len() as i64 - 1;
        if context < 1 {
            bail!("drafting needs at least two tokens (one the base has seen)");
        }
        let device = self.base.device();
        let token = Tensor::from_slice(&tokens[tokens.len() - 1..])
            .unsqueeze(0)
            .to_device(device);
        let hidden = state.hidden.narrow(1, context - 1, 1);
        let draft = self
            .drafter
            .draft(self.base, &token, &hidden, context, &state.kv, k);
        Ok(Vec::<i64>::try_from(
            draft.tokens.view([-1]).to_device(tch::Device::Cpu),
        )?)
    }
}

/// Speculative greedy decoding of every prompt with `drafter` verified by `base`.
pub fn measure_acceptance(
    base: &GemmaModel,
    drafter: &Gemma4Assistant,
    prompts: &[Vec<i64>],
    new_tokens: usize,
    k: usize,
    mut on_prompt_done: impl FnMut(),
) -> Result<AcceptanceStats> {
    let mut stats = AcceptanceStats::default();
    for prompt in prompts {
        base.check_ids(prompt)?;
        speculative_greedy(
            &mut BaseVerifier { model: base },
            &mut DrafterProposer { drafter, base },
            prompt,
            new_tokens,
            k,
            &mut stats,
        )?;
        on_prompt_done();
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_keeps_the_matching_prefix_and_the_base_token_after_it() {
        assert_eq!(
            verify_greedy(&[4, 5, 6], &[4, 5, 6, 7]),
            (3, vec![4, 5, 6, 7])
        );
        assert_eq!(verify_greedy(&[4, 9, 6], &[4, 5, 6, 7]), (1, vec![4, 5]));
        assert_eq!(verify_greedy(&[9, 5, 6], &[4, 5, 6, 7]), (0, vec![4]));
        assert_eq!(verify_greedy(&[], &[4]), (0, vec![4]));
    }

    /// A base whose greedy next token is (3·last + 1) mod 10; its state is the sequence it saw.
    struct ModBase;
    impl Verifier for ModBase {
        type State = Vec<i64>;
        fn forward(&mut self, tokens: &[i64]) -> Result<(Vec<i64>, Vec<i64>)> {
            Ok((
                tokens.to_vec(),
                tokens.iter().map(|t| (3 * t + 1) % 10).collect(),
            ))
        }
    }

    /// Proposals read from a script, one list per round; checks the state it drafts from.
    struct Scripted(Vec<Vec<i64>>, Vec<usize>);
    impl Proposer<Vec<i64>> for Scripted {
        fn propose(&mut self, state: &Vec<i64>, tokens: &[i64], k: usize) -> Result<Vec<i64>> {
            assert_eq!(state[..tokens.len() - 1], tokens[..tokens.len() - 1]);
            self.1.push(k);
            let mut next = self.0.remove(0);
            next.truncate(k);
            Ok(next)
        }
    }

    #[test]
    fn counting_is_exact_on_a_hand_built_sequence() {
        // Greedy from [1]: 4, 3, 0, 1, 4, 3, 0, 1, ...
        let mut stats = AcceptanceStats::default();
        let mut drafter = Scripted(
            vec![
                vec![3, 0, 9], // 2 accepted, then the base's 1: +3 tokens
                vec![4, 3, 0], // budget 2 of 3 left: [4, 3] both accepted, +0: +3 tokens
            ],
            Vec::new(),
        );
        let out = speculative_greedy(&mut ModBase, &mut drafter, &[1], 7, 3, &mut stats).unwrap();
        assert_eq!(out, vec![4, 3, 0, 1, 4, 3, 0]);
        assert_eq!(drafter.1, vec![3, 2]);
        assert_eq!(
            stats,
            AcceptanceStats {
                rounds: 2,
                drafted: 5,
                accepted: 4
            }
        );
        assert_eq!(stats.acceptance_rate(), 0.8);
        assert_eq!(stats.mean_accepted_per_round(), 2.0);
    }

    #[test]
    fn rejected_drafts_still_yield_the_base_greedy_output() {
        let mut stats = AcceptanceStats::default();
        let mut drafter = Scripted(vec![vec![9, 9]; 10], Vec::new());
        let out =
            speculative_greedy(&mut ModBase, &mut drafter, &[2, 1], 5, 2, &mut stats).unwrap();
        assert_eq!(out, vec![4, 3, 0, 1, 4]);
        // Prefill gives 1 token; each round drafts min(2, remaining - 1) and keeps only the base's.
        assert_eq!(drafter.1, vec![2, 2, 1]);
        assert_eq!(stats.drafted, 5);
        assert_eq!(stats.accepted, 0);
        assert_eq!(stats.rounds, 3);
    }
}
