//! One module per subcommand: its clap arguments and its `run`.

pub mod bench;
pub mod bench_ep;
pub mod bench_gpu;
pub mod bench_spec;
pub mod certs;
pub mod drain;
pub mod generate;
pub mod init_model;
pub mod plan;
pub mod serve;
pub mod train_tokenizer;
pub mod worker;
