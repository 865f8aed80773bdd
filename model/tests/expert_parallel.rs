//! Expert parallelism changes where expert rows are computed, never what they are: three
//! workers holding disjoint expert shards (one expert replicated), exchanging rows over
//! the in-process transport, give bitwise the logits of one worker holding everything.

use std::time::Duration;

use hyserve_kernels::cpu::CpuBackend;
use hyserve_kernels::{Backend, DType, KvSpec, Precision};
use hyserve_model::init::{InitOptions, WeightFormat, init_model};
use hyserve_model::{Arch, Checkpoint, ExpertParallel, InProcess, Model, SeqChunk};

fn chunk(tokens: &[u32], first_pos: usize, all_logits: bool) -> SeqChunk {
    SeqChunk {
        tokens: tokens.to_vec(),
        first_pos,
        slots: (0..first_pos + tokens.len()).collect(),
        all_logits,
    }
}

#[test]
fn three_shards_match_one_whole_model_bitwise() {
    for arch in [Arch::HunyuanLarge, Arch::HunyuanV1Moe] {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            arch,
            preset: "tiny".into(),
            seed: 5,
            dtype: DType::BF16,
            format: WeightFormat::Safetensors,
            max_shard_bytes: 1 << 30,
        };
        let cfg = init_model(dir.path(), &opts, &mut |_, _| {}).unwrap();
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
                        let model = Model::load_shard(b, cfg.clone(), ck, &holds, &mut |_| {});
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
                                let out = model.forward_ep(b, &mut kvs[f], &[c], &mut ep).unwrap();
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
