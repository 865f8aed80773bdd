use super::*;

/// The real Hunyuan-A52B-Instruct config.json (the fields the engine reads).
const HUNYUAN_LARGE: &str = r#"{
    "architectures": ["HunYuanForCausalLM"], "model_type": "hunyuan",
    "hidden_size": 6400, "intermediate_size": 18304, "num_hidden_layers": 64,
    "num_attention_heads": 80, "num_key_value_heads": 8, "vocab_size": 129024,
    "max_position_embeddings": 131072, "rope_theta": 10000.0,
    "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
    "num_experts": 16, "moe_topk": 1, "num_shared_expert": 1,
    "use_mixed_mlp_moe": true, "use_cla": true, "cla_share_factor": 2,
    "use_qk_norm": true, "rms_norm_eps": 1e-05, "hidden_act": "silu",
    "attention_bias": false, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
}"#;

fn large() -> ModelConfig {
    ModelConfig::from_json(HUNYUAN_LARGE).unwrap()
}

fn opts(dtype: WeightDtype) -> PlanOptions {
    PlanOptions {
        dtype,
        ..PlanOptions::default()
    }
}

#[test]
fn sizes_of_the_real_model() {
    let s = ModelSizes::of(&large(), WeightDtype::Bf16);
    // One expert FFN: 3 x 6400 x 18304 x 2 bytes.
    assert_eq!(s.expert[0], 702_873_600);
    assert_eq!(s.experts_total(), 64 * 16 * 702_873_600);
    assert_eq!(s.shared, 64 * 702_873_600);
    // Everything: ~777 GB in bf16.
    let total = (s.dense() + s.experts_total()) as f64 / GB;
    assert!((770.0..785.0).contains(&total), "{total}");
    // 81,920 bytes of KV per token (32 cache layers x 2 x 8 heads x 80 x 2 bytes).
    assert_eq!(s.kv_per_token, 81_920);
    let f = ModelSizes::of(&large(), WeightDtype::Fp8);
    assert_eq!(f.expert[0] * 2, s.expert[0]);
}

#[test]
fn inventories_parse_and_bad_ones_are_refused() {
    let w = parse_inventory("16xH100-80G", 8).unwrap();
    assert_eq!(w.len(), 16);
    assert_eq!((w[0].node, w[7].node, w[8].node), (0, 0, 1));
    assert_eq!(w[0].mem_bytes, 80_000_000_000);
    let m = parse_inventory("8xH100-80G, 8xH20-96G", 8).unwrap();
    assert_eq!(
        (m[8].kind.as_str(), m[8].mem_bytes, m[8].node),
        ("H20-96G", 96_000_000_000, 1)
    );
    for bad in [
        "",
        "16xH100",
        "0xH100-80G",
        "ax-80G",
        "16H100-80G",
        "5000xH100-80G",
        "2xH100-0G",
    ] {
        assert!(parse_inventory(bad, 8).is_err(), "{bad:?} parsed");
    }
}

/// Every (layer, expert) is held by at least one worker, and each worker's listed
/// experts and bytes agree with the holder table and its memory.
fn check_consistent(p: &Plan, sizes: &ModelSizes) {
    for (l, layer) in p.holders.iter().enumerate() {
        assert_eq!(layer.len(), sizes.n_experts[l]);
        for (e, hs) in layer.iter().enumerate() {
            assert!(!hs.is_empty(), "expert ({l}, {e}) unplaced");
            for &w in hs {
                assert!(p.workers[w].experts.contains(&(l, e)));
            }
        }
    }
    for w in &p.workers {
        let bytes: u64 = w.experts.iter().map(|&(l, _)| sizes.expert[l]).sum();
        assert_eq!(bytes, w.expert_bytes);
        assert_eq!(
            w.dense_bytes + w.expert_bytes + w.overhead_bytes + w.kv_bytes,
            w.spec.mem_bytes
        );
    }
}

#[test]
fn large_in_bf16_on_8_h100s_is_refused_with_the_shortfall() {
    let w = parse_inventory("8xH100-80G", 8).unwrap();
    let err = plan(&large(), &w, &opts(WeightDtype::Bf16), None).unwrap_err();
    let PlanError::DoesNotFit(msg) = err else {
        panic!("{err}")
    };
    assert!(msg.contains("GB short"), "{msg}");
    assert!(msg.contains("720 GB of routed experts"), "{msg}");
}

#[test]
fn large_in_bf16_on_16_h100s_shards_the_dense_part_and_leaves_kv_room() {
    let cfg = large();
    let w = parse_inventory("16xH100-80G", 8).unwrap();
    let p = plan(&cfg, &w, &opts(WeightDtype::Bf16), None).unwrap();
    let sizes = ModelSizes::of(&cfg, WeightDtype::Bf16);
    check_consistent(&p, &sizes);
    // Replicated, the 57.6 GB dense part leaves no room for 45 GB of experts per GPU.
    assert_eq!(p.dense, DenseLayout::TensorParallel { group: 4 });
    assert_eq!(p.replicas(), 0);
    for wp in &p.workers {
        assert_eq!(wp.experts.len(), 64, "1024 experts over 16 workers");
        assert!(wp.kv_bytes >= 8_000_000_000);
        assert!(wp.kv_tokens > 400_000, "{}", wp.kv_tokens);
    }
    // Each layer's 16 experts sit on 16 different workers.
    for layer in &p.holders {
        let mut ws: Vec<usize> = layer.iter().map(|h| h[0]).collect();
        ws.sort_unstable();
        ws.dedup();
        assert_eq!(ws.len(), 16);
    }
    assert!(p.notes.iter().any(|n| n.contains("tensor-parallel")));
}

