//! Expert parallelism changes where expert rows are computed, never what they are: three
//! workers holding disjoint expert shards (one expert replicated), exchanging rows over
//! the in-process transport, give bitwise the logits of one worker holding everything.

use std::time::Duration;

use hyserve_kernels::cpu::CpuBackend;
use hyserve_kernels::{Backend, DType, KvSpec, Precision};
use hyserve_model::graph::TpShard;
use hyserve_model::init::{InitOptions, WeightFormat, init_model};
use hyserve_model::{Arch, Checkpoint, ExpertParallel, InProcess, Model, ModelConfig, SeqChunk};

/// A seeded tiny model of `arch` in a temporary directory, and its config.
fn tiny(arch: Arch, seed: u64) -> (tempfile::TempDir, ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        arch,
        preset: "tiny".into(),
        seed,
        dtype: DType::BF16,
        format: WeightFormat::Safetensors,
        max_shard_bytes: 1 << 30,
    };
    let cfg = init_model(dir.path(), &opts, &mut |_, _| {}).unwrap();
    (dir, cfg)
}

fn chunk(tokens: &[u32], first_pos: usize, all_logits: bool) -> SeqChunk {
    SeqChunk {
        tokens: tokens.to_vec(),
        first_pos,
        slots: (0..first_pos + tokens.len()).collect(),
        all_logits,
        argmax_only: false,
    }
}

#[test]
fn three_shards_match_one_whole_model_bitwise() {
    for arch in [Arch::HunyuanLarge, Arch::HunyuanV1Moe] {
        let (dir, cfg) = tiny(arch, 5);
        let ck = Checkpoint::open(dir.path(), &mut |_| {}).unwrap();
        let b = CpuBackend::new(Precision::Bf16);
        let spec = KvSpec {
            n_cache_layers: cfg.n_cache_layers,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            block_size: 16,
            n_blocks: 8,
            dtype: DType::BF16,
        };
        // Expert e on rank e % 3; expert 0 of every layer also on ranks 1 and 2.
        let holders: Vec<Vec<Vec<u32>>> = cfg
            .layers
            .iter()
            .map(|l| {
                (0..l.n_experts)
                    .map(|e| {
                        if e == 0 {
                            vec![0, 1, 2]
                        } else {
                            vec![(e % 3) as u32]
                        }
                    })
                    .collect()
            })
            .collect();
        let whole = Model::load(&b, cfg.clone(), &ck, &mut |_| {});
        // Three sequences: rank 0 gets one, rank 1 two, rank 2 none (it only serves).
        let prompts: Vec<Vec<u32>> = vec![
            (0..19).map(|i| 300 + 7 * i).collect(),
            (0..5).map(|i| 280 + i).collect(),
            (0..11).map(|i| 500 - 3 * i).collect(),
        ];
        let owner = [0usize, 1, 1];
        let mut want = Vec::new();
        for p in &prompts {
            let mut kv = b.alloc_kv(spec);
            let mut out = whole.forward(&b, &mut kv, &[chunk(p, 0, true)]);
            for step in 0..3 {
                let t = 100 + step as u32;
                out.extend(whole.forward(&b, &mut kv, &[chunk(&[t], p.len() + step, false)]));
            }
            want.push(out);
        }
        let group = InProcess::group(3, Duration::from_secs(30));
        let got: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .enumerate()
                .map(|(rank, mut ex)| {
                    let (b, cfg, ck, holders, prompts) = (&b, &cfg, &ck, &holders, &prompts);
                    s.spawn(move || {
                        let holds = |l: usize, e: usize| holders[l][e].contains(&(rank as u32));
                        let model = Model::load_shard(
                            b,
                            cfg.clone(),
                            ck,
                            &holds,
                            TpShard::WHOLE,
                            &mut |_| {},
                        );
                        let mine: Vec<usize> = (0..3).filter(|&i| owner[i] == rank).collect();
                        let mut kvs: Vec<_> = mine.iter().map(|_| b.alloc_kv(spec)).collect();
                        let mut idle_kv = b.alloc_kv(spec);
                        let mut load = vec![vec![0u64; 16]; cfg.n_layers];
                        let mut outs: Vec<Vec<Vec<f32>>> = vec![Vec::new(); mine.len()];
                        for step in 0..4u64 {
                            // Each sequence has its own cache here, so a rank runs one
                            // forward per sequence; every rank runs as many forwards as
                            // the busiest (two), idle ones with no chunks.
                            for f in 0..2 {
                                let mut ep = ExpertParallel {
                                    exchange: &mut ex,
                                    holders,
                                    step: step * 10 + f as u64,
                                    load: &mut load,
                                    timing: None,
                                    fence: None,
                                };
                                let Some(&i) = mine.get(f) else {
                                    model.forward_ep(b, &mut idle_kv, &[], &mut ep).unwrap();
                                    continue;
                                };
                                let p = &prompts[i];
                                let c = if step == 0 {
                                    chunk(p, 0, true)
                                } else {
                                    chunk(&[99 + step as u32], p.len() + step as usize - 1, false)
                                };
                                let out = model
                                    .forward_ep(b, &mut kvs[f], &[c], &mut ep)
                                    .unwrap()
                                    .rows;
                                outs[f].extend(out);
                            }
                        }
                        (mine, outs, load)
                    })
                })
                .collect();
            let mut got = vec![Vec::new(); 3];
            let mut routed = 0;
            for h in handles {
                let (mine, outs, load) = h.join().unwrap();
                routed += load.iter().flatten().sum::<u64>();
                for (i, o) in mine.into_iter().zip(outs) {
                    got[i] = o;
                }
            }
            // Every token of every layer was routed once (top-k choices each).
            let tokens: usize = prompts.iter().map(|p| p.len() + 3).sum();
            let k: usize = cfg.layers.iter().map(|l| l.top_k).sum();
            assert_eq!(routed as usize, tokens * k, "{arch:?}");
            got
        });
        assert_eq!(got, want, "{arch:?}: expert parallelism changed the logits");
    }
}

