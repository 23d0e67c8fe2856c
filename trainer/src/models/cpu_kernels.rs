//! Kernels of Atoll's own for what libtorch 2.11 runs on CPU as chains of element-wise
//! operators (`csrc/`, compiled by the crate's build script). Each is one autograd node; the GPU
//! keeps libtorch's own fused kernels.

use std::ffi::{c_char, c_void, CStr};
use tch::Tensor;

extern "C" {
    fn atoll_rms_norm_cpu(
        input: *const c_void,
        weight: *const c_void,
        eps: f64,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn atoll_geglu_cpu(
        gate: *const c_void,
        up: *const c_void,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn atoll_free_message(message: *mut c_char);
}

/// RMSNorm of an f32 CPU tensor over its last dimension: x / sqrt(mean(x²) + eps) · weight.
/// One pass forward and one backward (libtorch's CPU `rms_norm` is about ten of each).
///
/// Panics, as tch's own operators do, if libtorch refuses the call (a tensor that is not f32 on
/// the CPU, or a weight of the wrong size: the callers check both).
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Tensor {
    let weight = weight.map_or(std::ptr::null(), |w| w.as_ptr() as *const c_void);
    // SAFETY: the pointers are live tch tensors (libtorch `at::Tensor*`), only read.
    call("RMSNorm", |error| unsafe {
        atoll_rms_norm_cpu(x.as_ptr() as *const c_void, weight, eps, error)
    })
}

/// GeGLU of f32 CPU tensors of one shape: gelu_tanh(gate) · up, one pass forward and one
/// backward (libtorch runs gelu, its backward and the products as separate passes). Panics as
/// [`rms_norm`] does.
pub fn geglu(gate: &Tensor, up: &Tensor) -> Tensor {
    // SAFETY: as in `rms_norm`.
    call("GeGLU", |error| unsafe {
        atoll_geglu_cpu(
            gate.as_ptr() as *const c_void,
            up.as_ptr() as *const c_void,
            error,
        )
    })
}

/// Runs one kernel entry point: a new heap `at::Tensor*` that the returned tensor owns, or null
/// with a malloc'd message, freed here and raised as a panic.
fn call(kernel: &str, entry: impl FnOnce(*mut *mut c_char) -> *mut c_void) -> Tensor {
    let mut error: *mut c_char = std::ptr::null_mut();
    let out = entry(&mut error);
    if out.is_null() {
        let message = if error.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: a NUL-terminated copy the kernel made with malloc, freed once.
            unsafe {
                let m = CStr::from_ptr(error).to_string_lossy().into_owned();
                atoll_free_message(error);
                m
            }
        };
        panic!("{kernel} kernel: {message}");
    }
    // SAFETY: a tensor the kernel allocated for the caller, owned from here on.
    unsafe { Tensor::from_ptr(out as *mut _) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The same function composed of libtorch operators in float64, through autograd.
    fn reference(x: &Tensor, w: Option<&Tensor>, g: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
        let x = x.to_kind(Kind::Double).detach().set_requires_grad(true);
        let w = w.map(|w| w.to_kind(Kind::Double).detach().set_requires_grad(true));
        let rstd = (x.square().mean_dim(-1, true, Kind::Double) + eps).rsqrt();
        let mut y = &x * rstd;
        if let Some(w) = &w {
            y *= w;
        }
        (&y * g.to_kind(Kind::Double)).sum(Kind::Double).backward();
        let dw = w.map_or_else(
            || Tensor::zeros([0], (Kind::Double, Device::Cpu)),
            |w| w.grad(),
        );
        (y.detach(), x.grad(), dw)
    }

    fn max_relative(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a.to_kind(Kind::Double) - b).abs().max().double_value(&[]);
        diff / b.abs().max().double_value(&[]).max(1e-30)
    }

    #[test]
    fn matches_float64_autograd_in_values_and_both_gradients() {
        tch::manual_seed(7);
        // Hidden-state rows, per-head rows, and a row length that is no multiple of a vector.
        for (shape, weighted) in [
            (vec![3i64, 37, 256], true),
            (vec![2, 16, 4, 64], true),
            (vec![5, 33], false),
            (vec![70, 19], true),
        ] {
            let d = *shape.last().expect("shape");
            let x = Tensor::randn(&shape, (Kind::Float, Device::Cpu)) * 3.0;
            let w = (Tensor::randn([d], (Kind::Float, Device::Cpu)) * 0.2 + 1.0)
                .set_requires_grad(true);
            let g = Tensor::randn(&shape, (Kind::Float, Device::Cpu));
            let xs = x.detach().set_requires_grad(true);
            let y = rms_norm(&xs, weighted.then_some(&w), 1e-6);
            (&y * &g).sum(Kind::Float).backward();
            let (ry, rdx, rdw) = reference(&x, weighted.then_some(&w), &g, 1e-6);
            // f32 against float64: a few ulps of f32 per row of up to 256 values.
            assert!(max_relative(&y, &ry) < 2e-6, "{shape:?}: values");
            assert!(
                max_relative(&xs.grad(), &rdx) < 2e-6,
                "{shape:?}: input gradient"
            );
            if weighted {
                assert!(
                    max_relative(&w.grad(), &rdw) < 2e-6,
                    "{shape:?}: weight gradient"
                );
            }
        }
    }

    #[test]
    fn a_zero_row_normalises_to_zero_with_finite_gradients() {
        let x = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
        x.get(1)
            .copy_(&Tensor::arange(8, (Kind::Float, Device::Cpu)));
        let x = x.set_requires_grad(true);
        let w = Tensor::ones([8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = rms_norm(&x, Some(&w), 1e-6);
        y.sum(Kind::Float).backward();
        assert_eq!(y.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(bool::try_from(x.grad().isfinite().all()).expect("bool"));
        assert!(bool::try_from(w.grad().isfinite().all()).expect("bool"));
    }

    #[test]
    fn non_contiguous_inputs_and_gradients_are_handled() {
        tch::manual_seed(3);
        let base = Tensor::randn([64, 48], (Kind::Float, Device::Cpu));
        let x = base.narrow(1, 8, 32).detach().set_requires_grad(true);
        assert!(!x.is_contiguous());
        let w = Tensor::randn([32], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([32, 64], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let y = rms_norm(&x, Some(&w), 1e-6);
        (&y * &g).sum(Kind::Float).backward();
        let (ry, rdx, _) = reference(&x, Some(&w), &g, 1e-6);
        assert!(max_relative(&y, &ry) < 2e-6);
        assert!(max_relative(&x.grad(), &rdx) < 2e-6);
    }

    #[test]
    fn geglu_matches_float64_autograd_in_values_and_both_gradients() {
        tch::manual_seed(11);
        // Wide enough to cover tanh's saturated tails (|z| up to ~30) and its linear middle.
        for shape in [vec![3i64, 17, 1024], vec![5, 7]] {
            let gate = (Tensor::randn(&shape, (Kind::Float, Device::Cpu)) * 4.0)
                .detach()
                .set_requires_grad(true);
            let up = Tensor::randn(&shape, (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let g = Tensor::randn(&shape, (Kind::Float, Device::Cpu));
            let y = geglu(&gate, &up);
            (&y * &g).sum(Kind::Float).backward();
            let gate64 = gate.to_kind(Kind::Double).detach().set_requires_grad(true);
            let up64 = up.to_kind(Kind::Double).detach().set_requires_grad(true);
            let y64 = gate64.gelu("tanh") * &up64;
            (&y64 * g.to_kind(Kind::Double))
                .sum(Kind::Double)
                .backward();
            // Against the float64 result's largest magnitude: the kernel's exponential is its own
            // (range reduction and a Taylor series), a few f32 ulps from libm's.
            assert!(max_relative(&y, &y64.detach()) < 2e-6, "{shape:?}: values");
            assert!(
                max_relative(&gate.grad(), &gate64.grad()) < 2e-6,
                "{shape:?}: gate gradient"
            );
            assert!(
                max_relative(&up.grad(), &up64.grad()) < 2e-6,
                "{shape:?}: up gradient"
            );
            // And element by element: 1 + tanh is formed without cancellation, so even the
            // deeply negative gate values, where libtorch's own f32 gelu errs by 3e-4 of the
            // value, stay within a few ulps.
            let rel = ((&y.to_kind(Kind::Double) - y64.detach()).abs()
                / (y64.detach().abs() + 1e-3))
                .max()
                .double_value(&[]);
            assert!(rel < 1e-5, "{shape:?}: elementwise {rel}");
        }
    }

    #[test]
    fn geglu_refuses_mismatched_shapes() {
        let gate = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        let up = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        let r = std::panic::catch_unwind(|| geglu(&gate, &up));
        assert!(r.is_err());
    }

    #[test]
    #[should_panic(expected = "f32 CPU tensors")]
    fn other_dtypes_are_refused_with_a_message() {
        let x = Tensor::zeros([2, 4], (Kind::Double, Device::Cpu));
        let _ = rms_norm(&x, None, 1e-6);
    }
}
