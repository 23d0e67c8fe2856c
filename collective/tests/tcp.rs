//! The CPU (TCP) backend with 1, 2 and 4 ranks on threads of this process, checked against
//! float64 references computed here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use atoll_collective::{
    average_gradients_with, connect, local_group, plan_buckets, verify_same_config, Backend,
    Collective, CollectiveError, CollectiveOptions, RankConfig, ReduceOp, TcpCollective,
};
use tch::{Device, Kind, Tensor};

fn options() -> CollectiveOptions {
    CollectiveOptions::with_timeout(Duration::from_secs(60))
}

/// Runs `body` on every rank of a fresh local CPU group, one thread per rank; results in rank
/// order.
fn on_ranks<T: Send>(
    world: usize,
    options: &CollectiveOptions,
    body: impl Fn(&mut dyn Collective) -> T + Sync,
) -> Vec<T> {
    let group = local_group(&vec![Device::Cpu; world], options).expect("local group");
    std::thread::scope(|scope| {
        let body = &body;
        let handles: Vec<_> = group
            .into_iter()
            .map(|mut c| scope.spawn(move || body(c.as_mut())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

/// Deterministic, rank-dependent values of mixed magnitude (no RNG shared between threads).
fn rank_values(rank: usize, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let x = (rank * 7919 + i * 31) as f64;
            (x * 0.37).sin() * 10f64.powi((i % 5) as i32 - 2)
        })
        .collect()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("f64 values")
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn check_all_reduce(world: usize) {
    let n = 1000;
    for op in [ReduceOp::Sum, ReduceOp::Mean] {
        let results = on_ranks(world, &options(), |c| {
            let mut t = Tensor::from_slice(&rank_values(c.rank(), n))
                .to_kind(Kind::Float)
                .reshape([10, 100]);
            c.all_reduce_(&mut t, op).expect("all_reduce");
            assert_eq!(t.size(), vec![10, 100]);
            assert_eq!(t.kind(), Kind::Float);
            to_f64(&t)
        });
        // Reference: the f32 inputs summed in float64.
        let mut reference = vec![0f64; n];
        for r in 0..world {
            let inputs = to_f64(&Tensor::from_slice(&rank_values(r, n)).to_kind(Kind::Float));
            for (acc, x) in reference.iter_mut().zip(inputs) {
                *acc += x;
            }
        }
        if op == ReduceOp::Mean {
            reference.iter_mut().for_each(|x| *x /= world as f64);
        }
        // f32 accumulation of `world` terms of magnitude <= 100: error below world * 100 * 2^-24
        // (plus one rounding for the mean); 1e-4 absolute bounds it for world <= 4.
        let err = max_abs_diff(&results[0], &reference);
        assert!(err < 1e-4, "{op:?} on {world} ranks: max error {err}");
        // Every rank holds the very same bits.
        for r in 1..world {
            assert_eq!(results[r], results[0], "rank {r} differs from rank 0");
        }
    }
}

#[test]
fn all_reduce_sum_and_mean_match_a_float64_reference_on_2_ranks() {
    check_all_reduce(2);
}

#[test]
fn all_reduce_sum_and_mean_match_a_float64_reference_on_4_ranks() {
    check_all_reduce(4);
}

#[test]
fn all_reduce_is_bit_reproducible_run_to_run() {
    let run = || {
        on_ranks(4, &options(), |c| {
            let mut t = Tensor::from_slice(&rank_values(c.rank(), 4096)).to_kind(Kind::Float);
            c.all_reduce_(&mut t, ReduceOp::Mean).expect("all_reduce");
            Vec::<f32>::try_from(&t)
                .expect("f32")
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        })
    };
    let (first, second) = (run(), run());
    assert_eq!(first, second);
}

#[test]
fn bf16_all_reduce_accumulates_in_f32() {
    let n = 512;
    let results = on_ranks(4, &options(), |c| {
        let mut t = Tensor::from_slice(&rank_values(c.rank(), n)).to_kind(Kind::BFloat16);
        c.all_reduce_(&mut t, ReduceOp::Sum).expect("all_reduce");
        assert_eq!(t.kind(), Kind::BFloat16);
        to_f64(&t)
    });
    for (i, got) in results[0].iter().enumerate() {
        let exact: f64 = (0..4)
            .map(|r| to_f64(&Tensor::from_slice(&rank_values(r, n)).to_kind(Kind::BFloat16))[i])
            .sum();
        // One bf16 rounding of the f32 sum: relative 2^-8, plus f32 slack for tiny values.
        assert!(
            (got - exact).abs() <= exact.abs() * 2f64.powi(-8) + 1e-6,
            "element {i}: {got} vs {exact}"
        );
    }
}

#[test]
fn all_reduce_of_an_integer_tensor_sums_exactly_and_refuses_mean() {
    let results = on_ranks(3, &options(), |c| {
        let mut t = Tensor::from_slice(&[c.rank() as i64 + 1, 10, -3]);
        c.all_reduce_(&mut t, ReduceOp::Sum).expect("sum");
        let mean = c.all_reduce_(&mut t.shallow_clone(), ReduceOp::Mean);
        (Vec::<i64>::try_from(&t).expect("i64"), mean.is_err())
    });
    for (values, refused) in results {
        assert_eq!(values, vec![6, 30, -9]);
        assert!(refused);
    }
}

#[test]
fn all_reduce_works_in_place_on_a_parameter_and_a_non_contiguous_view() {
    let results = on_ranks(2, &options(), |c| {
        let param = Tensor::from_slice(&[1f32, 2., 3., 4.])
            .reshape([2, 2])
            .set_requires_grad(true);
        let mut p = param.shallow_clone();
        c.all_reduce_(&mut p, ReduceOp::Sum).expect("parameter");
        let base = Tensor::from_slice(&[1f64, 2., 3., 4., 5., 6.]).reshape([2, 3]);
        let mut column = base.narrow(1, 1, 1); // strided view of [2, 5]
        c.all_reduce_(&mut column, ReduceOp::Sum).expect("view");
        (to_f64(&param), to_f64(&base))
    });
    for (param, base) in results {
        assert_eq!(param, vec![2., 4., 6., 8.]);
        assert_eq!(base, vec![1., 4., 3., 4., 10., 6.]);
    }
}

#[test]
fn broadcast_copies_the_root_tensor_to_every_rank() {
    for (world, root) in [(2, 1), (4, 3), (4, 0)] {
        let results = on_ranks(world, &options(), |c| {
            let mut t = Tensor::from_slice(&rank_values(c.rank(), 64)).reshape([8, 8]);
            c.broadcast_(&mut t, root).expect("broadcast");
            to_f64(&t)
        });
        for got in results {
            assert_eq!(got, rank_values(root, 64));
        }
    }
}

#[test]
fn all_gather_returns_every_rank_tensor_in_rank_order() {
    let results = on_ranks(4, &options(), |c| {
        let t = Tensor::from_slice(&rank_values(c.rank(), 6)).reshape([2, 3]);
        c.all_gather(&t).expect("all_gather")
    });
    for gathered in results {
        assert_eq!(gathered.len(), 4);
        for (r, t) in gathered.iter().enumerate() {
            assert_eq!(t.size(), vec![2, 3]);
            assert_eq!(to_f64(t), rank_values(r, 6));
        }
    }
}

#[test]
fn all_gather_bytes_carries_messages_of_different_lengths() {
    let results = on_ranks(3, &options(), |c| {
        let message = vec![c.rank() as u8; c.rank() * 5]; // rank 0 sends nothing
        c.all_gather_bytes(&message).expect("all_gather_bytes")
    });
    for gathered in results {
        assert_eq!(gathered, vec![vec![], vec![1u8; 5], vec![2u8; 10]]);
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_shard_of_the_sum() {
    let world = 4;
    let (rows, cols) = (world * 3, 5);
    let results = on_ranks(world, &options(), |c| {
        let t = Tensor::from_slice(&rank_values(c.rank(), rows * cols))
            .reshape([rows as i64, cols as i64]);
        let shard = c.reduce_scatter(&t, ReduceOp::Sum).expect("reduce_scatter");
        assert_eq!(shard.size(), vec![3, cols as i64]);
        to_f64(&shard)
    });
    let mut sum = vec![0f64; rows * cols];
    for r in 0..world {
        for (acc, x) in sum.iter_mut().zip(rank_values(r, rows * cols)) {
            *acc += x;
        }
    }
    for (r, shard) in results.iter().enumerate() {
        let expected = &sum[r * 3 * cols..(r + 1) * 3 * cols];
        // f64 inputs summed in rank order: equal to the reference up to f64 rounding.
        assert!(max_abs_diff(shard, expected) < 1e-12, "rank {r}");
    }
}

#[test]
fn reduce_scatter_refuses_a_first_dimension_not_divisible_by_the_world_size() {
    let results = on_ranks(2, &options(), |c| {
        let t = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
        c.reduce_scatter(&t, ReduceOp::Sum).map(|_| ())
    });
    for r in results {
        assert!(matches!(r, Err(CollectiveError::InvalidTensor(m)) if m.contains("multiple")));
    }
}

#[test]
fn barrier_returns_only_after_every_rank_arrived() {
    for world in [2, 4] {
        let arrived = AtomicUsize::new(0);
        let seen = on_ranks(world, &options(), |c| {
            arrived.fetch_add(1, Ordering::SeqCst);
            c.barrier().expect("barrier");
            arrived.load(Ordering::SeqCst)
        });
        assert!(seen.iter().all(|&n| n == world), "{seen:?}");
    }
}

#[test]
fn a_group_of_one_is_the_identity() {
    let mut c = TcpCollective::connect(&RankConfig::single(), &options()).expect("single");
    let mut t = Tensor::from_slice(&[1f32, 2.]);
    c.all_reduce_(&mut t, ReduceOp::Mean).expect("all_reduce");
    c.barrier().expect("barrier");
    assert_eq!(to_f64(&t), vec![1., 2.]);
    assert_eq!(
        c.reduce_scatter(&t, ReduceOp::Sum).expect("rs").size(),
        vec![2]
    );
    assert_eq!(c.all_gather(&t).expect("ag").len(), 1);
    verify_same_config(&mut c, "recipe", b"x").expect("agree");
}

#[test]
fn config_mismatch_names_the_rank_that_differs_on_every_rank() {
    let results = on_ranks(4, &options(), |c| {
        let recipe = if c.rank() == 2 {
            "lr: 0.002"
        } else {
            "lr: 0.001"
        };
        verify_same_config(c, "recipe and model config", recipe.as_bytes())
    });
    for result in results {
        match result {
            Err(CollectiveError::ConfigMismatch { ranks, digests, .. }) => {
                assert_eq!(ranks, vec![2]);
                assert_eq!(digests.len(), 4);
                let message = CollectiveError::ConfigMismatch {
                    what: "recipe".into(),
                    ranks,
                    digests,
                }
                .to_string();
                assert!(message.contains("rank 2"), "{message}");
            }
            other => panic!("expected a config mismatch, got {other:?}"),
        }
    }
    let agreed = on_ranks(2, &options(), |c| verify_same_config(c, "recipe", b"same"));
    assert!(agreed.iter().all(Result::is_ok));
}

#[test]
fn ranks_calling_different_shapes_fail_with_an_error_naming_the_rank() {
    let results = on_ranks(3, &options(), |c| {
        let n = if c.rank() == 1 { 5 } else { 4 };
        let mut t = Tensor::zeros([n], (Kind::Float, Device::Cpu));
        c.all_reduce_(&mut t, ReduceOp::Sum)
            .map_err(|e| e.to_string())
    });
    for result in results {
        let message = result.expect_err("shape mismatch");
        assert!(
            message.contains("rank 1") && message.contains("[5]"),
            "{message}"
        );
    }
}

#[test]
fn a_rank_that_exits_makes_the_others_fail_promptly_not_hang() {
    // A long limit: the others must fail because the peer's connection closed, not by timeout.
    let limit = Duration::from_secs(120);
    for leaver in [1, 0] {
        let started = Instant::now();
        let results = on_ranks(4, &CollectiveOptions::with_timeout(limit), |c| {
            if c.rank() == leaver {
                return None; // dropped without taking part: its sockets close
            }
            let mut t = Tensor::ones([16], (Kind::Float, Device::Cpu));
            let first = c.all_reduce_(&mut t, ReduceOp::Sum);
            let after = c.barrier();
            Some((first, after))
        });
        assert!(
            started.elapsed() < limit / 4,
            "took {:?}",
            started.elapsed()
        );
        for (rank, result) in results.into_iter().enumerate() {
            let Some((first, after)) = result else {
                assert_eq!(rank, leaver);
                continue;
            };
            let message = first.expect_err("peer gone").to_string();
            assert!(
                message.contains(&format!("rank {leaver}")),
                "rank {rank}: {message}"
            );
            assert!(
                matches!(after, Err(CollectiveError::Broken(_))),
                "rank {rank}: {after:?}"
            );
        }
    }
}

#[test]
fn a_rank_that_stays_silent_fails_the_others_after_the_timeout() {
    let limit = Duration::from_millis(300);
    let (release, wait) = mpsc::channel::<()>();
    let wait = std::sync::Mutex::new(wait);
    let results = on_ranks(3, &CollectiveOptions::with_timeout(limit), |c| {
        if c.rank() == 2 {
            // Alive but never calls: blocks until the others have given up.
            let _ = wait.lock().expect("lock").recv();
            return None;
        }
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let result = c.all_reduce_(&mut t, ReduceOp::Sum);
        if c.rank() == 0 {
            let _ = release.send(());
        }
        Some(result)
    });
    match &results[0] {
        Some(Err(CollectiveError::Timeout {
            peer: 2, rank: 0, ..
        })) => {}
        other => panic!("rank 0: expected a timeout waiting for rank 2, got {other:?}"),
    }
    assert!(matches!(&results[1], Some(Err(_))), "{:?}", results[1]);
}

#[test]
fn average_gradients_averages_every_parameter_across_several_buckets() {
    let world = 3;
    let shapes: [&[i64]; 4] = [&[4, 5], &[7], &[3, 2, 2], &[1]];
    let kinds = [Kind::Float, Kind::Double, Kind::Float, Kind::Float];
    let results = on_ranks(world, &options(), |c| {
        let params: Vec<Tensor> = shapes
            .iter()
            .zip(kinds)
            .map(|(s, k)| Tensor::zeros(*s, (k, Device::Cpu)).set_requires_grad(true))
            .collect();
        // loss = sum_i <p_i, c_i(rank)>: the gradient of p_i is c_i(rank).
        let mut loss = Tensor::zeros([], (Kind::Double, Device::Cpu));
        for (i, p) in params.iter().enumerate() {
            let coeff = Tensor::from_slice(&rank_values(c.rank() * 10 + i, p.numel()))
                .to_kind(p.kind())
                .reshape(p.size());
            loss += (p * coeff).sum(Kind::Double);
        }
        loss.backward();
        // 48 bytes: forces the f32 parameters into several buckets.
        average_gradients_with(c, &params, 48).expect("average");
        params.iter().map(|p| to_f64(&p.grad())).collect::<Vec<_>>()
    });
    for (i, p_shape) in shapes.iter().enumerate() {
        let n: i64 = p_shape.iter().product();
        let mut mean = vec![0f64; n as usize];
        for r in 0..world {
            let g =
                to_f64(&Tensor::from_slice(&rank_values(r * 10 + i, n as usize)).to_kind(kinds[i]));
            mean.iter_mut()
                .zip(g)
                .for_each(|(m, x)| *m += x / world as f64);
        }
        for (rank, grads) in results.iter().enumerate() {
            let err = max_abs_diff(&grads[i], &mean);
            // f32 parameters: two f32 additions (partial sums below 300: half an ulp is 1.5e-5
            // each) and a division; 3e-5 bounds it.
            assert!(err < 3e-5, "param {i} on rank {rank}: error {err}");
        }
    }
}

#[test]
fn average_gradients_refuses_a_parameter_without_gradient() {
    let results = on_ranks(1, &options(), |c| {
        let p = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        average_gradients_with(c, &[p], 1 << 20).map_err(|e| e.to_string())
    });
    let message = results[0].as_ref().expect_err("no grad");
    assert!(
        message.contains("parameter 0") && message.contains("no gradient"),
        "{message}"
    );
}

#[test]
fn buckets_group_by_kind_and_respect_the_size_limit() {
    let t = |n: i64, k: Kind| Tensor::zeros([n], (k, Device::Cpu));
    let tensors = [
        t(4, Kind::Float),  // 16 bytes
        t(2, Kind::Double), // 16 bytes
        t(3, Kind::Float),  // 12 bytes: fits with the first (28 <= 32)
        t(2, Kind::Float),  // 8 bytes: would make 36, new bucket
        t(20, Kind::Float), // 80 bytes: alone
    ];
    let plan = plan_buckets(&tensors, 32).expect("plan");
    let groups: Vec<(Vec<usize>, Kind, usize)> = plan
        .iter()
        .map(|b| (b.indices.clone(), b.kind, b.numel))
        .collect();
    assert_eq!(
        groups,
        vec![
            (vec![0, 2], Kind::Float, 7),
            (vec![1], Kind::Double, 2),
            (vec![3], Kind::Float, 2),
            (vec![4], Kind::Float, 20),
        ]
    );
}

#[test]
fn ranks_from_rank_configs_form_a_group_whichever_starts_first() {
    // Rank 0 starts last: the others retry until it listens.
    let port = free_port();
    let world = 3;
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .rev()
            .map(|rank| {
                scope.spawn(move || {
                    let config = RankConfig::new(rank, world, "127.0.0.1", port).expect("config");
                    let mut c = connect(&config, Device::Cpu, &options()).expect("connect");
                    assert_eq!(c.backend(), Backend::Tcp);
                    let mut t = Tensor::from_slice(&[rank as f32]);
                    c.all_reduce_(&mut t, ReduceOp::Sum).expect("all_reduce");
                    (c.rank(), to_f64(&t)[0])
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect::<Vec<_>>()
    });
    for (_, sum) in &results {
        assert_eq!(*sum, 3.0);
    }
}

#[test]
fn a_rank_with_a_different_world_size_fails_the_start_up_clearly() {
    let port = free_port();
    let opts = CollectiveOptions::with_timeout(Duration::from_secs(20));
    let (root, stray) = std::thread::scope(|scope| {
        let root = scope.spawn(|| {
            TcpCollective::connect(&RankConfig::new(0, 2, "127.0.0.1", port).unwrap(), &opts)
        });
        let stray = scope.spawn(|| {
            TcpCollective::connect(&RankConfig::new(1, 3, "127.0.0.1", port).unwrap(), &opts)
        });
        (root.join().unwrap(), stray.join().unwrap())
    });
    let root = root.expect_err("world size mismatch").to_string();
    assert!(
        root.contains("WORLD_SIZE=3") && root.contains("WORLD_SIZE=2"),
        "{root}"
    );
    let stray = stray.expect_err("rejected").to_string();
    assert!(stray.contains("WORLD_SIZE=3"), "{stray}");
}

#[test]
fn a_stray_connection_to_rank_0_is_ignored() {
    use std::io::Write;
    let port = free_port();
    let results = std::thread::scope(|scope| {
        let root = scope.spawn(|| {
            let config = RankConfig::new(0, 2, "127.0.0.1", port).expect("config");
            let mut c = TcpCollective::connect(&config, &options()).expect("rank 0");
            c.barrier().map(|_| c.rank())
        });
        // Something that is not a rank (a health check) connects first and sends garbage.
        let mut stray = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(_) => std::thread::yield_now(),
            }
        };
        stray.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
        let member = scope.spawn(|| {
            let config = RankConfig::new(1, 2, "127.0.0.1", port).expect("config");
            let mut c = TcpCollective::connect(&config, &options()).expect("rank 1");
            c.barrier().map(|_| c.rank())
        });
        (root.join().expect("root"), member.join().expect("member"))
    });
    assert_eq!(results.0.expect("barrier"), 0);
    assert_eq!(results.1.expect("barrier"), 1);
}

#[test]
fn a_missing_rank_fails_the_start_up_after_the_connect_timeout() {
    let port = free_port();
    let opts = CollectiveOptions::with_timeout(Duration::from_millis(300));
    let err = TcpCollective::connect(&RankConfig::new(0, 3, "127.0.0.1", port).unwrap(), &opts)
        .expect_err("nobody joins")
        .to_string();
    assert!(err.contains("rank(s) 1, 2 did not join"), "{err}");
}

#[test]
fn rank_config_reads_the_usual_variables() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(RankConfig::from_vars(vars(&[])).unwrap(), None);
    let c = RankConfig::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "4")]))
        .unwrap()
        .unwrap();
    assert_eq!((c.rank, c.world_size, c.local_rank), (2, 4, 2));
    assert_eq!(
        (c.master_addr.as_str(), c.master_port),
        ("127.0.0.1", 29500)
    );
    let c = RankConfig::from_vars(vars(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node-0"),
        ("MASTER_PORT", "1234"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (c.local_rank, c.master_addr.as_str(), c.master_port),
        (1, "node-0", 1234)
    );
    for (pairs, needle) in [
        (&[("RANK", "0")][..], "WORLD_SIZE is not"),
        (&[("WORLD_SIZE", "2")][..], "RANK is not"),
        (&[("RANK", "x"), ("WORLD_SIZE", "2")][..], "RANK=\"x\""),
        (&[("RANK", "2"), ("WORLD_SIZE", "2")][..], "out of range"),
        (&[("RANK", "0"), ("WORLD_SIZE", "0")][..], "at least 1"),
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")][..],
            "MASTER_PORT",
        ),
    ] {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let err = RankConfig::from_vars(|name| {
            owned
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
        .expect_err(needle)
        .to_string();
        assert!(err.contains(needle), "{err} lacks {needle}");
    }
}

#[test]
fn cuda_collectives_need_a_visible_gpu() {
    let result = Backend::for_device(Device::Cuda(0));
    if tch::Cuda::is_available() {
        // A GPU machine with the CUDA libtorch: NCCL ships next to libtorch_cuda.
        assert_eq!(result.expect("nccl"), Backend::Nccl);
    } else {
        let err = result.expect_err("no GPU").to_string();
        assert!(err.contains("no CUDA device"), "{err}");
        let err = local_group(&[Device::Cuda(0), Device::Cuda(1)], &options())
            .map(|_| ())
            .expect_err("no GPU")
            .to_string();
        assert!(err.contains("no CUDA device"), "{err}");
    }
    assert_eq!(Backend::for_device(Device::Cpu).unwrap(), Backend::Tcp);
}

#[test]
fn nccl_loads_where_the_libtorch_directory_ships_it() {
    // The CUDA libtorch of scripts/setup-libtorch.sh ships libnccl.so.2 next to libtorch_cuda.so
    // (and the test binary's rpath points there); the CPU one does not. Asking NCCL its version
    // needs no GPU, so this exercises cudarc's dynamic loading on any machine.
    let libtorch = std::env::var("LIBTORCH").ok().map(std::path::PathBuf::from);
    let ships_nccl = libtorch.is_some_and(|dir| dir.join("lib/libnccl.so.2").exists());
    match (ships_nccl, atoll_collective::nccl_version()) {
        (true, Some((major, minor, _))) => assert!((major, minor) >= (2, 28), "{major}.{minor}"),
        (true, None) => panic!("libnccl.so.2 is in the libtorch directory but did not load"),
        (false, version) => {
            // Only a system-wide NCCL could load then; the CPU libtorch has none.
            assert_eq!(version.is_some(), atoll_collective::nccl_available());
        }
    }
}

/// A port that was free a moment ago (the OS does not hand it out again at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