/// Tensor parallelism joins shards by gathering columns, never by summing partial
/// products: two groups of two ranks (heads, attention output and shared expert in
/// halves, experts spread over all four) give bitwise the logits of one whole model,
/// including steps where one group has nothing to run and only serves experts.
#[test]
fn tensor_parallel_groups_match_one_whole_model_bitwise() {
    for arch in [Arch::HunyuanLarge, Arch::HunyuanV1Moe] {
        let (dir, cfg) = tiny(arch, 9);
        TpShard::check(&cfg, 2).unwrap();
        assert!(TpShard::check(&cfg, 3).unwrap_err().contains("divide by 3"));
        let ck = Checkpoint::open(dir.path(), &mut |_| {}).unwrap();
        let b = CpuBackend::new(Precision::Bf16);
        let spec = |kv_heads: usize| KvSpec {
            n_cache_layers: cfg.n_cache_layers,
            n_kv_heads: kv_heads,
            head_dim: cfg.head_dim,
            block_size: 16,
            n_blocks: 8,
            dtype: DType::BF16,
        };
        let holders: Vec<Vec<Vec<u32>>> = cfg
            .layers
            .iter()
            .map(|l| {
                (0..l.n_experts)
                    .map(|e| {
                        if e == 0 {
                            vec![0, 3]
                        } else {
                            vec![(e % 4) as u32]
                        }
                    })
                    .collect()
            })
            .collect();
        let whole = Model::load(&b, cfg.clone(), &ck, &mut |_| {});
        // Group 0 runs two sequences in one batch for 4 steps; group 1 one sequence
        // for 2 steps, then idles.
        let prompts: Vec<Vec<u32>> = vec![
            (0..13).map(|i| 300 + 7 * i).collect(),
            (0..6).map(|i| 280 + i).collect(),
            (0..9).map(|i| 500 - 3 * i).collect(),
        ];
        let steps = [4usize, 4, 2];
        let group_of = [0usize, 0, 1];
        let next = |i: usize, s: usize| 100 + (i * 10 + s) as u32;
        let mut want = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let mut kv = b.alloc_kv(spec(cfg.n_kv_heads));
            let mut out = whole.forward(&b, &mut kv, &[chunk(p, 0, true)]);
            for s in 1..steps[i] {
                out.extend(whole.forward(
                    &b,
                    &mut kv,
                    &[chunk(&[next(i, s)], p.len() + s - 1, false)],
                ));
            }
            want.push(out);
        }
        let group = InProcess::group(4, Duration::from_secs(30));
        let got = std::thread::scope(|sc| {
            let handles: Vec<_> = group
                .into_iter()
                .enumerate()
                .map(|(rank, mut ex)| {
                    let (b, cfg, ck, holders, prompts) = (&b, &cfg, &ck, &holders, &prompts);
                    sc.spawn(move || {
                        let holds = |l: usize, e: usize| holders[l][e].contains(&(rank as u32));
                        let tp = TpShard {
                            index: rank % 2,
                            size: 2,
                        };
                        let model = Model::load_shard(b, cfg.clone(), ck, &holds, tp, &mut |_| {});
                        assert_eq!(model.local_heads(), (cfg.n_heads / 2, cfg.n_kv_heads / 2));
                        let mut kv = b.alloc_kv(spec(cfg.n_kv_heads / 2));
                        let mine: Vec<usize> =
                            (0..3).filter(|&i| group_of[i] == rank / 2).collect();
                        let mut load = vec![vec![0u64; 16]; cfg.n_layers];
                        let mut outs = vec![Vec::new(); 3];
                        for s in 0..4 {
                            // Each sequence owns 32 slots of the cache.
                            let chunks: Vec<SeqChunk> = mine
                                .iter()
                                .filter(|&&i| s < steps[i])
                                .map(|&i| {
                                    let p = &prompts[i];
                                    let mut c = if s == 0 {
                                        chunk(p, 0, true)
                                    } else {
                                        chunk(&[next(i, s)], p.len() + s - 1, false)
                                    };
                                    c.slots = (0..c.slots.len()).map(|x| 32 * i + x).collect();
                                    c
                                })
                                .collect();
                            let live: Vec<usize> =
                                mine.iter().copied().filter(|&i| s < steps[i]).collect();
                            let mut ep = ExpertParallel {
                                exchange: &mut ex,
                                holders,
                                step: s as u64,
                                load: &mut load,
                                timing: None,
                                fence: None,
                            };
                            let out = model.forward_ep(b, &mut kv, &chunks, &mut ep).unwrap().rows;
                            assert_eq!(out.len(), chunks.len());
                            for (i, o) in live.into_iter().zip(out) {
                                outs[i].push(o);
                            }
                        }
                        (rank, outs, load)
                    })
                })
                .collect();
            let mut got = vec![Vec::new(); 3];
            let mut routed = 0;
            for h in handles {
                let (rank, outs, load) = h.join().unwrap();
                routed += load.iter().flatten().sum::<u64>();
                for (i, o) in outs.into_iter().enumerate() {
                    if rank % 2 == 0 {
                        got[i].extend(o);
                    } else {
                        // Only a group's first shard computes logits.
                        assert!(o.iter().all(Vec::is_empty), "{arch:?}: rank {rank}");
                    }
                }
            }
            // Each token routed once per layer, by one shard of its group.
            let tokens: usize = prompts
                .iter()
                .zip(steps)
                .map(|(p, s)| p.len() + s - 1)
                .sum();
            let k: usize = cfg.layers.iter().map(|l| l.top_k).sum();
            assert_eq!(routed as usize, tokens * k, "{arch:?}");
            got
        });
        assert_eq!(got, want, "{arch:?}: tensor parallelism changed the logits");
    }
}

/// Staging on a worker of random weights makes the very experts the whole random model
/// has (a rebalanced random-weight cluster computes the same model).
#[test]
fn random_experts_are_the_random_models_own() {
    let (_dir, cfg) = tiny(Arch::HunyuanLarge, 1);
    let b = CpuBackend::new(Precision::Bf16);
    let whole = Model::random(&b, cfg.clone(), 3, &mut |_| {});
    let staged = Model::random_experts(&b, &cfg, 3, &[(1, 5), (3, 0)]);
    for ((l, x), m) in &staged {
        let w = whole.layers[*l].experts[*x].as_ref().unwrap();
        for (a, b) in [(&w.gate, &m.gate), (&w.up, &m.up), (&w.down, &m.down)] {
            assert_eq!(a.bytes.as_slice(), b.bytes.as_slice(), "expert ({l}, {x})");
        }
    }
    let other = Model::random_experts(&b, &cfg, 4, &[(1, 5)]);
    assert_ne!(
        other[0].1.gate.bytes.as_slice(),
        staged[0].1.gate.bytes.as_slice()
    );
}