#[test]
fn large_in_fp8_on_16_h100s_keeps_attention_data_parallel() {
    let w = parse_inventory("16xH100-80G", 8).unwrap();
    let p = plan(&large(), &w, &opts(WeightDtype::Fp8), None).unwrap();
    assert_eq!(p.dense, DenseLayout::Replicated);
    check_consistent(&p, &ModelSizes::of(&large(), WeightDtype::Fp8));
    assert!(p.notes.iter().any(|n| n.contains("data-parallel")));
}

#[test]
fn a_mixed_inventory_fits_and_the_bigger_cards_keep_more_kv() {
    let w = parse_inventory("8xH100-80G,8xH20-96G", 8).unwrap();
    let p = plan(&large(), &w, &opts(WeightDtype::Bf16), None).unwrap();
    check_consistent(&p, &ModelSizes::of(&large(), WeightDtype::Bf16));
    let h100: usize = p.workers[..8].iter().map(|w| w.experts.len()).sum();
    let h20: usize = p.workers[8..].iter().map(|w| w.experts.len()).sum();
    assert_eq!(h100 + h20, 1024);
    // Per layer the experts spread one per worker first, so the split is even per
    // layer; the bigger cards end with more free memory for KV.
    assert!(p.workers[8].kv_bytes > p.workers[0].kv_bytes);
}

#[test]
fn skewed_load_gives_hot_experts_replicas_and_cold_ones_none() {
    let cfg = large();
    let w = parse_inventory("16xH100-80G", 8).unwrap();
    let mut load: ExpertLoad = vec![vec![100; 16]; 64];
    load[0][3] = 1000; // 10x its layer's typical load
    load[5][7] = 400;
    let o = PlanOptions {
        dtype: WeightDtype::Fp8,
        ..PlanOptions::default()
    };
    let p = plan(&cfg, &w, &o, Some(&load)).unwrap();
    check_consistent(&p, &ModelSizes::of(&cfg, WeightDtype::Fp8));
    assert_eq!(p.holders[0][3].len(), 1 + o.max_replicas);
    assert!(p.holders[5][7].len() >= 2);
    assert_eq!(p.holders[0][4].len(), 1);
    // Replicas never sit on a worker that already holds the expert.
    let mut hs = p.holders[0][3].clone();
    hs.sort_unstable();
    hs.dedup();
    assert_eq!(hs.len(), p.holders[0][3].len());
    assert!(p.workers.iter().all(|w| w.kv_bytes >= o.min_kv_bytes));
}

#[test]
fn load_of_the_wrong_shape_is_an_error() {
    let w = parse_inventory("16xH100-80G", 8).unwrap();
    let load: ExpertLoad = vec![vec![1; 15]; 64];
    let err = plan(&large(), &w, &opts(WeightDtype::Fp8), Some(&load)).unwrap_err();
    assert!(matches!(err, PlanError::Load(_)), "{err}");
}

/// Under tensor parallelism the projections are sliced and the embeddings, routers
/// and norms stay whole on every worker of a group.
#[test]
fn tensor_parallel_workers_hold_slices_of_the_projections_and_whole_embeddings() {
    let s = ModelSizes::of(&large(), WeightDtype::Bf16);
    let sliced = s.dense() - s.embeddings - s.attention_whole;
    assert_eq!(s.dense_per_worker(1), s.dense());
    assert_eq!(
        s.dense_per_worker(4),
        sliced.div_ceil(4) + s.embeddings + s.attention_whole
    );
    // Tied 129024 x 6400 bf16 embeddings: 1.65 GB on every worker.
    assert_eq!(s.embeddings, 1_651_507_200);
}

#[test]
fn an_asked_for_tensor_parallel_group_is_used_or_refused_with_the_reason() {
    let cfg = large();
    let w = parse_inventory("16xH100-80G", 8).unwrap();
    let with = |g| PlanOptions {
        tensor_parallel: Some(g),
        ..opts(WeightDtype::Bf16)
    };
    let p = plan(&cfg, &w, &with(8), None).unwrap();
    assert_eq!(p.dense, DenseLayout::TensorParallel { group: 8 });
    assert!(
        p.notes.iter().any(|n| n.contains("as asked")),
        "{:?}",
        p.notes
    );
    // Halves of the dense part do not leave room for the experts.
    let err = plan(&cfg, &w, &with(2), None).unwrap_err().to_string();
    assert!(err.contains("GB short"), "{err}");
    // 80 heads and 8 KV heads do not split three ways.
    let err = plan(&cfg, &w, &with(3), None).unwrap_err().to_string();
    assert!(err.contains("divide by 3"), "{err}");
    // Groups never cross a node: 12 GPUs in nodes of 6 cannot form groups of 4.
    let w12 = parse_inventory("12xH100-80G", 6).unwrap();
    let err = plan(&cfg, &w12, &with(4), None).unwrap_err().to_string();
    assert!(err.contains("must divide by 4"), "{err}");
}
