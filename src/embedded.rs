//! The embedded default model: `hunyuan-tiny` (a trained model of the Hunyuan-Large
//! architecture) and its draft model `hunyuan-tiny-draft`, in the real checkpoint format,
//! compiled into the binary from `model/assets/` (feature `embedded-model`, on by default)
//! and written out once to `$HYSERVE_HOME` so a fresh install serves without a download.

/// One model directory's files: (file name, contents).
pub type Files = &'static [(&'static str, &'static [u8])];

macro_rules! asset {
    ($dir:literal, $name:literal) => {
        (
            $name,
            include_bytes!(concat!("../model/assets/", $dir, "/", $name)) as &[u8],
        )
    };
}

/// The target model, with the held-out passages the speculation benchmark uses.
pub const TINY: Files = &[
    asset!("hunyuan-tiny", "config.json"),
    asset!("hunyuan-tiny", "model.safetensors.index.json"),
    asset!("hunyuan-tiny", "model-00001-of-00003.safetensors"),
    asset!("hunyuan-tiny", "model-00002-of-00003.safetensors"),
    asset!("hunyuan-tiny", "model-00003-of-00003.safetensors"),
    asset!("hunyuan-tiny", "hy.tiktoken"),
    asset!("hunyuan-tiny", "tokenizer_config.json"),
    asset!("hunyuan-tiny", "training.json"),
    asset!("hunyuan-tiny", "heldout.jsonl"),
];

/// The draft model (same tokenizer and vocabulary).
pub const DRAFT: Files = &[
    asset!("hunyuan-tiny-draft", "config.json"),
    asset!("hunyuan-tiny-draft", "model.safetensors"),
    asset!("hunyuan-tiny-draft", "hy.tiktoken"),
    asset!("hunyuan-tiny-draft", "tokenizer_config.json"),
    asset!("hunyuan-tiny-draft", "training.json"),
];

/// A short fingerprint of `files` (FNV-1a over names and the small files' bytes; the
/// weights' index and configs change whenever the weights do), so a binary with other
/// weights writes them to a directory of their own.
pub fn fingerprint(files: Files) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in files {
        let small = bytes.len() <= 1 << 20;
        for &b in name
            .as_bytes()
            .iter()
            .chain(if small { *bytes } else { &[] })
        {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        h = (h ^ bytes.len() as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}
