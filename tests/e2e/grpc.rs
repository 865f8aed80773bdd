//! The gRPC API of the real `hyserve serve` binary through a tonic client: unary and
//! streaming generation give the greedy tokens `hyserve generate` gives, with logprobs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use hyserve_proto::v1;
use hyserve_proto::v1::inference_client::InferenceClient;

use crate::support::{generate_logits, hyserve, init_model};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `hyserve serve` on free ports; returns it and its gRPC address.
fn serve(model: &std::path::Path) -> (Server, String) {
    let mut child = hyserve()
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("hyserve serve starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("serve printed its addresses").unwrap();
        if let Some(rest) = line.trim().strip_prefix("gRPC API:") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Server(child), addr)
}

#[test]
fn grpc_unary_and_streaming_match_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    init_model(&m, "hunyuan-large", "tiny", "bf16", 9, &[]);
    let prompt: Vec<u32> = (300..312).collect();
    let (want, _) = generate_logits(&m, &prompt, 10, "bf16", tmp.path());
    let (_server, addr) = serve(&m);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = InferenceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let request = v1::GenerateRequest {
            input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                ids: prompt.clone(),
            })),
            max_tokens: Some(10),
            temperature: Some(0.0),
            ignore_eos: true,
            logprobs: true,
            top_logprobs: 2,
            ..Default::default()
        };
        let unary = client.generate(request.clone()).await.unwrap().into_inner();
        let ids: Vec<u32> = unary.tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, want, "unary gRPC differs from hyserve generate");
        assert!(
            unary
                .tokens
                .iter()
                .all(|t| t.logprob <= 0.0 && t.top_logprobs.len() == 2)
        );
        assert_eq!(unary.usage.unwrap().completion_tokens, 10);

        let mut stream = client.generate_stream(request).await.unwrap().into_inner();
        let mut streamed = Vec::new();
        let mut finished = false;
        while let Some(msg) = stream.message().await.unwrap() {
            streamed.extend(msg.tokens.iter().map(|t| t.id));
            if msg.usage.is_some() {
                finished = true;
            }
        }
        assert!(finished, "the last message carries usage");
        assert_eq!(
            streamed, want,
            "streamed gRPC differs from hyserve generate"
        );
        let models = client
            .list_models(v1::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(models.models.len(), 1);
    });
}
