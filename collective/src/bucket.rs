//! Gradient averaging in flattened buckets: one collective per few megabytes instead of one per
//! parameter. The plan depends only on the tensors' kinds, devices and sizes in list order, so
//! every rank (with the same model) makes the same plan. Backend-neutral: the CPU tests of this
//! code cover the NCCL path too.

use tch::{Device, Kind, Tensor};

use crate::error::{CollectiveError, Result};
use crate::{Collective, ReduceOp};

/// torch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// Consecutive-in-plan tensors of one kind and device reduced as one flat tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Indices into the tensor list, in list order.
    pub indices: Vec<usize>,
    pub kind: Kind,
    pub device: Device,
    /// Total elements.
    pub numel: usize,
}

/// Groups `tensors` into buckets of one kind and device each, at most `bucket_bytes` (a tensor
/// larger than that gets a bucket of its own). Tensors keep their list order inside a bucket;
/// buckets are ordered by their first tensor.
pub fn plan_buckets(tensors: &[Tensor], bucket_bytes: usize) -> Result<Vec<Bucket>> {
    let mut buckets: Vec<Bucket> = Vec::new();
    // The bucket still open for each (kind, device), as an index into `buckets`.
    let mut open: Vec<(Kind, Device, usize)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let (kind, device, numel) = (t.f_kind()?, t.device(), t.numel());
        let bytes = numel * kind.elt_size_in_bytes();
        let slot = open.iter().position(|(k, d, _)| *k == kind && *d == device);
        let fits = slot.is_some_and(|s| {
            let b = &buckets[open[s].2];
            (b.numel * kind.elt_size_in_bytes()) + bytes <= bucket_bytes
        });
        match (slot, fits) {
            (Some(s), true) => {
                let b = &mut buckets[open[s].2];
                b.indices.push(i);
                b.numel += numel;
            }
            _ => {
                buckets.push(Bucket {
                    indices: vec![i],
                    kind,
                    device,
                    numel,
                });
                let at = buckets.len() - 1;
                match slot {
                    Some(s) => open[s].2 = at,
                    None => open.push((kind, device, at)),
                }
            }
        }
    }
    Ok(buckets)
}

/// The bucket's tensors, flattened and concatenated.
fn flatten(tensors: &[Tensor], bucket: &Bucket) -> Result<Tensor> {
    let flats = bucket
        .indices
        .iter()
        .map(|&i| tensors[i].f_reshape([-1]))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&flats, 0)?)
}

/// Copies the slices of `flat` back into the bucket's tensors.
fn unflatten_into(flat: &Tensor, tensors: &mut [Tensor], bucket: &Bucket) -> Result<()> {
    let mut offset = 0i64;
    for &i in &bucket.indices {
        let t = &mut tensors[i];
        let n = t.numel() as i64;
        let slice = flat.f_narrow(0, offset, n)?.f_reshape(t.size())?;
        t.f_copy_(&slice)?;
        offset += n;
    }
    Ok(())
}

/// All-reduces every tensor of `tensors` in place, in flattened buckets of at most
/// `bucket_bytes`.
pub fn all_reduce_tensors(
    collective: &mut dyn Collective,
    tensors: &mut [Tensor],
    op: ReduceOp,
    bucket_bytes: usize,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for bucket in plan_buckets(tensors, bucket_bytes)? {
        let mut flat = flatten(tensors, &bucket)?;
        collective.all_reduce_(&mut flat, op)?;
        unflatten_into(&flat, tensors, &bucket)?;
    }
    Ok(())
}

/// Replaces the gradient of every parameter by its mean over the ranks (the data-parallel
/// step between `backward` and the optimizer), in buckets of [`DEFAULT_BUCKET_BYTES`]. Every
/// parameter must have a gradient, and every rank must pass the same parameter list.
pub fn average_gradients(collective: &mut dyn Collective, params: &[Tensor]) -> Result<()> {
    average_gradients_with(collective, params, DEFAULT_BUCKET_BYTES)
}

/// [`average_gradients`] with buckets of at most `bucket_bytes`.
pub fn average_gradients_with(
    collective: &mut dyn Collective,
    params: &[Tensor],
    bucket_bytes: usize,
) -> Result<()> {
    let mut grads = params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let g = p.grad();
            if g.defined() {
                Ok(g)
            } else {
                Err(CollectiveError::InvalidTensor(format!(
                    "parameter {i} (shape {:?}) has no gradient: average_gradients runs after \
                     backward, on parameters that took part in the loss",
                    p.size()
                )))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    all_reduce_tensors(collective, &mut grads, ReduceOp::Mean, bucket_bytes)
}
