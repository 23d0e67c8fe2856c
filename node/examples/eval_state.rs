//! Diagnostic: the eval loss of a finished job's global model as the coordinator saved it
//! (`<job>/coordinator/state`), then with each fragment in turn put back to the seeded
//! initialisation, and per tensor how far Θ moved from it. Tells which fragment a bad final
//! model comes from (docs/diloco.md, the WAN test's near-initial runs).
//!
//! cargo run --release -p atoll-node --example eval_state -- <job directory of `atoll run`>

use anyhow::{anyhow, Context, Result};
use atoll_node::state::StateStore;
use atoll_trainer::worker::Worker;

fn main() -> Result<()> {
    let job = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .ok_or_else(|| anyhow!("usage: eval_state <job directory of atoll run>"))?;
    let recipe = atoll_recipe::Recipe::from_file(&job.join("recipe.yaml"), &[])
        .with_context(|| format!("{} is not a job directory", job.display()))?;
    tch::set_num_threads(1);
    let mut worker = Worker::without_optimizer(&recipe)?;
    let plan = worker.plan()?;
    let init: Vec<Vec<Vec<f32>>> = plan
        .fragments
        .iter()
        .map(|f| worker.values(&f.tensors))
        .collect();
    println!("initial model: eval {:.4}", worker.evaluate());
    let (_, saved) = StateStore::new(&job.join("coordinator"))?
        .load(plan.len())?
        .ok_or_else(|| anyhow!("{} holds no coordinator state", job.display()))?;
    for (p, f) in plan.fragments.iter().enumerate() {
        worker.overwrite(&f.tensors, &saved[p].theta);
    }
    println!("saved Θ: eval {:.4}", worker.evaluate());
    for (p, f) in plan.fragments.iter().enumerate() {
        worker.overwrite(&f.tensors, &init[p]);
        println!(
            "fragment {p} ({} tensors, version {}) at its initial values: eval {:.4}",
            f.tensors.len(),
            saved[p].version,
            worker.evaluate()
        );
        worker.overwrite(&f.tensors, &saved[p].theta);
        for (k, &t) in f.tensors.iter().enumerate() {
            let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
            let (now, start) = (&saved[p].theta[k], &init[p][k]);
            let moved = norm(&mut now.iter().zip(start).map(|(a, b)| (a - b) as f64));
            let initial = norm(&mut start.iter().map(|&b| b as f64));
            println!(
                "  {}: |Θ − Θ0| {moved:.4}, |Θ0| {initial:.4}",
                plan.tensors[t].name
            );
        }
    }
    Ok(())
}
